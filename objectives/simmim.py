"""SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling", CVPR; arXiv 2021).

A random 60 % of the masking cells of `mask_patch_size` px (32 in the paper) is hidden, the count
rounded up as the official mask generator does (`ceil(cells * ratio)`, data/data_simmim.py), and the
coarse mask is upsampled to the backbone's mask grid; the backbone swaps hidden cells for its
learned mask token (`mask=`); a one-layer head maps each final token back to its cell's pixels (a
1x1 projection to mask_unit^2 * C channels followed by a pixel shuffle, written as a linear layer +
unpatchify); the loss is L1 on the hidden pixels divided once by their number. Video backbones: the mask lies on the
(t, h, w) grid (tubes over time, like MAE's) and the head predicts (pt, p, p) tubelets of pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssl_vit import MASK_TOKEN, InputShapeError, Objective, ViewSpec, register_objective
from ssl_vit.masking import draw_mask, hide_pixels, unpatchify, upsample_mask

from .losses import as_unit, simmim_l1
from .pooling import with_pool
from .views import resolve_views

__all__ = ["SimMIM"]


class SimMIM(Objective):
    """SimMIM over any backbone with `mask_token`: SimMIM(encoder=v, masking_ratio=0.5) as in the seed.

    masking_ratio: share of the masking cells hidden; default 0.6, the paper's setting and the
        official ViT-B config (`simmim_pretrain__vit_base__img224__800ep.yaml`: MASK_RATIO 0.6).
    mask_patch_size: side in px of one masking cell (official: 32); used when it is a multiple of the
        backbone's mask unit and tiles the input into at least 2 cells, otherwise the mask unit itself.
    Targets are the input pixels as given (no per-patch normalisation, as in the official code), so
    `reconstruct` needs no un-normalisation. The exported backbone pools by the mean of its patch
    tokens (`trained_pool`, see `objectives.pooling`).
    """

    requires = (frozenset({MASK_TOKEN}),)
    can_reconstruct = True
    trained_pool = "mean"

    def __init__(self, encoder: nn.Module, *, masking_ratio: float = 0.6, mask_patch_size: int = 32,
                 crop_scale: tuple[float, float] = (0.67, 1.0)) -> None:
        super().__init__(encoder)
        if not 0.0 < masking_ratio < 1.0:
            raise ValueError(f"masking_ratio must be in (0, 1), got {masking_ratio}")
        self.encoder = encoder
        self.masking_ratio = masking_ratio
        self.mask_patch_size = int(mask_patch_size)
        self.crop_scale = tuple(crop_scale)
        self.unit = as_unit(encoder.mask_unit, len(encoder.default_size))
        self.head = nn.Linear(encoder.embed_dim, math.prod(self.unit) * encoder.in_channels)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    def export_backbone(self) -> nn.Module:
        """The encoder, pooling by the mean of its patch tokens where it has that option."""
        return with_pool(self.encoder, self.trained_pool)

    def view_specs(self) -> list[ViewSpec]:
        """Random resized crop (scale 0.67-1, ratio 3/4-4/3) and flip (paper, Sec. 4.1)."""
        size = tuple(self.encoder.default_size)
        frames = size[0] if len(size) == 3 else None
        return [ViewSpec("simmim", 1, size[-2:], scale=self.crop_scale, hflip=0.5, frames=frames)]

    def coarse_factor(self, grid: Sequence[int]) -> tuple[int, ...]:
        """How many mask cells one masking cell spans along each grid axis (time: always 1)."""
        spatial_unit = self.unit[-2:]
        m = self.mask_patch_size
        ok = all(m % u == 0 and g % (m // u) == 0 for u, g in zip(spatial_unit, grid[-2:]))
        factor = tuple(m // u for u in spatial_unit) if ok else (1, 1)
        if math.prod(g // f for g, f in zip(grid[-2:], factor)) < 2:
            factor = (1, 1)
        return (1,) * (len(grid) - 2) + factor

    def make_mask(self, batch: int, grid: Sequence[int], device: torch.device) -> Tensor:
        """(B, *grid) bool: a random mask on the coarse grid hiding ceil(ratio * cells) of them (the
        official generator's count), upsampled to the mask grid."""
        factor = self.coarse_factor(grid)
        coarse = tuple(g // f for g, f in zip(grid, factor))
        return upsample_mask(draw_mask(batch, coarse, self.masking_ratio, device, rounding="ceil"), factor)

    def _predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W) -> predicted pixels of every cell (B, C, H, W) and the mask (B, *grid)."""
        grid = self.encoder.mask_grid(x.shape[2:])
        mask = self.make_mask(x.shape[0], grid, x.device)
        out = self.encoder.forward_features(x, mask=mask)
        if out.patch_tokens.shape[1] != math.prod(grid):
            raise InputShapeError(
                f"SimMIM needs one final token per mask cell: {type(self.encoder).__name__} gave "
                f"{out.patch_tokens.shape[1]} tokens for a {tuple(grid)} mask grid")
        return unpatchify(self.head(out.patch_tokens), self.unit, grid, x.shape[1]), mask

    def forward(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        (x,) = resolve_views(self.view_specs(), images)
        pred, mask = self._predict(x)
        loss = simmim_l1(pred, x, mask)
        self.metrics = {"loss": float(loss.detach()), "mask_ratio": float(mask.float().mean())}
        return loss

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For pictures: images (B, C, H, W) (video (B, C, T, H, W)), in the space the objective trains
        on -> (masked input with hidden pixels zeroed, reconstruction of the same shape: input pixels in
        visible cells, predicted ones in hidden cells, the mask (B, h, w) on the mask grid)."""
        pred, mask = self._predict(images)
        factor = [s // g for s, g in zip(images.shape[2:], mask.shape[1:])]
        hidden = upsample_mask(mask, factor).unsqueeze(1)  # (B, 1, [T,] H, W)
        recon = torch.where(hidden, pred.to(images.dtype), images)
        return hide_pixels(images, mask), recon, mask


register_objective("simmim", SimMIM)
