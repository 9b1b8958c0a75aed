"""MaxViT (Tu et al. 2022, "MaxViT: Multi-Axis Vision Transformer").

Every block is MBConv (inverted bottleneck with squeeze-excitation, Sandler et al. 2018; Hu et al.
2018), then block attention (inside w x w windows) and grid attention (a w x w grid of tokens
spread over the whole map, i.e. dilated global mixing), each followed by a feed-forward. Both
attentions carry a learned relative position bias, passed to SDPA as an additive mask.
Stochastic depth uses timm's DropPath (per-sample, off in eval); the seed's own helper built its
keep-mask from the tensor shape's values and never worked.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_vit import register_presets
from ssl_vit.layers import Attention, DropPath, Mlp, drop_path_rates

from ._hier_common import (
    HierBackbone,
    RelPosBias,
    grid_merge,
    grid_partition,
    pick_default_size,
    stage_size_multiple,
    to_cf,
    to_cl,
    window_merge,
    window_partition,
)

__all__ = ["MaxViT"]


class SqueezeExcite(nn.Module):
    """Channel gating from globally pooled features, (B, C, H, W) -> same (Hu et al. 2018)."""

    def __init__(self, dim: int, shrinkage: float) -> None:
        super().__init__()
        hidden = max(1, int(dim * shrinkage))
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean(dim=(2, 3))))).sigmoid()
        return x * gate[:, :, None, None]


class MBConv(nn.Module):
    """1x1 expand, BN, GELU, 3x3 depthwise (stride 2 when downsampling), BN, GELU, SE, 1x1, BN.

    (B, C_in, H, W) -> (B, C_out, H/s, W/s); residual (with DropPath) when shapes are kept.
    """

    def __init__(self, dim_in: int, dim_out: int, downsample: bool, expansion: float, shrinkage: float,
                 drop_path: float) -> None:
        super().__init__()
        hidden = int(expansion * dim_out)
        stride = 2 if downsample else 1
        self.net = nn.Sequential(
            nn.Conv2d(dim_in, hidden, 1), nn.BatchNorm2d(hidden), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden), nn.BatchNorm2d(hidden), nn.GELU(),
            SqueezeExcite(hidden, shrinkage),
            nn.Conv2d(hidden, dim_out, 1), nn.BatchNorm2d(dim_out),
        )
        self.residual = dim_in == dim_out and not downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return x + self.drop_path(out) if self.residual else out


class AxisAttention(nn.Module):
    """Pre-norm attention over groups of w*w tokens with a relative position bias, then a feed-forward.

    `grid=False`: block (window) partition; `grid=True`: grid partition. (B, H, W, C) -> same.
    """

    def __init__(self, dim: int, dim_head: int, window: int, grid: bool, dropout: float, drop_path: float) -> None:
        super().__init__()
        if dim % dim_head:
            raise ValueError(f"MaxViT: stage width {dim} must be divisible by dim_head={dim_head}")
        heads = dim // dim_head
        self.window, self.grid = window, grid
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, attn_drop=dropout, proj_drop=dropout)
        self.rel_pos = RelPosBias((window, window), heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 4, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        ws = self.window
        split, merge = (grid_partition, grid_merge) if self.grid else (window_partition, window_merge)
        groups = split(x, ws, ws)  # (B * groups, ws*ws, C)
        groups = groups + self.drop_path(self.attn(self.norm1(groups), attn_mask=self.rel_pos()))
        groups = groups + self.drop_path(self.mlp(self.norm2(groups)))
        return merge(groups, ws, ws, h, w)


class MaxViTBlock(nn.Module):
    """MBConv -> block attention -> grid attention, (B, C_in, H, W) -> (B, H', W', C_out) channels-last."""

    def __init__(self, dim_in: int, dim: int, downsample: bool, dim_head: int, window: int, expansion: float,
                 shrinkage: float, dropout: float, drop_path: float) -> None:
        super().__init__()
        self.mbconv = MBConv(dim_in, dim, downsample, expansion, shrinkage, drop_path)
        self.block_attn = AxisAttention(dim, dim_head, window, False, dropout, drop_path)
        self.grid_attn = AxisAttention(dim, dim_head, window, True, dropout, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid_attn(self.block_attn(to_cl(self.mbconv(x))))


class MaxViT(HierBackbone):
    """MaxViT: (B, C, H, W) -> logits (B, num_classes), or pooled features (B, dim * 2^(stages-1)).

    Stem: 3x3 stride-2 conv then 3x3 conv (width `dim_conv_stem`); stage i has width dim * 2^i and
    halves the resolution in its first MBConv. Inputs must be multiples of
    `size_multiple` = 2^(stages+1) * window_size, so the last stage still splits into windows.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        dim: int,
        depth: tuple[int, ...],
        dim_head: int = 32,
        dim_conv_stem: int | None = None,
        window_size: int = 7,
        mbconv_expansion_rate: float = 4,
        mbconv_shrinkage_rate: float = 0.25,
        dropout: float = 0.1,
        channels: int = 3,
        drop_path: float = 0.0,
        image_size=None,
    ) -> None:
        super().__init__()
        if not isinstance(depth, (tuple, list)):
            raise ValueError(f"depth must be a tuple with one entry per stage, got {depth!r}")
        n = len(depth)
        stem_dim = dim if dim_conv_stem is None else dim_conv_stem
        dims = [dim * 2**i for i in range(n)]
        strides = [2 ** (i + 2) for i in range(n)]
        self.embed_dim, self.in_channels = dims[-1], channels
        self.mask_unit = strides[-1]
        self.size_multiple = stage_size_multiple(strides, [window_size] * n)
        self.default_size = pick_default_size(image_size, self.size_multiple, "MaxViT")

        self.conv_stem = nn.Sequential(nn.Conv2d(channels, stem_dim, 3, stride=2, padding=1),
                                       nn.Conv2d(stem_dim, stem_dim, 3, padding=1))
        self.mask_token = nn.Parameter(torch.zeros(stem_dim))
        rates = drop_path_rates(drop_path, sum(depth))
        blocks, dim_in = [], stem_dim
        for i in range(n):
            for j in range(depth[i]):
                blocks.append(MaxViTBlock(dim_in if j == 0 else dims[i], dims[i], j == 0, dim_head, window_size,
                                          mbconv_expansion_rate, mbconv_shrinkage_rate, dropout, rates[len(blocks)]))
            dim_in = dims[i]
        self.layers = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else None
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return to_cl(self.conv_stem(x))

    def stages(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(to_cf(x))
        return x

    def finish(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.norm(x.mean(dim=(1, 2)))


register_presets(MaxViT, {
    "max_vit": dict(dim_conv_stem=64, dim=96, dim_head=32, depth=(2, 2, 5, 2), window_size=7,
                    mbconv_expansion_rate=4, mbconv_shrinkage_rate=0.25, dropout=0.1, image_size=224),
    "max_vit_tiny": dict(dim_conv_stem=16, dim=16, dim_head=8, depth=(1, 1), window_size=2,
                         mbconv_expansion_rate=2, dropout=0.0, image_size=32),
})
