"""CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention (Wang et al. 2021,
arXiv:2108.00154).

Four stages. Each starts with a cross-scale embedding layer (several convolutions of different
kernel sizes at one stride, concatenated along channels) and alternates short-distance attention
(SDA: inside non-overlapping windows of adjacent tokens) and long-distance attention (LDA: inside
groups of G x G tokens sampled at a fixed interval across the whole map), each followed by an
MLP. Both add a dynamic position bias (DPB): a small MLP maps every relative offset (dy, dx) of
the window or group to one bias per head.

Unlike the seed, whose bias table covers offsets [-w, w] but is indexed as if it covered
[-(w-1), w-1] (and holds one value for all heads), the DPB here is evaluated on exactly the
(2w-1)^2 offsets of the window or group at hand, per head, and indexed consistently.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from ssl_vit import register_presets
from ssl_vit.layers import Attention, DropPath, Mlp, drop_path_rates

from ._hierarchy import (
    HierarchicalBackbone,
    StageOutput,
    check_divisible,
    to_channels_first,
    to_channels_last,
    window_merge,
    window_partition,
)

__all__ = ["CrossFormer"]


def _cast(val, n: int) -> tuple:
    return tuple(val) if isinstance(val, (tuple, list)) else (val,) * n


class CrossEmbed(nn.Module):
    """Cross-scale embedding: convs with kernels k_i at one stride, concatenated; (B, C, H, W) -> (B, D, H/s, W/s).

    The smallest kernel gets half the channels, the next a quarter, ...; padding (k - s) / 2 keeps
    every branch on the same grid.
    """

    def __init__(self, dim_in: int, dim_out: int, kernels, stride: int) -> None:
        super().__init__()
        kernels = sorted(kernels)
        for k in kernels:
            if (k - stride) % 2 or k < stride:
                raise ValueError(f"cross-embed kernel {k} does not fit stride {stride}: "
                                 "k - stride must be even and >= 0")
        dims = [dim_out // 2 ** i for i in range(1, len(kernels))]
        dims.append(dim_out - sum(dims))
        self.convs = nn.ModuleList(
            nn.Conv2d(dim_in, d, k, stride=stride, padding=(k - stride) // 2) for k, d in zip(kernels, dims)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)


class DynamicPositionBias(nn.Module):
    """DPB (CrossFormer section 3.3): (dy, dx) -> per-head bias, evaluated for a window of side w.

    Returns the (heads, w*w, w*w) additive attention bias for a w x w window or group.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d_in = 2
        for _ in range(3):
            layers += [nn.Linear(d_in, dim), nn.LayerNorm(dim), nn.ReLU()]
            d_in = dim
        layers.append(nn.Linear(dim, heads))
        self.mlp = nn.Sequential(*layers)

    def forward(self, window: int) -> torch.Tensor:
        dev = self.mlp[0].weight.device
        offsets = torch.arange(-(window - 1), window, device=dev, dtype=torch.float32)
        dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
        table = self.mlp(torch.stack([dy, dx], dim=-1).view(-1, 2)).t()  # (heads, (2w-1)^2)
        pos = torch.arange(window, device=dev)
        py, px = torch.meshgrid(pos, pos, indexing="ij")
        py, px = py.flatten(), px.flatten()
        index = (py[:, None] - py[None] + window - 1) * (2 * window - 1) + (px[:, None] - px[None] + window - 1)
        return table[:, index]


def long_distance_groups(x: torch.Tensor, group: tuple[int, int]) -> torch.Tensor:
    """LDA's groups: G x G tokens sampled at a fixed interval (H/G, W/G) across the whole map (the
    same dilated arrangement as MaxViT's grid attention). (B, H, W, C) -> (B, H/G, W/G, G*G, C), laid
    out like `window_partition`: token (gy * H/G + iy, gx * W/G + ix) is member (gy, gx) of group (iy, ix).
    """
    gh, gw = group
    return rearrange(x, "b (gy iy) (gx ix) c -> b iy ix (gy gx) c", gy=gh, gx=gw)


def long_distance_merge(x: torch.Tensor, group: tuple[int, int]) -> torch.Tensor:
    """Inverse of `long_distance_groups`: (B, H/G, W/G, G*G, C) -> (B, H, W, C)."""
    gh, gw = group
    return rearrange(x, "b iy ix (gy gx) c -> b (gy iy) (gx ix) c", gy=gh, gx=gw)


