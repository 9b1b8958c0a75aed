"""The one skeleton of every hierarchical (multi-stage, convolutional-hybrid) backbone: PiT, LeViT,
CvT, Twins-SVT, RegionViT, CrossFormer, ScalableViT, SepViT, MaxViT, NesT, MobileViT.

Order of operations, written once in `HierarchicalBackbone.forward_features`:
(hide pixels of hidden cells) -> stem -> mask token on hidden stem cells -> stages -> final map
-> patch tokens (row-major) + pooled vector.

Layout. The maps handed between stem, stages and readout are channels-first, (B, C, h, w), the
layout of the convolutions every stem is made of. Transformer parts inside a stage work on
channels-last maps (B, h, w, C), so that `Linear` and `LayerNorm` apply as they are; they convert
with `to_channels_last` / `to_channels_first` (permuted views, no copy).

The mask grid is the final stride (`mask_unit`); a mask on it is upsampled to the stem's grid with
`ssl_vit.masking.upsample_mask` and hidden stem cells are replaced by a learned mask token (SimMIM,
Xie et al. 2022, does exactly this for Swin). Stems whose convolutions overlap cells see the image
with hidden pixels zeroed first, so nothing of a hidden cell reaches the encoder.

Shared pieces: `ChannelNorm` (LayerNorm over the channels of a channels-first map), `PEG` (CPVT's
positional encoding generator), and `window_partition` / `window_merge`, the one split of a
channels-last map into non-overlapping windows. An arrangement that is not a window split
(MaxViT's grid, CrossFormer's long-distance groups, MobileViT's unfolding) is a local einops
rearrange in its family's file, named for what it is.

Not auto-imported (leading underscore): `from backbones._hierarchy import HierarchicalBackbone`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

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
    "HierarchicalBackbone", "StageOutput", "ChannelNorm", "PEG", "window_partition", "window_merge",
    "check_divisible", "to_channels_last", "to_channels_first", "per_stage", "stage_size_multiple",
]


# ---- layout ---------------------------------------------------------------------------------------
def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C), a view."""
    return x.permute(0, 2, 3, 1)


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W), a view."""
    return x.permute(0, 3, 1, 2)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first map, (B, C, H, W) -> (B, C, H, W).

    A `nn.LayerNorm(dim)` (parameters `weight`, `bias`) applied at every position of the map.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(to_channels_last(x), self.normalized_shape, self.weight, self.bias, self.eps)
        return to_channels_first(x)


class PEG(nn.Module):
    """Positional encoding generator (Chu et al. 2021, CPVT): x + depth-wise conv(x), on a
    channels-last map (B, H, W, C)."""

    def __init__(self, dim: int, kernel: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + to_channels_last(self.proj(to_channels_first(x)))


# ---- windows --------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, window: int | tuple[int, int]) -> torch.Tensor:
    """Non-overlapping windows of a channels-last map (Swin's block partition):
    (B, H, W, C) -> (B, nh, nw, wh*ww, C), windows row-major over the map, tokens row-major inside.

    `.flatten(0, 2)` gives one sequence per window, (B*nh*nw, wh*ww, C).
    """
    b, h, w, c = x.shape
    wh, ww = to_pair(window)
    x = x.view(b, h // wh, wh, w // ww, ww, c).transpose(2, 3)
    return x.reshape(b, h // wh, w // ww, wh * ww, c)


def window_merge(x: torch.Tensor, window: int | tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: (B, nh, nw, wh*ww, C) -> (B, nh*wh, nw*ww, C)."""
    b, nh, nw, _, c = x.shape
    wh, ww = to_pair(window)
    x = x.view(b, nh, nw, wh, ww, c).transpose(2, 3)
    return x.reshape(b, nh * wh, nw * ww, c)


def check_divisible(model: nn.Module, grid: tuple[int, int], window: tuple[int, int], what: str) -> None:
    """Raise InputShapeError when a stage grid does not split into whole windows."""
    if grid[0] % window[0] or grid[1] % window[1]:
        raise InputShapeError(
            f"{type(model).__name__}: stage grid {grid[0]}x{grid[1]} does not split into {what} "
            f"{window[0]}x{window[1]}; use an input size that is a multiple of {model.size_multiple}"
        )


# ---- per-stage arguments --------------------------------------------------------------------------
def per_stage(value, stages: int, name: str) -> tuple:
    """7 -> (7,) * stages; a tuple or list must have one entry per stage."""
    if isinstance(value, (tuple, list)):
        if len(value) != stages:
            raise ValueError(f"{name} has {len(value)} entries but there are {stages} stages: {tuple(value)}")
        return tuple(value)
    return (value,) * stages


def stage_size_multiple(strides: Sequence[int], windows: Sequence[int | None]) -> int:
    """lcm over stages of stride * window (a None window is global and adds no constraint)."""
    out = 1
    for s, w in zip(strides, windows):
        out = math.lcm(out, s * (w or 1))
    return out


# ---- the base class -------------------------------------------------------------------------------
class StageOutput(NamedTuple):
    """What `run_stages` returns.

    final: (B, D, h, w), the final map; its positions become the patch tokens (row-major).
    prefix: (B, R, D) class tokens (PiT), or None for none.
    pooled: (B, D) when the pooled vector is not the mean of the final map (PiT's class token,
        RegionViT's regional tokens, a norm after the mean), else None.
    """

    final: torch.Tensor
    prefix: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


class HierarchicalBackbone(Backbone):
    """Base class: a stem, then stages, read out from the final map (B, D, h, w).

    Subclasses build their modules, call `build_hierarchy(...)` (geometry, mask token, head) and
    implement
      `stem(x) -> (B, C0, H/s0, W/s0)`, s0 = `stem_stride`, and
      `run_stages(feat, image) -> StageOutput`, feat the stem map after the mask token, image the
      input after hiding (for a second stream from the pixels, RegionViT's regional tokens).
    Set `hide_before_stem = False` when the stem's patches do not overlap (hidden pixels then
    reach only hidden cells, which the mask token replaces).
    """

    capabilities = frozenset({MASK_TOKEN})
    num_prefix_tokens = 0
    hide_before_stem: bool = True  # stems with kernel > stride overlap cells

    def build_hierarchy(self, *, image_size, channels: int, embed_dim: int, stem_dim: int, stem_stride: int,
                        final_stride: int, size_multiple: int | None = None, num_classes: int = 0) -> None:
        """Geometry, the mask token (stem_dim,) and the classification head.

        `image_size` None picks 224 rounded up to the size multiple. `size_multiple` defaults to the
        final stride; a model whose last grids round up (LeViT) passes a smaller one and overrides
        `mask_grid`.
        """
        if final_stride % stem_stride:
            raise ValueError(f"final stride {final_stride} must be a multiple of the stem stride {stem_stride}")
        self.in_channels = channels
        self.embed_dim = embed_dim
        self.stem_stride = stem_stride
        self.mask_unit = final_stride
        self.size_multiple = size_multiple or final_stride
        if image_size is None:
            side = math.ceil(224 / self.size_multiple) * self.size_multiple
            image_size = (side, side)
        self.default_size = to_pair(image_size)
        bad = [s for s in self.default_size if s % self.size_multiple]
        if bad:
            raise ValueError(
                f"{type(self).__name__}: image size {bad[0]} must be a multiple of {self.size_multiple} "
                "(the product of the strides and windows of its stages)"
            )
        self.mask_token = nn.Parameter(torch.zeros(stem_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.head = make_head(embed_dim, num_classes)

    # ---- to implement -------------------------------------------------------------------------
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_stages(self, feat: torch.Tensor, image: torch.Tensor) -> StageOutput:
        raise NotImplementedError

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
        final, prefix, pooled = self.run_stages(feat, x)
        b, d, h, w = final.shape
        tokens = final.flatten(2).transpose(1, 2)
        if pooled is None:
            pooled = final.mean(dim=(2, 3))
        if prefix is None:
            prefix = tokens.new_zeros(b, 0, d)
        return BackboneOutput(patch_tokens=tokens, prefix_tokens=prefix, pooled=pooled, grid=(h, w))
