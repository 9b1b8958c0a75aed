"""RegionViT: Regional-to-Local Attention for Vision Transformers (Chen et al. 2021, arXiv:2106.02689).

Two token streams: local tokens (a convolutional stem, stride `local_patch_size`) and regional
tokens (one per region of `window_size` x `window_size` local tokens, embedded from the image by
a convolution with the region's footprint as kernel and stride). Each R2L layer runs
regional self-attention (RSA) over all regional tokens, then local self-attention (LSA) inside
each region over its regional token plus its local tokens (with a relative position bias
between local tokens), then an MLP; RSA and LSA share their weights, as in the paper. Stages
downsample both streams by a stride-2 convolution; the head reads the mean regional token.

Unlike the seed, `channels` is honoured by both encoders and `local_patch_size` sets the local
stem's stride. The relative position table is built for `window_size` and indexed for the
window at hand, which is always `window_size` here (regions tile every stage exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vit import register_presets
from ssl_vit.layers import Attention, DropPath, Mlp, drop_path_rates

from ._hierarchy import (
    PEG,
    ChannelNorm,
    HierarchicalBackbone,
    StageOutput,
    to_channels_first,
    to_channels_last,
    window_merge,
    window_partition,
)

__all__ = ["RegionViT"]


def relative_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into a (2w-1)^2 table of 2-D offsets between positions of a window."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    rel = pos[:, :, None] - pos[:, None, :] + window - 1  # (2, N, N), each in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


class R2LLayer(nn.Module):
    """One regional-to-local layer on local (B, lh, lw, C) and regional (B, rh, rw, C) tokens."""

    def __init__(self, dim: int, heads: int, dim_head: int, window: int, attn_drop: float, ff_drop: float,
                 drop_path: float) -> None:
        super().__init__()
        self.window = (window, window)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, attn_drop=attn_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 4, ff_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, local: torch.Tensor, region: torch.Tensor,
                bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, rh, rw, c = region.shape
        r = region.reshape(b, rh * rw, c)
        r = r + self.drop_path(self.attn(self.norm1(r)))  # RSA
        windows = window_partition(local, self.window)  # (B, rh, rw, w*w, C)
        t = torch.cat([r.view(b, rh, rw, 1, c), windows], dim=3).flatten(0, 2)  # (B*rh*rw, 1 + w*w, C)
        t = t + self.drop_path(self.attn(self.norm1(t), attn_mask=bias))  # LSA, shared weights
        t = t + self.drop_path(self.mlp(self.norm2(t)))
        t = t.view(b, rh, rw, -1, c)
        return window_merge(t[:, :, :, 1:], self.window), t[:, :, :, 0]


class R2LStage(nn.Module):
    """Layers sharing one relative position table (heads, (2w-1)^2), zero bias to/from the regional token."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, window: int, attn_drop: float,
                 ff_drop: float, rates: list[float]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(R2LLayer(dim, heads, dim_head, window, attn_drop, ff_drop, r) for r in rates)
        self.relative_position_bias = nn.Parameter(torch.zeros(heads, (2 * window - 1) ** 2))
        self.register_buffer("index", relative_index(window), persistent=False)

    def forward(self, local: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bias = F.pad(self.relative_position_bias[:, self.index], (1, 0, 1, 0)).to(local.dtype)  # (heads, 1+N, 1+N)
        for layer in self.layers:
            local, region = layer(local, region, bias)
        return local, region


class RegionViT(HierarchicalBackbone):
    """RegionViT: (B, C, H, W) -> logits (B, num_classes), or pooled regional features (B, dim[-1]).

    patch_tokens are the final local tokens (normed), on a grid of stride
    local_patch_size * 2^(stages-1) (the mask unit); inputs must be multiples of the final
    region footprint, local_patch_size * window_size * 2^(stages-1). Hidden pixels are zeroed
    before both encoders, so masks hide cells from the regional tokens too.
    """

    def __init__(
        self,
        *,
        dim=(64, 128, 256, 512),
        depth=(2, 2, 8, 2),
        window_size: int = 7,
        num_classes: int = 1000,
        tokenize_local_3_conv: bool = False,
        local_patch_size: int = 4,
        use_peg: bool = False,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        channels: int = 3,
        heads: int = 4,
        dim_head: int = 32,
        drop_path: float = 0.0,
        image_size: int | tuple[int, int] = 224,
    ) -> None:
        super().__init__()
        dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,) * 4
        depths = tuple(depth) if isinstance(depth, (tuple, list)) else (depth,) * len(dims)
        if len(dims) != len(depths):
            raise ValueError(f"dim and depth need the same number of stages, got {len(dims)} and {len(depths)}")
        p, d0 = local_patch_size, dims[0]
        if tokenize_local_3_conv:
            if p != 4:
                raise ValueError("tokenize_local_3_conv is a stride-4 stem: it needs local_patch_size=4")
            self.local_encoder = nn.Sequential(
                nn.Conv2d(channels, d0, 3, 2, 1), ChannelNorm(d0), nn.GELU(),
                nn.Conv2d(d0, d0, 3, 2, 1), ChannelNorm(d0), nn.GELU(),
                nn.Conv2d(d0, d0, 3, 1, 1),
            )
        else:  # kernel 2p, stride p, padded by p in all (as the paper's 8/4 stem), so the grid is H / p
            pad = (p // 2, p - p // 2) * 2
            self.local_encoder = nn.Sequential(nn.ZeroPad2d(pad), nn.Conv2d(channels, d0, 2 * p, p))
        region = p * window_size
        self.region_encoder = nn.Conv2d(channels, d0, region, stride=region)
        rates = drop_path_rates(drop_path, sum(depths))
        self.downsample, self.pegs, self.stages = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        current, done = d0, 0
        for i, (d, n) in enumerate(zip(dims, depths)):
            self.downsample.append(nn.Conv2d(current, d, 3, stride=2, padding=1) if i else nn.Identity())
            self.pegs.append(PEG(d) if i and use_peg else nn.Identity())
            self.stages.append(R2LStage(d, n, heads, dim_head, window_size, attn_dropout, ff_dropout,
                                        rates[done:done + n]))
            current, done = d, done + n
        self.norm = nn.LayerNorm(current)
        scale = 2 ** (len(dims) - 1)
        self.build_hierarchy(image_size=image_size, channels=channels, embed_dim=current, stem_dim=d0, stem_stride=p,
                             final_stride=p * scale, size_multiple=region * scale, num_classes=num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_encoder(x)

    def run_stages(self, feat: torch.Tensor, image: torch.Tensor) -> StageOutput:
        region = self.region_encoder(image)  # the regional stream is embedded from the (hidden) pixels
        for down, peg, stage in zip(self.downsample, self.pegs, self.stages):
            local, reg = stage(peg(to_channels_last(down(feat))), to_channels_last(down(region)))
            feat, region = to_channels_first(local), to_channels_first(reg)
        final = to_channels_first(self.norm(local))
        return StageOutput(final, pooled=self.norm(reg.mean(dim=(1, 2))))  # the head: the mean regional token

_SEED = dict(dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), window_size=7, num_classes=1000,
             tokenize_local_3_conv=False, use_peg=False)
# Tiny: local stride 4 (as the seed's fixed stems), windows of 2x2 local tokens; 64 px -> 2x2 final grid.
_TINY = dict(image_size=64, dim=(32, 32, 64, 64), depth=(1, 1, 1, 1), window_size=2)

register_presets(RegionViT, {"regionvit": _SEED, "regionvit_tiny": _TINY})
