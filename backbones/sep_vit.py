"""SepViT (Li et al. 2022, "SepViT: Separable Vision Transformer"), with depthwise-separable
self-attention (DSSA) only, as in the vit-pytorch seed.

DSSA = depthwise self-attention (DWA): attention inside each window, with one learned window
token per window that summarises it; then pointwise self-attention (PWA): the window tokens,
through LayerNorm and GELU, give queries and keys of an attention *between windows*, whose values
are the windows' whole DWA feature maps. The seed ignored `window_size` (always 7) and `dim_head`
(always 32); both are honoured here, per stage.
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

__all__ = ["SepViT"]


class DSSA(AttentionBase):
    """Depthwise-separable self-attention over `window` x `window` windows, (B, H, W, C) -> same."""

    def __init__(self, dim: int, heads: int, dim_head: int, window: int, dropout: float = 0.0) -> None:
        super().__init__(dropout)
        self.heads, self.dim_head, self.window = heads, dim_head, window
        inner = heads * dim_head
        self.window_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.qkv = nn.Linear(dim, inner * 3, bias=False)
        # PWA: window tokens -> LayerNorm + GELU per head -> queries and keys (mixing heads, as the seed).
        self.token_norm = nn.LayerNorm(dim_head)
        self.token_act = nn.GELU()
        self.token_qk = nn.Linear(inner, inner * 2)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.window_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window
        nh, nw = h // ws, w // ws
        tokens = window_partition(x, ws).flatten(0, 2)  # (B*nW, ws*ws, C)
        tokens = torch.cat([self.window_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        q, k, v = rearrange(self.qkv(tokens), "n l (s h d) -> s n h l d", s=3, h=self.heads)
        out = self._attend(q, k, v)  # DWA: (B*nW, heads, 1 + ws*ws, d)
        summary, fmap = out[:, :, 0], out[:, :, 1:]
        # PWA: attention between the windows of one image; the value of a window is its whole map.
        summary = rearrange(summary, "(b n) h d -> b h n d", b=b)
        summary = rearrange(self.token_act(self.token_norm(summary)), "b h n d -> b n (h d)")
        wq, wk = rearrange(self.token_qk(summary), "b n (s h d) -> s b h n d", s=2, h=self.heads)
        values = rearrange(fmap, "(b n) h l d -> b h n (l d)", b=b)
        mixed = self._attend(wq, wk, values)  # (B, heads, nW, ws*ws*d)
        mixed = rearrange(mixed, "b h (y x) (l d) -> b y x l (h d)", y=nh, x=nw, d=self.dim_head)
        out = window_merge(mixed, ws)
        return self.proj_drop(self.proj(out))


class SepBlock(nn.Module):
    """x + DSSA(LN(x)), then x + FF(LN(x)); (B, H, W, C)."""

    def __init__(self, dim: int, heads: int, dim_head: int, window: int, ff_mult: int, dropout: float,
                 drop_path: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = DSSA(dim, heads, dim_head, window, dropout)
        self.mlp = Mlp(dim, int(dim * ff_mult), dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SepViT(HierarchicalBackbone):
    """SepViT: (B, C, H, W) -> logits (B, num_classes), or pooled features (B, dim * 2^(stages-1)).

    Each stage: an overlapping patch embedding (kernel 2s-1, stride s = 4 then 2), a PEG, then
    DSSA blocks. `heads` and `window_size` may be per stage. Inputs must be multiples of
    `size_multiple` = lcm over stages of stride * window.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        dim: int,
        depth: tuple[int, ...],
        heads,
        window_size=7,
        dim_head: int = 32,
        ff_mult: int = 4,
        channels: int = 3,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        image_size=None,
    ) -> None:
        super().__init__()
        if not isinstance(depth, (tuple, list)):
            raise ValueError(f"depth must be a tuple with one entry per stage, got {depth!r}")
        n = len(depth)
        heads = per_stage(heads, n, "heads")
        windows = per_stage(window_size, n, "window_size")
        dims = [dim * 2**i for i in range(n)]
        strides = [4 * 2**i for i in range(n)]
        self.windows = windows

        rates = drop_path_rates(drop_path, sum(depth))
        self.embeds = nn.ModuleList()
        self.pegs = nn.ModuleList()
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        dim_in, start = channels, 0
        for i in range(n):
            s = 4 if i == 0 else 2
            self.embeds.append(nn.Conv2d(dim_in, dims[i], 2 * s - 1, stride=s, padding=s - 1))
            self.pegs.append(PEG(dims[i]))
            self.layers.append(nn.Sequential(*(
                SepBlock(dims[i], heads[i], dim_head, windows[i], ff_mult, dropout, rates[start + j])
                for j in range(depth[i]))))
            start += depth[i]
            self.norms.append(nn.LayerNorm(dims[i]) if i < n - 1 else nn.Identity())
            dim_in = dims[i]
        self.norm = nn.LayerNorm(dims[-1])
        self.build_hierarchy(image_size=image_size, channels=channels, embed_dim=dims[-1], stem_dim=dim,
                             stem_stride=strides[0], final_stride=strides[-1],
                             size_multiple=stage_size_multiple(strides, windows), num_classes=num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.embeds[0](x)

    def run_stages(self, feat: torch.Tensor, image: torch.Tensor) -> StageOutput:
        x = to_channels_last(feat)
        for i in range(len(self.layers)):
            if i > 0:
                x = to_channels_last(self.embeds[i](to_channels_first(x)))
            x = self.norms[i](self.layers[i](self.pegs[i](x)))
        return StageOutput(to_channels_first(x), pooled=self.norm(x.mean(dim=(1, 2))))


register_presets(SepViT, {
    "sep_vit": dict(dim=32, dim_head=32, heads=(1, 2, 4, 8), depth=(1, 2, 6, 2), window_size=7, dropout=0.1,
                    image_size=224),
    "sep_vit_tiny": dict(dim=16, dim_head=16, heads=(1, 2), depth=(1, 1), window_size=(4, 2), ff_mult=2,
                         image_size=32),
})
