"""Twins-SVT: Revisiting the Design of Spatial Attention in Vision Transformers (Chu et al. 2021,
arXiv:2104.13840).

Four stages. Each embeds with a strided patch convolution and alternates locally-grouped
self-attention (LSA: full attention inside non-overlapping windows) and global sub-sampled
attention (GSA: every token attends to keys/values taken from a k x k strided convolution of the
map), each followed by an MLP. A PEG (depth-wise convolution, CPVT) after each stage's first
block is the only positional signal; global average pooling feeds the head.

Seed-compatible keyword arguments (`s1_emb_dim`, ..., `peg_kernel_size`, `dropout`), plus
`channels`, `heads`, `dim_head`, `mlp_mult` (the seed's fixed 8, 64, 4 by default).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ssl_vit import register_presets
from ssl_vit.layers import Attention, DropPath, Mlp, drop_path_rates

from ._hierarchy import (
    PEG,
    ChannelNorm,
    HierarchicalBackbone,
    StageOutput,
    check_divisible,
    to_channels_first,
    to_channels_last,
    window_merge,
    window_partition,
)

__all__ = ["TwinsSVT"]

_STAGES = ("s1", "s2", "s3", "s4")


class LocalAttention(nn.Module):
    """LSA: attention inside (window x window) groups; x (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, heads: int, dim_head: int, window: int, dropout: float) -> None:
        super().__init__()
        self.window = (window, window)
        self.attn = Attention(dim, heads, dim_head, proj_drop=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = window_partition(x, self.window)  # (B, nh, nw, w*w, C)
        out = self.attn(windows.flatten(0, 2))
        return window_merge(out.view(windows.shape), self.window)


class GlobalSubsampledAttention(nn.Module):
    """GSA: queries from every token, keys/values from a k x k stride-k convolution of the map
    (then LayerNorm, as in the paper); x (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, heads: int, dim_head: int, k: int, dropout: float) -> None:
        super().__init__()
        self.k = k
        self.sr = nn.Conv2d(dim, dim, k, stride=k) if k > 1 else nn.Identity()
        self.sr_norm = nn.LayerNorm(dim) if k > 1 else nn.Identity()
        self.attn = Attention(dim, heads, dim_head, proj_drop=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        if self.k > 1:
            ctx = self.sr(to_channels_first(x)).flatten(2).transpose(1, 2)
            out = self.attn(tokens, context=self.sr_norm(ctx))
        else:
            out = self.attn(tokens)
        return out.view(b, h, w, c)


class TwinsBlock(nn.Module):
    """Pre-norm residual attention (local or global) then MLP, on (B, H, W, C)."""

    def __init__(self, attn: nn.Module, dim: int, mlp_mult: int, dropout: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_mult, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerge(nn.Module):
    """Patch embedding: p x p stride-p conv + channel LayerNorm, (B, C, H, W) -> (B, D, H/p, W/p)."""

    def __init__(self, dim_in: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim_in, dim, patch, stride=patch)
        self.norm = ChannelNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class TwinsSVT(HierarchicalBackbone):
    """Twins-SVT: (B, C, H, W) -> logits (B, num_classes), or pooled features (B, s4_emb_dim).

    Stage i has (1 + s{i}_depth) LSA/GSA pairs (GSA only in the last stage, as in the seed), a PEG
    after the first. Mask unit: the product of the patch sizes; size multiple: the lcm over stages
    of stride x window and stride x global_k (windows must tile every stage's grid).
    """

    hide_before_stem = False  # non-overlapping patches: hidden pixels reach only hidden cells

    def __init__(
        self,
        *,
        num_classes: int,
        s1_emb_dim: int = 64, s1_patch_size: int = 4, s1_local_patch_size: int = 7, s1_global_k: int = 7,
        s1_depth: int = 1,
        s2_emb_dim: int = 128, s2_patch_size: int = 2, s2_local_patch_size: int = 7, s2_global_k: int = 7,
        s2_depth: int = 1,
        s3_emb_dim: int = 256, s3_patch_size: int = 2, s3_local_patch_size: int = 7, s3_global_k: int = 7,
        s3_depth: int = 5,
        s4_emb_dim: int = 512, s4_patch_size: int = 2, s4_local_patch_size: int = 7, s4_global_k: int = 7,
        s4_depth: int = 4,
        peg_kernel_size: int = 3,
        dropout: float = 0.0,
        channels: int = 3,
        heads: int = 8,
        dim_head: int = 64,
        mlp_mult: int = 4,
        drop_path: float = 0.0,
        image_size: int | tuple[int, int] = 224,
    ) -> None:
        super().__init__()
        args = locals()
        cfg = [{k: args[f"{s}_{k}"] for k in ("emb_dim", "patch_size", "local_patch_size", "global_k", "depth")}
               for s in _STAGES]
        n_blocks = [(c["depth"] + 1) * (1 if i == 3 else 2) for i, c in enumerate(cfg)]
        rates = iter(drop_path_rates(drop_path, sum(n_blocks)))
        self.embeds, self.stages, self.pegs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.windows: list[tuple[int, int]] = []
        stride, multiple, dim_in = 1, 1, channels
        for i, c in enumerate(cfg):
            dim, last = c["emb_dim"], i == len(cfg) - 1
            stride *= c["patch_size"]
            self.embeds.append(PatchMerge(dim_in, dim, c["patch_size"]))
            blocks = []
            for _ in range(c["depth"] + 1):
                if not last:
                    blocks.append(TwinsBlock(LocalAttention(dim, heads, dim_head, c["local_patch_size"], dropout),
                                             dim, mlp_mult, dropout, next(rates)))
                blocks.append(TwinsBlock(GlobalSubsampledAttention(dim, heads, dim_head, c["global_k"], dropout),
                                         dim, mlp_mult, dropout, next(rates)))
            self.stages.append(nn.ModuleList(blocks))
            self.pegs.append(PEG(dim, peg_kernel_size))
            self.windows.append((1 if last else c["local_patch_size"], c["global_k"]))
            multiple = math.lcm(multiple, stride * math.lcm(*self.windows[-1]))
            dim_in = dim
        self.first_pair = [1 if i == len(cfg) - 1 else 2 for i in range(len(cfg))]  # blocks before the PEG
        self.norm = nn.LayerNorm(dim_in)
        self.build_hierarchy(image_size=image_size, channels=channels, embed_dim=dim_in, stem_dim=cfg[0]["emb_dim"],
                             stem_stride=cfg[0]["patch_size"], final_stride=stride,
                             size_multiple=math.lcm(multiple, stride), num_classes=num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.embeds[0](x)

    def run_stages(self, feat: torch.Tensor, image: torch.Tensor) -> StageOutput:
        for i, blocks in enumerate(self.stages):
            if i:
                feat = self.embeds[i](feat)
            x = to_channels_last(feat)
            check_divisible(self, x.shape[1:3], (self.windows[i][0],) * 2, "local windows")
            check_divisible(self, x.shape[1:3], (self.windows[i][1],) * 2, "global sub-sampling cells")
            for j, block in enumerate(blocks):
                x = block(x)
                if j + 1 == self.first_pair[i]:
                    x = self.pegs[i](x)
            if i == len(self.stages) - 1:
                x = self.norm(x)
            feat = to_channels_first(x)
        return StageOutput(feat)


_SEED = {}  # the README's example is the defaults
# Tiny: strides 2, 4, 8, 8 (final grid 4x4 at 32 px), windows 4, 4, 2.
_TINY = dict(
    image_size=32,  # heads, dim_head, mlp_mult: the seed's fixed 8, 64, 4 (so the benchmark can match it)
    s1_emb_dim=32, s1_patch_size=2, s1_local_patch_size=4, s1_global_k=4, s1_depth=0,
    s2_emb_dim=64, s2_patch_size=2, s2_local_patch_size=4, s2_global_k=2, s2_depth=0,
    s3_emb_dim=128, s3_patch_size=2, s3_local_patch_size=2, s3_global_k=2, s3_depth=0,
    s4_emb_dim=128, s4_patch_size=1, s4_local_patch_size=1, s4_global_k=1, s4_depth=0,
)

register_presets(TwinsSVT, {"twins_svt": _SEED, "twins_svt_tiny": _TINY})
