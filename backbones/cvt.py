"""CvT: Introducing Convolutions to Vision Transformers (Wu et al. 2021, arXiv:2103.15808).

Three stages; each starts with an overlapping strided convolution ("convolutional token
embedding") and runs pre-norm blocks whose queries, keys and values come from depth-wise
separable convolutions over the token map ("convolutional projection"), keys and values with a
stride to cut their number. No positional embedding: the convolutions carry position.

Seed-compatible keyword arguments (`s1_emb_dim`, ..., `s3_mlp_mult`, `dropout`, `channels`);
`model(img)` gives logits from the mean of the final map.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import trunc_normal_
from torch import nn

from ssl_vit import register_presets
from ssl_vit.layers import AttentionBase, DropPath, Mlp, drop_path_rates

from ._hierarchy import ChannelNorm, HierarchicalBackbone, StageOutput

__all__ = ["CvT"]

_STAGES = ("s1", "s2", "s3")


class SepConvProjection(nn.Module):
    """Depth-wise conv (with stride) -> BatchNorm -> point-wise linear, as in CvT section 3.2.

    (B, C, H, W) -> (B, H'*W', out) tokens.
    """

    def __init__(self, dim: int, out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel, stride=stride, padding=kernel // 2, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.pw = nn.Linear(dim, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.bn(self.dw(x)).flatten(2).transpose(1, 2))


class ConvAttention(AttentionBase):
    """Multi-head attention with convolutional projections: x (B, N, D) on grid (h, w) -> (B, N, D).

    Queries keep the full grid (stride 1); keys and values are taken at `kv_stride`.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, kernel: int, kv_stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = SepConvProjection(dim, inner, kernel, 1)
        self.to_kv = SepConvProjection(dim, inner * 2, kernel, kv_stride)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        fmap = rearrange(x, "b (h w) c -> b c h w", h=grid[0], w=grid[1])
        q = rearrange(self.to_q(fmap), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.to_kv(fmap), "b m (s h d) -> s b h m d", s=2, h=self.heads)
        out = self._attend(q, k, v)
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))


class CvTBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), x + mlp(norm(x)); (B, N, D) on grid (h, w)."""

    def __init__(self, dim: int, heads: int, dim_head: int, kernel: int, kv_stride: int, mlp_mult: int,
                 dropout: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, heads, dim_head, kernel, kv_stride, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_mult, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvEmbed(nn.Module):
    """Overlapping strided convolution + LayerNorm over channels: (B, C, H, W) -> (B, D, H/s, W/s)."""

    def __init__(self, in_dim: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        if kernel % 2 == 0:
            # padding kernel // 2 gives exactly H / stride cells only for odd kernels
            raise ValueError(f"CvT embedding kernels must be odd, got {kernel}")
        self.proj = nn.Conv2d(in_dim, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = ChannelNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class CvT(HierarchicalBackbone):
    """CvT: (B, C, H, W) -> logits (B, num_classes), or pooled features (B, s3_emb_dim).

    Stage i: ConvEmbed(s{i}_emb_kernel, s{i}_emb_stride) then s{i}_depth blocks with
    s{i}_heads heads of `dim_head`, conv projections of kernel s{i}_proj_kernel, keys/values
    at stride s{i}_kv_proj_stride. Any input size divisible by the product of the embedding
    strides works (the mask unit); the mask token goes in after stage 1's embedding.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        s1_emb_dim: int = 64, s1_emb_kernel: int = 7, s1_emb_stride: int = 4, s1_proj_kernel: int = 3,
        s1_kv_proj_stride: int = 2, s1_heads: int = 1, s1_depth: int = 1, s1_mlp_mult: int = 4,
        s2_emb_dim: int = 192, s2_emb_kernel: int = 3, s2_emb_stride: int = 2, s2_proj_kernel: int = 3,
        s2_kv_proj_stride: int = 2, s2_heads: int = 3, s2_depth: int = 2, s2_mlp_mult: int = 4,
        s3_emb_dim: int = 384, s3_emb_kernel: int = 3, s3_emb_stride: int = 2, s3_proj_kernel: int = 3,
        s3_kv_proj_stride: int = 2, s3_heads: int = 6, s3_depth: int = 10, s3_mlp_mult: int = 4,
        dropout: float = 0.0,
        channels: int = 3,
        dim_head: int = 64,
        drop_path: float = 0.0,
        image_size: int | tuple[int, int] = 224,
    ) -> None:
        super().__init__()
        args = locals()
        cfg = [{k: args[f"{s}_{k}"] for k in ("emb_dim", "emb_kernel", "emb_stride", "proj_kernel",
                                               "kv_proj_stride", "heads", "depth", "mlp_mult")} for s in _STAGES]
        total = sum(c["depth"] for c in cfg)
        rates = iter(drop_path_rates(drop_path, total))
        stride = 1
        in_dim = channels
        self.embeds = nn.ModuleList()
        self.stages = nn.ModuleList()
        for c in cfg:
            stride *= c["emb_stride"]
            self.embeds.append(ConvEmbed(in_dim, c["emb_dim"], c["emb_kernel"], c["emb_stride"]))
            self.stages.append(nn.ModuleList(
                CvTBlock(c["emb_dim"], c["heads"], dim_head, c["proj_kernel"], c["kv_proj_stride"],
                         c["mlp_mult"], dropout, next(rates))
                for _ in range(c["depth"])
            ))
            in_dim = c["emb_dim"]
        self.norm = nn.LayerNorm(in_dim)
        self.build_hierarchy(image_size=image_size, channels=channels, embed_dim=in_dim,
                             stem_dim=cfg[0]["emb_dim"], stem_stride=cfg[0]["emb_stride"],
                             final_stride=stride, num_classes=num_classes)
        self.apply(_init_weights)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.embeds[0](x)

    def run_stages(self, feat: torch.Tensor, image: torch.Tensor) -> StageOutput:
        for i, blocks in enumerate(self.stages):
            if i:
                feat = self.embeds[i](feat)
            b, c, h, w = feat.shape
            x = feat.flatten(2).transpose(1, 2)
            for block in blocks:
                x = block(x, (h, w))
            if i == len(self.stages) - 1:
                x = self.norm(x)
            feat = x.transpose(1, 2).reshape(b, c, h, w)
        return StageOutput(feat)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_SEED = dict(s3_heads=4)  # the README's example (its other arguments are the defaults)
# Tiny: final stride 8, so 32 px digits give a 4x4 grid and 16 px local crops a 2x2 one.
_TINY = dict(
    image_size=32,
    s1_emb_dim=32, s1_emb_kernel=3, s1_emb_stride=2, s1_heads=1, s1_depth=1,
    s2_emb_dim=64, s2_emb_kernel=3, s2_emb_stride=2, s2_heads=1, s2_depth=1,
    s3_emb_dim=128, s3_emb_kernel=3, s3_emb_stride=2, s3_heads=2, s3_depth=1,
)

register_presets(CvT, {"cvt": _SEED, "cvt_tiny": _TINY})
