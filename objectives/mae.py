"""MAE: masked autoencoders (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

A random 75% of the mask cells is hidden per sample (video: 90% of the spatial cells, the same ones in
every frame slice, a tube mask as in VideoMAE, Tong et al. 2022); the encoder sees the visible tokens only
(`keep`, on `token_drop` backbones), a light transformer decoder fills the hidden cells with a
learned mask token, adds its own positions over the mask grid and regresses the (per-patch
normalised) pixels; the loss counts hidden patches only. On a backbone without `token_drop` but
with `mask_token` it runs in mask-token mode: the backbone replaces hidden cells by its mask token,
the encoder sees every cell, and the decoder reads all tokens (logged once at construction).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssl_vit import MASK_TOKEN, TOKEN_DROP, InputShapeError, Objective, ViewSpec, register_objective
from ssl_vit.embed import LearnedPosEmbed, SinCosPosEmbed
from ssl_vit.layers import Transformer
from ssl_vit.masking import (
    draw_mask,
    drawn_hidden,
    gather_tokens,
    hide_pixels,
    mask_to_keep,
    patchify,
    scatter_tokens,
    unpatchify,
)

from .losses import as_unit, pixel_targets, unnormalize_patches
from .pooling import with_pool
from .views import resolve_views

__all__ = ["MAE", "MAEDecoder"]

logger = logging.getLogger(__name__)


class MAEDecoder(nn.Module):
    """The light MAE decoder: encoder tokens (B, K, De) (+ prefix (B, R, De)) -> pixels (B, N, out_dim).

    Visible tokens are projected to `dim`, put back on the full grid with a learned mask token in
    the hidden cells (when `keep` is given), get the decoder's own positions (fixed sin-cos as in
    the paper, or learned and resampled to the grid), run through `depth` pre-norm blocks; a linear
    layer predicts each cell's pixels. Prefix tokens take part in attention and are dropped after.
    """

    def __init__(self, encoder_dim: int, out_dim: int, base_grid: Sequence[int], dim: int = 512, depth: int = 8,
                 heads: int = 16, dim_head: int = 32, pos: str = "sincos") -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        if pos == "sincos":
            if dim % 4:
                raise ValueError(f"MAE decoder_dim must be divisible by 4 for sin-cos positions, got {dim}")
            self.pos = SinCosPosEmbed(dim)
        elif pos == "learned":
            self.pos = LearnedPosEmbed(base_grid, dim)
        else:
            raise ValueError(f"decoder_pos must be 'sincos' or 'learned', got {pos!r}")
        self.blocks = Transformer(dim, depth, heads, dim_head, 4 * dim, qkv_bias=True)
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, tokens: Tensor, prefix: Tensor, grid: Sequence[int], keep: Tensor | None = None,
                predict_at: Tensor | None = None) -> Tensor:
        """-> (B, N, out_dim), or (B, M, out_dim) for the cells `predict_at` (B, M) only (training
        needs the hidden cells alone, which saves the last projection on the others)."""
        r = prefix.shape[1]
        x = self.embed(torch.cat([prefix, tokens], dim=1))
        pre, x = x[:, :r], x[:, r:]
        n = math.prod(grid)
        if keep is not None:
            x = scatter_tokens(x, keep, n, fill=self.mask_token[0, 0])
        elif x.shape[1] != n:
            raise InputShapeError(f"MAE decoder got {x.shape[1]} tokens for a {tuple(grid)} grid")
        x = x + self.pos(grid, x.device, x.dtype)
        x = self.norm(self.blocks(torch.cat([pre, x], dim=1)))[:, r:]
        if predict_at is not None:
            x = gather_tokens(x, predict_at)
        return self.pred(x)


class MAE(Objective):
    """Masked autoencoder pretraining over any backbone with `token_drop` (or `mask_token`).

    MAE(encoder=v, masking_ratio=0.75, decoder_dim=512, decoder_depth=6) as in the seed; calling it
    on images (B, C, H, W) (video (B, C, T, H, W)) returns the scalar loss.
    Decoder defaults are the paper's (He et al. 2021, Sec. 3 and App. A.1; official `mae_vit_*_dec512d8b`):
    8 blocks of width 512 with 16 heads of width 32 (attention 512 wide), fixed sin-cos positions.
    masking_ratio: None gives 0.75 for images and 0.9 for video backbones (VideoMAE's tube masking);
    a value given always wins.
    Targets are pixel patches of the backbone's `mask_unit` (hierarchical backbones: the final
    stride; video: (pt, p, p) tubelets), normalised per patch when `norm_pix_loss` (paper default).
    The exported backbone pools by the mean of its patch tokens (`trained_pool`, see
    `objectives.pooling`).
    """

    requires = (frozenset({TOKEN_DROP}), frozenset({MASK_TOKEN}))
    can_reconstruct = True
    trained_pool = "mean"

    def __init__(
        self,
        encoder: nn.Module,
        *,
        decoder_dim: int = 512,
        masking_ratio: float | None = None,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_dim_head: int = 32,
        norm_pix_loss: bool = True,
        decoder_pos: str = "sincos",
        crop_scale: tuple[float, float] = (0.2, 1.0),
    ) -> None:
        super().__init__(encoder)
        if masking_ratio is None:
            masking_ratio = 0.9 if encoder.is_video else 0.75
        if not 0.0 < masking_ratio < 1.0:
            raise ValueError(f"masking_ratio must be in (0, 1), got {masking_ratio}")
        self.encoder = encoder
        self.masking_ratio = masking_ratio
        self.norm_pix_loss = norm_pix_loss
        self.crop_scale = tuple(crop_scale)
        self.token_drop = TOKEN_DROP in encoder.capabilities
        if not self.token_drop:
            logger.warning(
                "MAE: %s has no 'token_drop' capability; running in mask-token mode (hidden cells become the "
                "backbone's mask token, the encoder and decoder see every cell)", type(encoder).__name__)
        self.unit = as_unit(encoder.mask_unit, len(encoder.default_size))
        out_dim = math.prod(self.unit) * encoder.in_channels
        self.decoder = MAEDecoder(encoder.embed_dim, out_dim, encoder.mask_grid(encoder.default_size),
                                  decoder_dim, decoder_depth, decoder_heads, decoder_dim_head, decoder_pos)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    def export_backbone(self) -> nn.Module:
        """The encoder, pooling by the mean of its patch tokens where it has that option."""
        return with_pool(self.encoder, self.trained_pool)

    def view_specs(self) -> list[ViewSpec]:
        """One view: random resized crop (scale 0.2-1) and horizontal flip (paper, App. A.1)."""
        size = tuple(self.encoder.default_size)
        frames = size[0] if len(size) == 3 else None
        return [ViewSpec("mae", 1, size[-2:], scale=self.crop_scale, hflip=0.5, frames=frames)]

    def _predict(self, x: Tensor, generator: torch.Generator | None = None,
                 hidden_only: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """x (B, C, H, W) -> predicted patches (B, N, prod(unit) * C), the mask (B, *grid) and None;
        hidden_only: predictions (B, M, ...) of the hidden cells only, and their indices (B, M)."""
        grid = self.encoder.mask_grid(x.shape[2:])
        mask = draw_mask(x.shape[0], grid, self.masking_ratio, x.device, generator)
        n_hidden = drawn_hidden(grid, self.masking_ratio)  # known, so the mask is not read on the host
        hidden = mask_to_keep(~mask, n_hidden) if hidden_only else None
        if self.token_drop:
            keep = mask_to_keep(mask, math.prod(grid) - n_hidden)
            out = self.encoder.forward_features(x, keep=keep)
            pred = self.decoder(out.patch_tokens, out.prefix_tokens, grid, keep, hidden)
        else:
            out = self.encoder.forward_features(x, mask=mask)
            if out.patch_tokens.shape[1] != math.prod(grid):
                raise InputShapeError(
                    f"MAE in mask-token mode needs one final token per mask cell: {type(self.encoder).__name__} "
                    f"gave {out.patch_tokens.shape[1]} tokens for a {tuple(grid)} mask grid")
            pred = self.decoder(out.patch_tokens, out.prefix_tokens, grid, None, hidden)
        return pred, mask, hidden

    def forward(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        (x,) = resolve_views(self.view_specs(), images)
        pred, mask, hidden = self._predict(x, hidden_only=True)
        # every sample hides the same number of cells, so the mean over (B, M) is the masked mean
        loss = (pred - pixel_targets(x, self.unit, self.norm_pix_loss, index=hidden)).square().mean()
        # the hidden share from shapes, not from the mask: one host sync per step (the loss), not two
        self.metrics = {"loss": float(loss.detach()), "mask_ratio": hidden.shape[1] / mask[0].numel()}
        return loss

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For pictures: images (B, C, H, W) (video (B, C, T, H, W)), in the space the objective trains
        on -> (masked input with hidden pixels zeroed, reconstruction of the same shape with visible
        patches from the input and predicted ones in the hidden cells, the mask (B, h, w)).
        With norm_pix_loss the predictions are put back in pixel space with each hidden patch's own
        mean and standard deviation (`losses.unnormalize_patches`)."""
        pred, mask, _ = self._predict(images)
        patches = patchify(images, self.unit)
        if self.norm_pix_loss:
            pred = unnormalize_patches(pred, patches)
        merged = torch.where(mask.flatten(1).unsqueeze(-1), pred.to(patches.dtype), patches)
        recon = unpatchify(merged, self.unit, mask.shape[1:], images.shape[1])
        return hide_pixels(images, mask), recon, mask


register_objective("mae", MAE)
