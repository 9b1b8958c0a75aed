"""LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference (Graham et al. 2021,
arXiv:2104.01136).

A four-convolution stem (stride 16), then stages of attention + MLP blocks on the feature map,
with BatchNorm instead of LayerNorm, a Hardswish before the attention's output projection, a
learned per-head attention bias indexed by the (|dy|, |dx|) offset between query and key instead
of absolute positions, and "shrink" attention blocks (queries subsampled by 2) between stages.

Unlike the seed, `channels` is honoured, and the attention bias is defined for any grid: offsets
beyond the table built for `image_size` reuse its last entry (the bias of the farthest offset
seen in training), so other input sizes and non-square inputs work.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ssl_vit import register_presets
from ssl_vit.backbone import make_head
from ssl_vit.layers import AttentionBase, DropPath, drop_path_rates

from ._hierarchy import HierarchicalBackbone, StageOutput

__all__ = ["LeViT"]


def _cast(val, n: int) -> tuple:
    val = tuple(val) if isinstance(val, (tuple, list)) else (val,)
    return (*val, *((val[-1],) * max(n - len(val), 0)))


def conv_bn(dim_in: int, dim_out: int, kernel: int = 1, stride: int = 1, zero_bn: bool = False) -> nn.Sequential:
    """Convolution without bias followed by BatchNorm (the paper's basic unit)."""
    bn = nn.BatchNorm2d(dim_out)
    if zero_bn:  # residual branches start at zero (paper, section 4.2 / timm's init)
        nn.init.zeros_(bn.weight)
    return nn.Sequential(nn.Conv2d(dim_in, dim_out, kernel, stride=stride, padding=kernel // 2, bias=False), bn)


class LeViTAttention(AttentionBase):
    """Attention on a map, (B, C, H, W) -> (B, C_out, H/s, W/s), s = 2 when `downsample`.

    logits = q k^T / sqrt(dim_key) + B[h, |dy|, |dx|], through `attend`'s additive float mask.
    """

    def __init__(self, dim: int, dim_out: int, heads: int, dim_key: int, dim_value: int, fmap: tuple[int, int],
                 downsample: bool, dropout: float, zero_bn: bool) -> None:
        super().__init__()
        self.heads, self.stride = heads, 2 if downsample else 1
        self.to_q = conv_bn(dim, heads * dim_key, stride=self.stride)
        self.to_k = conv_bn(dim, heads * dim_key)
        self.to_v = conv_bn(dim, heads * dim_value)
        self.act = nn.Hardswish()
        self.to_out = conv_bn(heads * dim_value, dim_out, zero_bn=zero_bn)
        self.drop = nn.Dropout(dropout)
        self.relative_position_bias = nn.Parameter(torch.zeros(heads, *fmap))

    def position_bias(self, grid: tuple[int, int]) -> torch.Tensor:
        """(heads, Nq, Nk) bias for a key grid (h, w); queries at stride `self.stride`."""
        h, w = grid
        table = self.relative_position_bias
        dev = table.device
        ky, kx = torch.arange(h, device=dev), torch.arange(w, device=dev)
        dy = (ky[:: self.stride, None] - ky[None]).abs().clamp(max=table.shape[1] - 1)  # (hq, h)
        dx = (kx[:: self.stride, None] - kx[None]).abs().clamp(max=table.shape[2] - 1)  # (wq, w)
        bias = table[:, dy][..., dx]  # (heads, hq, h, wq, w)
        return rearrange(bias, "n qy ky qx kx -> n (qy qx) (ky kx)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.to_q(x)
        hq, wq = q.shape[-2:]
        q, k, v = (rearrange(t, "b (n d) y x -> b n (y x) d", n=self.heads) for t in (q, self.to_k(x), self.to_v(x)))
        out = self._attend(q, k, v, attn_mask=self.position_bias(x.shape[-2:]).to(q.dtype))
        out = rearrange(out, "b n (y x) d -> b (n d) y x", y=hq, x=wq)
        return self.drop(self.to_out(self.act(out)))


class FeedForward(nn.Module):
    """1x1 conv-BN, Hardswish, 1x1 conv-BN on a map (B, C, H, W)."""

    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(conv_bn(dim, dim * mult), nn.Hardswish(), nn.Dropout(dropout),
                                 conv_bn(dim * mult, dim, zero_bn=True), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeViTBlock(nn.Module):
    """Attention (residual unless it changes the shape) then a residual MLP, on maps."""

    def __init__(self, dim: int, dim_out: int, heads: int, dim_key: int, dim_value: int, mlp_mult: int,
                 fmap: tuple[int, int], downsample: bool, dropout: float, drop_path: float) -> None:
        super().__init__()
        self.residual = not downsample and dim == dim_out
        self.attn = LeViTAttention(dim, dim_out, heads, dim_key, dim_value, fmap, downsample, dropout,
                                   zero_bn=self.residual)
        self.mlp = FeedForward(dim_out, mlp_mult, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(x)
        x = x + self.drop_path(a) if self.residual else a
        return x + self.drop_path(self.mlp(x))


class LeViT(HierarchicalBackbone):
    """LeViT: (B, C, H, W) -> logits (B, num_classes) (and distillation logits with
    `num_distill_classes`, as in the seed), or pooled features (B, dim[-1]).

    `dim`, `depth`, `heads` are per-stage tuples (or one value for all `stages`). Final stride
    16 * 2^(stages-1) is the mask unit; any multiple of 16 works (the last grids round up, a
    final cell may then cover less than `mask_unit` pixels).
    """

    def __init__(
        self,
        *,
        image_size,
        num_classes: int,
        dim,
        depth,
        heads,
        mlp_mult: int,
        stages: int = 3,
        dim_key: int = 32,
        dim_value: int = 64,
        dropout: float = 0.0,
        num_distill_classes: int | None = None,
        channels: int = 3,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        dims, depths, layer_heads = _cast(dim, stages), _cast(depth, stages), _cast(heads, stages)
        if not all(len(t) == stages for t in (dims, depths, layer_heads)):
            raise ValueError(f"dim, depth and heads must have at most stages={stages} entries")
        act = nn.Hardswish
        self.num_stages = stages
        self.stem_convs = nn.Sequential(
            conv_bn(channels, dims[0] // 8, 3, 2), act(), conv_bn(dims[0] // 8, dims[0] // 4, 3, 2), act(),
            conv_bn(dims[0] // 4, dims[0] // 2, 3, 2), act(), conv_bn(dims[0] // 2, dims[0], 3, 2),
        )
        size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        fmap = (max(size[0] // 16, 1), max(size[1] // 16, 1))
        total = sum(depths) + stages - 1
        rates = iter(drop_path_rates(drop_path, total))
        blocks = []
        for i in range(stages):
            blocks += [LeViTBlock(dims[i], dims[i], layer_heads[i], dim_key, dim_value, mlp_mult, fmap, False,
                                  dropout, next(rates)) for _ in range(depths[i])]
            if i < stages - 1:  # shrink attention: queries at stride 2, twice the heads
                blocks.append(LeViTBlock(dims[i], dims[i + 1], layer_heads[i] * 2, dim_key, dim_value, mlp_mult,
                                         fmap, True, dropout, next(rates)))
                fmap = ((fmap[0] + 1) // 2, (fmap[1] + 1) // 2)
        self.blocks = nn.Sequential(*blocks)
        self.build_hierarchy(image_size=image_size, channels=channels, embed_dim=dims[-1], stem_dim=dims[0],
                             stem_stride=16, final_stride=16 * 2 ** (stages - 1), size_multiple=16,
                             num_classes=num_classes)
        self.distill_head = make_head(dims[-1], num_distill_classes or 0)

    def mask_grid(self, size) -> tuple[int, int]:
        """Final grid: size / 16, then halved (rounding up) at each shrink attention, as in the paper."""
        size = tuple(int(s) for s in size)
        self.check_size(size)
        grid = [s // 16 for s in size[-2:]]
        for _ in range(self.num_stages - 1):
            grid = [(g + 1) // 2 for g in grid]
        return tuple(grid)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem_convs(x)

    def run_stages(self, feat: torch.Tensor, image: torch.Tensor) -> StageOutput:
        return StageOutput(self.blocks(feat))

    def forward(self, x: torch.Tensor):
        """Logits (B, num_classes); `(logits, distill_logits)` when built with num_distill_classes."""
        pooled = self.forward_features(x).pooled
        out = self.forward_head(pooled)
        if self.distill_head is not None:
            return out, self.distill_head(pooled)
        return out


_SEED = dict(image_size=224, stages=3, dim=(256, 384, 512), depth=4, heads=(4, 6, 8), mlp_mult=2, dropout=0.1)
# Tiny: two stages, final stride 32 (64 px -> 2x2 grid).
_TINY = dict(image_size=64, stages=2, dim=(64, 96), depth=1, heads=(2, 3), mlp_mult=2, dim_key=16, dim_value=32)

register_presets(LeViT, {"levit": _SEED, "levit_tiny": _TINY})
