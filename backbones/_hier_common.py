"""What the hierarchical / convolutional-hybrid backbones of this group share (ScalableViT, SepViT,
MaxViT, NesT, MobileViT).

Every such model is: stem -> (mask token on hidden cells) -> stages -> final tokens -> pooled.
`HierBackbone.forward_features` implements that order once; a model supplies `stem`, `stages`
and `finish`. Feature maps travel channels-last, (B, H, W, C), so the transformer parts are plain
`Linear`/`LayerNorm` calls; convolutions permute to channels-first where they need it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ssl_vit import MASK_TOKEN, Backbone, BackboneOutput
from ssl_vit.masking import hide_pixels, upsample_mask

__all__: list[str] = []


def cast_tuple(value, length: int, name: str) -> tuple:
    """7 -> (7,) * length; a tuple/list must have `length` entries (one per stage)."""
    if isinstance(value, (tuple, list)):
        if len(value) != length:
            raise ValueError(f"{name} has {len(value)} entries but there are {length} stages: {tuple(value)}")
        return tuple(value)
    return (value,) * length


def pick_default_size(image_size, multiple: int, name: str) -> tuple[int, int]:
    """The preset's input size: the given one (checked), or 224 rounded up to `multiple`."""
    if image_size is None:
        side = math.ceil(224 / multiple) * multiple
        return (side, side)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    bad = [s for s in size if s % multiple]
    if bad:
        raise ValueError(f"{name}: image_size {size} must be a multiple of {multiple} (strides times windows)")
    return size


def to_cf(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W)."""
    return x.permute(0, 3, 1, 2)


def to_cl(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C)."""
    return x.permute(0, 2, 3, 1)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first map (B, C, H, W) (ConvNeXt's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_cf(F.layer_norm(to_cl(x), self.normalized_shape, self.weight, self.bias, self.eps))


class ConvCL(nn.Module):
    """A convolution applied to a channels-last map: (B, H, W, C) -> (B, H', W', C')."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_cl(self.conv(to_cf(x)))


class PEG(nn.Module):
    """Positional encoding generator (Chu et al. 2021, CPVT): x + depthwise 3x3 conv(x), (B, H, W, C)."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + to_cl(self.proj(to_cf(x)))


def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """Block partition (Swin): (B, H, W, C) -> (B * H/wh * W/ww, wh*ww, C), windows row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_merge(x: torch.Tensor, wh: int, ww: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nW, wh*ww, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    x = x.view(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def grid_partition(x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Grid partition (MaxViT's dilated "grid" attention): a gh x gw grid of tokens spaced H/gh apart.

    (B, H, W, C) -> (B * H/gh * W/gw, gh*gw, C).
    """
    b, h, w, c = x.shape
    x = x.view(b, gh, h // gh, gw, w // gw, c).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, gh * gw, c)


def grid_merge(x: torch.Tensor, gh: int, gw: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `grid_partition`."""
    c = x.shape[-1]
    x = x.view(-1, h // gh, w // gw, gh, gw, c).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, h, w, c)


class RelPosBias(nn.Module):
    """Learned relative position bias for a wh x ww window (Swin, Liu et al. 2021; MaxViT):
    returns the additive attention bias (1, heads, N, N), N = wh*ww, for `attend`'s attn_mask."""

    def __init__(self, window: tuple[int, int], heads: int) -> None:
        super().__init__()
        wh, ww = window
        self.table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), heads))
        trunc_normal_(self.table, std=0.02)
        ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
        rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
        index = (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)
        self.register_buffer("index", index, persistent=False)

    def forward(self) -> torch.Tensor:
        n = self.index.shape[0]
        return self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)


class HierBackbone(Backbone):
    """Skeleton of a hierarchical backbone (B, C, H, W) -> BackboneOutput on the final stride's grid.

    Subclasses set the geometry attributes and implement
    `stem(x) -> (B, h0, w0, C0)`, `stages(x) -> (B, h, w, D)`, `finish(x) -> (tokens (B, h, w, D), pooled (B, D))`,
    and own `self.mask_token` (C0,). `stem_overlaps` = True makes hidden-cell pixels be zeroed
    before the stem, so overlapping stem convolutions cannot carry them into visible cells.
    """

    capabilities = frozenset({MASK_TOKEN})
    num_prefix_tokens = 0
    stem_overlaps = True

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stages(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def apply_mask(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden cells of the stem map x (B, h0, w0, C) become the mask token (SimMIM, Xie et al. 2022)."""
        factor = [s // g for s, g in zip(x.shape[1:3], mask.shape[1:])]
        hidden = upsample_mask(mask, factor).unsqueeze(-1)
        return torch.where(hidden, self.mask_token.to(x.dtype), x)

    def forward_features(self, x: torch.Tensor, *, mask: torch.Tensor | None = None,
                         keep: torch.Tensor | None = None, extra_tokens: torch.Tensor | None = None,
                         use_pos: bool = True) -> BackboneOutput:
        """x (B, C, H, W) -> patch_tokens (B, h*w, D) on grid (H, W) // mask_unit, pooled (B, D)."""
        self.check_request(x, mask, keep, extra_tokens, use_pos)
        if mask is not None and self.stem_overlaps:
            x = hide_pixels(x, mask)
        h = self.stem(x)
        if mask is not None:
            h = self.apply_mask(h, mask)
        tokens, pooled = self.finish(self.stages(h))
        b, gh, gw, d = tokens.shape
        return BackboneOutput(tokens.reshape(b, gh * gw, d), tokens.new_zeros(b, 0, d), pooled, (gh, gw))


def stage_size_multiple(strides: Sequence[int], windows: Sequence[int | None]) -> int:
    """lcm over stages of stride * window (a None window is global and adds no constraint)."""
    out = 1
    for s, w in zip(strides, windows):
        out = math.lcm(out, s * (w or 1))
    return out
