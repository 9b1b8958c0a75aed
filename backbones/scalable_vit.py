"""ScalableViT (Yang et al. 2022, "ScalableViT: Rethinking the Context-oriented Generalization of
Vision Transformer").

Two attentions alternate in every stage: Scalable Self-Attention (SSA) reduces the keys and values
spatially by `reduction_factor` (a strided convolution) and sets the query/key width freely
(`ssa_dim_key`); Interactive Windowed Self-Attention (IWSA) attends inside windows and adds a Local
Interactive Module (LIM, a 3x3 convolution over the values) so windows exchange information.
Each attention is followed by its own feed-forward; a positional encoding generator (PEG, CPVT)
sits after the first block of each stage. The vit-pytorch seed ran SSA, FF, PEG, FF, IWSA (its
unpacking swapped the second feed-forward and IWSA); this file runs SSA, FF, [PEG], IWSA, FF.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ssl_vit import register_presets
from ssl_vit.layers import AttentionBase, DropPath, Mlp, drop_path_rates

from ._hierarchy import (
    PEG,
    HierarchicalBackbone,
    StageOutput,
    per_stage,
    stage_size_multiple,
    to_channels_first,
    to_channels_last,
    window_merge,
    window_partition,
)

__all__ = ["ScalableViT"]


class ScalableSelfAttention(AttentionBase):
    """SSA: queries at full resolution, keys/values from a `reduction` x `reduction` strided conv.

    x (B, H, W, C) -> (B, H, W, C). Queries and keys are `dim_key` wide per head, values `dim_value`.
    """

    def __init__(self, dim: int, heads: int, dim_key: int, dim_value: int, reduction: int,
                 dropout: float = 0.0) -> None:
        super().__init__(dropout)
        self.heads, self.reduction = heads, reduction
        self.dk, self.dv = dim_key * heads, dim_value * heads
        self.q = nn.Linear(dim, self.dk, bias=False)
        self.kv = nn.Conv2d(dim, self.dk + self.dv, reduction, stride=reduction, bias=False)
        self.proj = nn.Linear(self.dv, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        q = rearrange(self.q(x), "b x y (h d) -> b h (x y) d", h=self.heads)
        k, v = rearrange(self.kv(to_channels_first(x)), "b c x y -> b (x y) c").split([self.dk, self.dv], dim=-1)
        k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (k, v))
        out = self._attend(q, k, v)
        out = rearrange(out, "b h (x y) d -> b x y (h d)", x=h, y=w)
        return self.proj_drop(self.proj(out))


class InteractiveWindowAttention(AttentionBase):
    """IWSA: attention inside `window` x `window` windows (None: the whole map) plus the LIM,
    a 3x3 convolution over the full value map added to the attention output. (B, H, W, C) -> same."""

    def __init__(self, dim: int, heads: int, dim_key: int, dim_value: int, window: int | None,
                 dropout: float = 0.0) -> None:
        super().__init__(dropout)
        self.heads, self.window = heads, window
        self.dk, self.dv = dim_key * heads, dim_value * heads
        self.qkv = nn.Linear(dim, 2 * self.dk + self.dv, bias=False)
        self.lim = nn.Conv2d(self.dv, self.dv, 3, padding=1)
        self.proj = nn.Linear(self.dv, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        wh, ww = (h, w) if self.window is None else (self.window, self.window)
        q, k, v = self.qkv(x).split([self.dk, self.dk, self.dv], dim=-1)
        local = to_channels_last(self.lim(to_channels_first(v)))
        nh, nw = h // wh, w // ww
        q, k, v = (rearrange(window_partition(t, (wh, ww)), "b y x l (h d) -> (b y x) h l d", h=self.heads)
                   for t in (q, k, v))
        out = rearrange(self._attend(q, k, v), "(b y x) h l d -> b y x l (h d)", y=nh, x=nw)
        out = window_merge(out, (wh, ww)) + local
        return self.proj_drop(self.proj(out))


class Residual(nn.Module):
    """Pre-norm residual: x + drop_path(fn(norm(x))) on (B, H, W, C)."""

    def __init__(self, dim: int, fn: nn.Module, drop_path: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fn(self.norm(x)))


class ScalableStage(nn.Module):
    """`depth` pairs of (SSA block, IWSA block), each block attention + feed-forward; PEG after the
    first block. (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, depth: int, heads: int, ssa: tuple[int, int, int], iwsa: tuple[int, int, int | None],
                 ff_expansion: int, dropout: float, drop_paths: list[float]) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(depth):
            for j, attn in enumerate((ScalableSelfAttention(dim, heads, *ssa, dropout=dropout),
                                      InteractiveWindowAttention(dim, heads, *iwsa, dropout=dropout))):
                dp = drop_paths[2 * i + j]
                blocks += [Residual(dim, attn, dp), Residual(dim, Mlp(dim, dim * ff_expansion, dropout), dp)]
                if i == 0 and j == 0:
                    blocks.append(PEG(dim))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ScalableViT(HierarchicalBackbone):
    """ScalableViT: (B, C, H, W) -> logits (B, num_classes), or pooled features (B, 8 * dim) for 4 stages.

    A 7x7 stride-4 convolutional stem, then stages of width dim * 2^i separated by 3x3 stride-2
    convolutions. `heads`, `ssa_dim_key`, `ssa_dim_value`, `reduction_factor`, `iwsa_dim_key`,
    `iwsa_dim_value` and `window_size` are per stage (a scalar is repeated); a window of None is
    global. Inputs must be multiples of `size_multiple` = lcm over stages of stride * window.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        dim: int,
        depth: tuple[int, ...],
        heads,
        reduction_factor,
        window_size=None,
        iwsa_dim_key=32,
        iwsa_dim_value=32,
        ssa_dim_key=32,
        ssa_dim_value=32,
        ff_expansion_factor: int = 4,
        channels: int = 3,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        image_size=None,
    ) -> None:
        super().__init__()
        if not isinstance(depth, (tuple, list)):
            raise ValueError(f"depth must be a tuple with one entry per stage, got {depth!r}")
        n = len(depth)
        heads, ssa_dk, ssa_dv, red, iw_dk, iw_dv, windows = (
            per_stage(v, n, name) for v, name in (
                (heads, "heads"), (ssa_dim_key, "ssa_dim_key"), (ssa_dim_value, "ssa_dim_value"),
                (reduction_factor, "reduction_factor"), (iwsa_dim_key, "iwsa_dim_key"),
                (iwsa_dim_value, "iwsa_dim_value"), (window_size, "window_size")))
        dims = [dim * 2**i for i in range(n)]
        strides = [4 * 2**i for i in range(n)]

        self.patch_embed = nn.Conv2d(channels, dim, 7, stride=4, padding=3)
        rates = drop_path_rates(drop_path, 2 * sum(depth))
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        start = 0
        for i in range(n):
            self.layers.append(ScalableStage(
                dims[i], depth[i], heads[i], (ssa_dk[i], ssa_dv[i], red[i]), (iw_dk[i], iw_dv[i], windows[i]),
                ff_expansion_factor, dropout, rates[start:start + 2 * depth[i]]))
            start += 2 * depth[i]
            if i < n - 1:  # the seed normalises every stage output but the last, before downsampling
                self.norms.append(nn.LayerNorm(dims[i]))
                self.downsamples.append(nn.Conv2d(dims[i], dims[i + 1], 3, stride=2, padding=1))
        self.norm = nn.LayerNorm(dims[-1])
        self.build_hierarchy(image_size=image_size, channels=channels, embed_dim=dims[-1], stem_dim=dim,
                             stem_stride=strides[0], final_stride=strides[-1],
                             size_multiple=stage_size_multiple(strides + strides, list(windows) + list(red)),
                             num_classes=num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)

    def run_stages(self, feat: torch.Tensor, image: torch.Tensor) -> StageOutput:
        x = to_channels_last(feat)
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i < len(self.downsamples):
                x = to_channels_last(self.downsamples[i](to_channels_first(self.norms[i](x))))
        # The head reads LayerNorm(mean of the final tokens), as in the seed.
        return StageOutput(to_channels_first(x), pooled=self.norm(x.mean(dim=(1, 2))))


register_presets(ScalableViT, {
    "scalable_vit": dict(dim=64, heads=(2, 4, 8, 16), depth=(2, 2, 20, 2), ssa_dim_key=(40, 40, 40, 32),
                         reduction_factor=(8, 4, 2, 1), window_size=(64, 32, None, None), dropout=0.1,
                         image_size=256),
    "scalable_vit_tiny": dict(dim=16, heads=(1, 2), depth=(1, 1), ssa_dim_key=16, ssa_dim_value=16,
                              iwsa_dim_key=16, iwsa_dim_value=16, reduction_factor=(2, 1), window_size=(4, None),
                              ff_expansion_factor=2, image_size=32),
})
