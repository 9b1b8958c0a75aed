"""NesT (Zhang et al. 2022, "Nested Hierarchical Transformer: Towards Accurate, Data-Efficient and
Interpretable Visual Understanding", a.k.a. "Aggregating Nested Transformers").

The patch map is cut into 4^(L-1) blocks; a transformer runs inside each block (tokens of different
blocks never attend to each other, one learned position table shared by the blocks of a level);
between levels a 3x3 conv, LayerNorm and 3x3 stride-2 max-pool aggregate neighbouring blocks, so the
block count per side halves while the tokens per block stay the same. The seed ignored `dim_head`
(always width / heads); here it is honoured, and None keeps the paper's width / heads.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ssl_vit import register_presets
from ssl_vit.embed import LearnedPosEmbed, to_pair
from ssl_vit.layers import Transformer, drop_path_rates

from ._hierarchy import (
    ChannelNorm,
    HierarchicalBackbone,
    StageOutput,
    to_channels_first,
    to_channels_last,
    window_merge,
    window_partition,
)

__all__ = ["NesT"]


class NestLevel(nn.Module):
    """One hierarchy level: `blocks` x `blocks` blocks, each its own sequence through a shared
    transformer with a shared learned position table. (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, blocks: int, block_grid: tuple[int, int], depth: int, heads: int,
                 dim_head: int, mlp_mult: int, dropout: float, drop_path: float) -> None:
        super().__init__()
        self.blocks = blocks
        self.pos_embed = LearnedPosEmbed(block_grid, dim)
        self.transformer = Transformer(dim, depth, heads, dim_head, dim * mlp_mult, dropout=dropout,
                                       attn_drop=dropout, drop_path=drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        block = (h // self.blocks, w // self.blocks)
        parted = window_partition(x, block)  # (B, k, k, bh*bw, C): the blocks are windows
        seq = self.transformer(parted.flatten(0, 2) + self.pos_embed(block))
        return window_merge(seq.view(parted.shape), block)


class Aggregate(nn.Module):
    """Block aggregation: 3x3 conv, channel LayerNorm, 3x3 stride-2 max-pool; (B, H, W, C) -> (B, H/2, W/2, C')."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.norm = ChannelNorm(dim_out)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_channels_last(self.pool(self.norm(self.conv(to_channels_first(x)))))


class NesT(HierarchicalBackbone):
    """NesT: (B, C, H, W) -> logits (B, num_classes), or pooled features (B, dim * 2^(L-1)).

    Level l (from fine to coarse) has width dim * 2^l and heads * 2^l heads. Any input whose sides
    are multiples of patch_size * 2^(L-1) works (blocks shrink or grow with it; the position
    tables are resampled). The final tokens are the LayerNorm'ed top-level map; pooled is their mean.
    """

    hide_before_stem = False  # patches do not overlap: nothing of a hidden cell reaches a visible one

    def __init__(
        self,
        *,
        image_size,
        patch_size: int,
        num_classes: int,
        dim: int,
        heads: int,
        num_hierarchies: int,
        block_repeats,
        mlp_mult: int = 4,
        channels: int = 3,
        dim_head: int | None = None,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        n = num_hierarchies
        repeats = tuple(block_repeats) if isinstance(block_repeats, (tuple, list)) else (block_repeats,) * n
        if len(repeats) != n:
            raise ValueError(f"block_repeats has {len(repeats)} entries but num_hierarchies={n}")
        dims = [dim * 2**i for i in range(n)]
        level_heads = [heads * 2**i for i in range(n)]
        self.patch_size = patch_size
        final_stride = patch_size * 2 ** (n - 1)

        patch_dim = channels * patch_size**2
        self.patch_norm = nn.LayerNorm(patch_dim)
        self.patch_proj = nn.Linear(patch_dim, dim)
        self.embed_norm = nn.LayerNorm(dim)
        fmap = [s // patch_size for s in to_pair(image_size)]
        block_grid = (fmap[0] // 2 ** (n - 1), fmap[1] // 2 ** (n - 1))
        rates = drop_path_rates(drop_path, n)
        self.levels = nn.ModuleList()
        self.aggregates = nn.ModuleList()
        for i in range(n):
            blocks = 2 ** (n - 1 - i)
            dh = dims[i] // level_heads[i] if dim_head is None else dim_head
            self.levels.append(NestLevel(dims[i], blocks, block_grid, repeats[i], level_heads[i], dh, mlp_mult,
                                         dropout, rates[i]))
            if i < n - 1:
                self.aggregates.append(Aggregate(dims[i], dims[i + 1]))
        self.norm = nn.LayerNorm(dims[-1])
        self.build_hierarchy(image_size=image_size, channels=channels, embed_dim=dims[-1], stem_dim=dim,
                             stem_stride=patch_size, final_stride=final_stride, num_classes=num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        patches = rearrange(x, "b c (h p1) (w p2) -> b h w (p1 p2 c)", p1=p, p2=p)
        return to_channels_first(self.embed_norm(self.patch_proj(self.patch_norm(patches))))

    def run_stages(self, feat: torch.Tensor, image: torch.Tensor) -> StageOutput:
        x = to_channels_last(feat)
        for i, level in enumerate(self.levels):
            x = level(x)
            if i < len(self.aggregates):
                x = self.aggregates[i](x)
        return StageOutput(to_channels_first(self.norm(x)))  # the seed's head: channel LayerNorm, then mean


register_presets(NesT, {
    "nest": dict(image_size=224, patch_size=4, dim=96, heads=3, num_hierarchies=3, block_repeats=(2, 2, 8)),
    "nest_tiny": dict(image_size=32, patch_size=2, dim=16, heads=1, dim_head=16, num_hierarchies=2,
                      block_repeats=(1, 1), mlp_mult=2),
})
