"""XCiT (El-Nouby et al. 2021, "XCiT: Cross-Covariance Image Transformers").

Cross-covariance attention (XCA) attends across channels instead of tokens: per head, the (d, d)
map softmax(tau * q_hat^T k_hat) of L2-normalised queries and keys (normalised over the tokens)
mixes the channels of v, so the cost is linear in the number of tokens. A local patch interaction
(two depthwise convolutions on the token grid) lets tokens talk to their neighbours, and a
CaiT-style class-attention stage pools. LayerScale everywhere, initialised by total depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ssl_vit import EXTRA_TOKENS, MASK_TOKEN, register_presets
from ssl_vit.layers import AttentionBase, DropPath, LayerScale, Mlp

from .cait import ClassAttentionBackbone

__all__ = ["XCiT", "XCAttention"]


class XCAttention(AttentionBase):
    """Cross-covariance attention, (B, N, D) -> (B, N, D).

    Runs on `attend` (SDPA) by transposing: the d channels of a head become the "queries" and
    "keys", the N tokens their feature axis, so the map is (B, H, d, d). The learned per-head
    temperature multiplies the normalised queries and the SDPA scale is 1.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, *, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(attn_drop)
        self.heads = heads
        self.qkv = nn.Linear(dim, heads * dim_head * 3, bias=False)
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.proj = nn.Linear(heads * dim_head, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # One contiguous copy in (B, H, d, N): the norms over N then run on contiguous memory.
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 4, 1).contiguous().unbind(0)
        q = F.normalize(q, dim=-1) * self.temperature
        k = F.normalize(k, dim=-1)
        out = self._attend(q, k, v, scale=1.0)  # (B, H, d, N)
        return self.proj_drop(self.proj(rearrange(out, "b h d n -> b n (h d)")))


class LocalPatchInteraction(nn.Module):
    """Depthwise conv, BatchNorm, GELU, depthwise conv on the token grid: (B, h*w, D) -> (B, h*w, D)."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"local_patch_kernel_size must be odd, got {kernel_size}")
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)
        self.bn = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        img = rearrange(x, "b (h w) d -> b d h w", h=grid[0], w=grid[1])
        img = self.conv2(self.act(self.bn(self.conv1(img))))
        return rearrange(img, "b d h w -> b (h w) d")


class XCABlock(nn.Module):
    """x + XCA(LN x), x + LPI(LN x), x + MLP(LN x), each with LayerScale and stochastic depth."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, *, kernel_size: int,
                 dropout: float, drop_path: float, layer_scale: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = XCAttention(dim, heads, dim_head, proj_drop=dropout)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.local = LocalPatchInteraction(dim, kernel_size)
        self.ls2 = LayerScale(dim, layer_scale)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.ls3 = LayerScale(dim, layer_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path(self.ls2(self.local(self.norm2(x), grid)))
        return x + self.drop_path(self.ls3(self.mlp(self.norm3(x))))


class XCiT(ClassAttentionBackbone):
    """Cross-Covariance Image Transformer. (B, C, H, W) -> logits (B, num_classes) or pooled (B, dim).

    Capabilities: mask token and extra tokens (further class-stage tokens). No token drop: XCA's
    covariances and the local patch interaction's convolutions need the whole token grid. Not
    pos_free: the depthwise convolutions (and their zero padding) carry position as well as the
    learned embedding. LayerScale starts at `layer_scale_init(depth)` (0.1 up to 18 blocks, 1e-5
    up to 24, 1e-6 beyond; the seed chose it per layer index instead), or at `layer_scale`.
    `layer_dropout` is stochastic depth, inactive in eval. Non-square inputs work.
    """

    capabilities = frozenset({MASK_TOKEN, EXTRA_TOKENS})

    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes: int,
        dim: int,
        depth: int,
        cls_depth: int,
        heads: int,
        mlp_dim: int,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        local_patch_kernel_size: int = 3,
        layer_dropout: float = 0.0,
        channels: int = 3,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        eps = self.build_class_stage(image_size=image_size, patch_size=patch_size, dim=dim, channels=channels,
                                     emb_dropout=emb_dropout, num_classes=num_classes, depth=depth,
                                     cls_depth=cls_depth, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim,
                                     dropout=dropout, layer_dropout=layer_dropout, layer_scale=layer_scale)
        self.blocks = nn.ModuleList(
            XCABlock(dim, heads, dim_head, mlp_dim, kernel_size=local_patch_kernel_size, dropout=dropout,
                     drop_path=layer_dropout, layer_scale=eps)
            for _ in range(depth)
        )

    def run_patch_stage(self, tokens: torch.Tensor, grid: tuple[int, int],
                        attn_mask: torch.Tensor | None) -> torch.Tensor:
        for blk in self.blocks:
            tokens = blk(tokens, grid)
        return tokens


register_presets(XCiT, {
    "xcit": dict(image_size=256, patch_size=32, dim=1024, depth=12, cls_depth=2, heads=16, mlp_dim=2048,
                 layer_dropout=0.05, local_patch_kernel_size=3),
    "xcit_tiny": dict(image_size=32, patch_size=8, dim=64, depth=2, cls_depth=1, heads=2, dim_head=32,
                      mlp_dim=128),
})