class CrossAttention(nn.Module):
    """SDA ('short': adjacent w x w windows) or LDA ('long': G x G tokens at interval H/G), on (B, H, W, C)."""

    def __init__(self, dim: int, kind: str, window: int, dim_head: int, attn_drop: float) -> None:
        super().__init__()
        if kind not in ("short", "long"):
            raise ValueError(f"attention kind must be 'short' or 'long', got {kind!r}")
        heads = max(dim // dim_head, 1)
        self.kind, self.window = kind, window
        self.attn = Attention(dim, heads, dim_head, attn_drop=attn_drop)
        self.dpb = DynamicPositionBias(max(dim // 4, 1), heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = (self.window, self.window)
        short = self.kind == "short"
        split, merge = (window_partition, window_merge) if short else (long_distance_groups, long_distance_merge)
        parted = split(x, g)  # (B, nh, nw, G*G, C): windows (SDA) or interval groups (LDA)
        out = self.attn(parted.flatten(0, 2), attn_mask=self.dpb(self.window).to(x.dtype))
        return merge(out.view(parted.shape), g)


class CrossBlock(nn.Module):
    """Pre-norm residual attention then MLP on (B, H, W, C)."""

    def __init__(self, dim: int, attn: nn.Module, ff_drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attn
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, dim * 4, ff_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossFormer(HierarchicalBackbone):
    """CrossFormer: (B, C, H, W) -> logits (B, num_classes), or pooled features (B, dim[-1]).

    Stage i: CrossEmbed(cross_embed_kernel_sizes[i], cross_embed_strides[i]), then depth[i] SDA/LDA
    pairs with windows local_window_size[i] and groups global_window_size[i]. Mask unit: the
    product of the strides; size multiple: lcm over stages of stride x lcm(local, global).
    """

    def __init__(
        self,
        *,
        dim=(64, 128, 256, 512),
        depth=(2, 2, 8, 2),
        global_window_size=(8, 4, 2, 1),
        local_window_size=7,
        cross_embed_kernel_sizes=((4, 8, 16, 32), (2, 4), (2, 4), (2, 4)),
        cross_embed_strides=(4, 2, 2, 2),
        num_classes: int = 1000,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        channels: int = 3,
        dim_head: int = 32,
        drop_path: float = 0.0,
        image_size: int | tuple[int, int] = 224,
    ) -> None:
        super().__init__()
        dims = _cast(dim, 4)
        n = len(dims)
        depths, globals_, locals_ = _cast(depth, n), _cast(global_window_size, n), _cast(local_window_size, n)
        kernels, strides = _cast(cross_embed_kernel_sizes, n), _cast(cross_embed_strides, n)
        if not all(len(t) == n for t in (depths, globals_, locals_, kernels, strides)):
            raise ValueError(f"every per-stage argument needs {n} entries (one per stage of dim)")
        rates = iter(drop_path_rates(drop_path, 2 * sum(depths)))
        self.embeds, self.stages = nn.ModuleList(), nn.ModuleList()
        self.windows: list[tuple[int, int]] = []
        stride, multiple, d_in = 1, 1, channels
        for d, depth_i, gw, lw, ks, s in zip(dims, depths, globals_, locals_, kernels, strides):
            stride *= s
            self.embeds.append(CrossEmbed(d_in, d, ks, s))
            blocks = []
            for _ in range(depth_i):
                blocks.append(CrossBlock(d, CrossAttention(d, "short", lw, dim_head, attn_dropout), ff_dropout,
                                         next(rates)))
                blocks.append(CrossBlock(d, CrossAttention(d, "long", gw, dim_head, attn_dropout), ff_dropout,
                                         next(rates)))
            self.stages.append(nn.Sequential(*blocks))
            self.windows.append((lw, gw))
            multiple = math.lcm(multiple, stride * math.lcm(lw, gw))
            d_in = d
        self.norm = nn.LayerNorm(d_in)
        self.build_hierarchy(image_size=image_size, channels=channels, embed_dim=d_in, stem_dim=dims[0],
                             stem_stride=strides[0], final_stride=stride, size_multiple=math.lcm(multiple, stride),
                             num_classes=num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.embeds[0](x)

    def run_stages(self, feat: torch.Tensor, image: torch.Tensor) -> StageOutput:
        for i, stage in enumerate(self.stages):
            if i:
                feat = self.embeds[i](feat)
            x = to_channels_last(feat)
            lw, gw = self.windows[i]
            check_divisible(self, x.shape[1:3], (lw, lw), "local windows")
            check_divisible(self, x.shape[1:3], (gw, gw), "long-distance groups")
            x = stage(x)
            if i == len(self.stages) - 1:
                x = self.norm(x)
            feat = to_channels_first(x)
        return StageOutput(feat)


_SEED = dict(dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), global_window_size=(8, 4, 2, 1), local_window_size=7)
# Tiny: strides 2, 2, 2, 1 (final grid 4x4 at 32 px), windows 4, 4, 2, 2 and groups 4, 2, 2, 2.
_TINY = dict(image_size=32, dim=(32, 64, 128, 128), depth=(1, 1, 1, 1), global_window_size=(4, 2, 2, 2),
             local_window_size=(4, 4, 2, 2), cross_embed_kernel_sizes=((2, 4), (2, 4), (2, 4), (1, 3)),
             cross_embed_strides=(2, 2, 2, 1))

register_presets(CrossFormer, {"crossformer": _SEED, "crossformer_tiny": _TINY})
