"""Shared skeleton for hierarchical (multi-stage, convolutional-hybrid) backbones.

Order of operations, one place for every such model:
(hide pixels of hidden cells) -> stem -> mask token on hidden stem cells -> stages -> final map
-> patch tokens (row-major) + pooled vector.

The mask grid is the final stride (`mask_unit`); a mask on it is upsampled to the stem's grid with
`ssl_vit.masking.upsample_mask` and hidden stem cells are replaced by a learned mask token (SimMIM,
Xie et al. 2022, does exactly this for Swin). Stems whose convolutions overlap cells see the image
with hidden pixels zeroed first, so nothing of a hidden cell reaches the encoder.

Not auto-imported (leading underscore): `from backbones._hierarchy import HierarchicalBackbone`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ssl_vit import MASK_TOKEN, Backbone, BackboneOutput
from ssl_vit.backbone import make_head
from ssl_vit.embed import to_pair
from ssl_vit.errors import InputShapeError
from ssl_vit.masking import hide_pixels, upsample_mask

__all__ = [
    "HierarchicalBackbone", "ChannelNorm", "window_partition", "window_merge", "check_divisible",
]


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of a map, (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Non-overlapping windows of a channels-last map: (B, H, W, C) -> (B, nh, nw, wh*ww, C)."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.view(b, h // wh, wh, w // ww, ww, c).transpose(2, 3)
    return x.reshape(b, h // wh, w // ww, wh * ww, c)


def window_merge(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: (B, nh, nw, wh*ww, C) -> (B, H, W, C)."""
    b, nh, nw, _, c = x.shape
    wh, ww = window
    x = x.view(b, nh, nw, wh, ww, c).transpose(2, 3)
    return x.reshape(b, nh * wh, nw * ww, c)


def check_divisible(model: nn.Module, grid: tuple[int, int], window: tuple[int, int], what: str) -> None:
    """Raise InputShapeError when a stage grid does not split into whole windows."""
    if grid[0] % window[0] or grid[1] % window[1]:
        raise InputShapeError(
            f"{type(model).__name__}: stage grid {grid[0]}x{grid[1]} does not split into {what} "
            f"{window[0]}x{window[1]}; use an input size that is a multiple of {model.size_multiple}"
        )


class HierarchicalBackbone(Backbone):
    """Base class: a stem, then stages, read out as a final map (B, D, h, w).

    Subclasses call `build_hierarchy(...)` in their constructor and implement
    `stem(x) -> (B, C0, H/s0, W/s0)` and `run_stages(feat) -> (final map (B, D, h, w), prefix (B, R, D) | None)`
    (or `(final, prefix, pooled (B, D))` when the pooled vector is not read from the final map; with
    `stages_take_image = True` it is called as `run_stages(feat, image)`, image already masked);
    they may override `pool(final, prefix) -> (B, D)` (default: mean over the final map, then
    `self.final_norm` if the model has one).
    """

    capabilities = frozenset({MASK_TOKEN})
    hide_before_stem: bool = True  # stems with kernel > stride overlap cells
    stages_take_image: bool = False  # run_stages(feat, image): a second stream from the pixels (RegionViT)

    def build_hierarchy(self, *, image_size, channels: int, embed_dim: int, stem_dim: int, stem_stride: int,
                        final_stride: int, size_multiple: int | None = None, num_classes: int = 0) -> None:
        if final_stride % stem_stride:
            raise ValueError(f"final stride {final_stride} must be a multiple of the stem stride {stem_stride}")
        self.default_size = to_pair(image_size)
        self.in_channels = channels
        self.embed_dim = embed_dim
        self.stem_stride = stem_stride
        self.mask_unit = final_stride
        # Normally a multiple of the final stride; a model whose last grids round up (LeViT) passes
        # a smaller one and overrides `mask_grid`.
        self.size_multiple = size_multiple or final_stride
        for s in self.default_size:
            if s % self.size_multiple:
                raise ValueError(
                    f"{type(self).__name__}: image size {s} must be a multiple of {self.size_multiple} "
                    "(the product of the strides and windows of its stages)"
                )
        self.mask_token = nn.Parameter(torch.zeros(stem_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.head = make_head(embed_dim, num_classes)

    # ---- to override -------------------------------------------------------------------------
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_stages(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def pool(self, final: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        pooled = final.mean(dim=(2, 3))
        norm = getattr(self, "final_norm", None)
        return pooled if norm is None else norm(pooled)

    # ---- the common path ----------------------------------------------------------------------
    def stem_mask(self, mask: torch.Tensor, stem_grid: tuple[int, int]) -> torch.Tensor:
        """The mask on the stem's grid, (B, h, w) -> (B, hs, ws); cropped where final cells overhang."""
        factor = self.mask_unit // self.stem_stride
        return upsample_mask(mask, factor)[:, : stem_grid[0], : stem_grid[1]]

    def apply_mask(self, feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace hidden cells of the stem map (B, C, h, w) by the mask token."""
        hidden = self.stem_mask(mask, feat.shape[-2:]).unsqueeze(1)  # (B, 1, h, w)
        return torch.where(hidden, self.mask_token.to(feat.dtype).view(1, -1, 1, 1), feat)

    def hide(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Zero the pixels of hidden cells, (B, C, H, W)."""
        s = self.stem_stride
        return hide_pixels(x, self.stem_mask(mask, (x.shape[-2] // s, x.shape[-1] // s)))

    def forward_features(self, x: torch.Tensor, *, mask: torch.Tensor | None = None,
                         keep: torch.Tensor | None = None, extra_tokens: torch.Tensor | None = None,
                         use_pos: bool = True) -> BackboneOutput:
        """(B, C, H, W) -> BackboneOutput: patch_tokens (B, h*w, D) of the final stage, pooled (B, D)."""
        self.check_request(x, mask, keep, extra_tokens, use_pos)
        if mask is not None and self.hide_before_stem:
            x = self.hide(x, mask)
        feat = self.stem(x)
        if mask is not None:
            feat = self.apply_mask(feat, mask)
        result = self.run_stages(feat, x) if self.stages_take_image else self.run_stages(feat)
        final, prefix = result[:2]
        b, d, h, w = final.shape
        tokens = final.flatten(2).transpose(1, 2)
        pooled = result[2] if len(result) > 2 else self.pool(final, prefix)
        if prefix is None:
            prefix = tokens.new_zeros(b, 0, d)
        return BackboneOutput(patch_tokens=tokens, prefix_tokens=prefix, pooled=pooled, grid=(h, w))
