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
from einops import rearrange
from timm.layers import trunc_normal_
from torch import nn

from ssl_vit import register_presets
from ssl_vit.layers import Attention, DropPath, Mlp, drop_path_rates

from ._hierarchy import (
    HierarchicalBackbone,
    StageOutput,
    stage_size_multiple,
    to_channels_first,
    to_channels_last,
    window_merge,
    window_partition,
)

__all__ = ["MaxViT"]


def grid_partition(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """MaxViT's grid partition (dilated "grid" attention): a gh x gw grid of tokens spaced H/gh, W/gw
    apart forms one group. (B, H, W, C) -> (B, H/gh, W/gw, gh*gw, C), laid out like `window_partition`.
    """
    gh, gw = grid
    return rearrange(x, "b (gh y) (gw x) c -> b y x (gh gw) c", gh=gh, gw=gw)


def grid_merge(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `grid_partition`: (B, H/gh, W/gw, gh*gw, C) -> (B, H, W, C)."""
    gh, gw = grid
    return rearrange(x, "b y x (gh gw) c -> b (gh y) (gw x) c", gh=gh, gw=gw)


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
        ws = (self.window, self.window)
        split, merge = (grid_partition, grid_merge) if self.grid else (window_partition, window_merge)
        parted = split(x, ws)  # (B, nh, nw, ws*ws, C)
        groups = parted.flatten(0, 2)
        groups = groups + self.drop_path(self.attn(self.norm1(groups), attn_mask=self.rel_pos()))
        groups = groups + self.drop_path(self.mlp(self.norm2(groups)))
        return merge(groups.view(parted.shape), ws)


class MaxViTBlock(nn.Module):
    """MBConv -> block attention -> grid attention, (B, C_in, H, W) -> (B, C_out, H', W')."""

    def __init__(self, dim_in: int, dim: int, downsample: bool, dim_head: int, window: int, expansion: float,
                 shrinkage: float, dropout: float, drop_path: float) -> None:
        super().__init__()
        self.mbconv = MBConv(dim_in, dim, downsample, expansion, shrinkage, drop_path)
        self.block_attn = AxisAttention(dim, dim_head, window, False, dropout, drop_path)
        self.grid_attn = AxisAttention(dim, dim_head, window, True, dropout, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_channels_first(self.grid_attn(self.block_attn(to_channels_last(self.mbconv(x)))))


class MaxViT(HierarchicalBackbone):
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

        self.conv_stem = nn.Sequential(nn.Conv2d(channels, stem_dim, 3, stride=2, padding=1),
                                       nn.Conv2d(stem_dim, stem_dim, 3, padding=1))
        rates = drop_path_rates(drop_path, sum(depth))
        blocks, dim_in = [], stem_dim
        for i in range(n):
            for j in range(depth[i]):
                blocks.append(MaxViTBlock(dim_in if j == 0 else dims[i], dims[i], j == 0, dim_head, window_size,
                                          mbconv_expansion_rate, mbconv_shrinkage_rate, dropout, rates[len(blocks)]))
            dim_in = dims[i]
        self.layers = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dims[-1])
        self.build_hierarchy(image_size=image_size, channels=channels, embed_dim=dims[-1], stem_dim=stem_dim,
                             stem_stride=2, final_stride=strides[-1],
                             size_multiple=stage_size_multiple(strides, [window_size] * n), num_classes=num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_stem(x)

    def run_stages(self, feat: torch.Tensor, image: torch.Tensor) -> StageOutput:
        x = feat
        for block in self.layers:
            x = block(x)
        return StageOutput(x, pooled=self.norm(x.mean(dim=(2, 3))))


register_presets(MaxViT, {
    "max_vit": dict(dim_conv_stem=64, dim=96, dim_head=32, depth=(2, 2, 5, 2), window_size=7,
                    mbconv_expansion_rate=4, mbconv_shrinkage_rate=0.25, dropout=0.1, image_size=224),
    "max_vit_tiny": dict(dim_conv_stem=16, dim=16, dim_head=8, depth=(1, 1), window_size=2,
                         mbconv_expansion_rate=2, dropout=0.0, image_size=32),
})
