"""Parallel ViT (Touvron et al. 2022, "Three things everyone should know about Vision Transformers",
arXiv:2203.09795): each layer runs several attention branches side by side and adds their outputs,
then several MLP branches likewise, making the network wider and shallower at equal cost:
x = x + sum_i attn_i(norm_i(x)); x = x + sum_i mlp_i(norm'_i(x)).
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_vit import TokenBackbone, register_presets
from ssl_vit.layers import Attention, DropPath, Mlp, drop_path_rates

__all__ = ["ParallelViT", "ParallelBlock"]


class ParallelBlock(nn.Module):
    """`num_branches` pre-norm attention branches, then as many MLP branches: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, num_branches: int, *,
                 dropout: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norms1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_branches))
        self.attns = nn.ModuleList(Attention(dim, heads, dim_head, proj_drop=dropout) for _ in range(num_branches))
        self.norms2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_branches))
        self.mlps = nn.ModuleList(Mlp(dim, mlp_dim, dropout) for _ in range(num_branches))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # A handful of branches (2 in the paper): the loop is over modules, not over data.
        x = x + self.drop_path(sum(a(n(x), attn_mask=attn_mask) for n, a in zip(self.norms1, self.attns)))
        return x + self.drop_path(sum(m(n(x)) for n, m in zip(self.norms2, self.mlps)))


class ParallelTransformer(nn.Module):
    """A stack of ParallelBlocks, (B, N, D) -> (B, N, D); drop_path rises linearly with depth."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, num_branches: int, *,
                 dropout: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        rates = drop_path_rates(drop_path, depth)
        self.blocks = nn.ModuleList(
            ParallelBlock(dim, heads, dim_head, mlp_dim, num_branches, dropout=dropout, drop_path=r) for r in rates
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return x


class ParallelViT(TokenBackbone):
    """The seed's `vit_pytorch.parallel_vit.ViT`: class token, learned positions, parallel blocks.

    (B, C, H, W) -> logits (B, num_classes); `num_parallel_branches` branches per layer.
    """

    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        pool: str = "cls",
        num_parallel_branches: int = 2,
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        drop_path: float = 0.0,
        num_registers: int = 0,
    ) -> None:
        super().__init__()
        if num_parallel_branches < 1:
            raise ValueError(f"num_parallel_branches must be at least 1, got {num_parallel_branches}")
        self.build_tokens(image_size=image_size, patch_size=patch_size, dim=dim, channels=channels,
                          pos="learned", num_cls_tokens=1, pool=pool, emb_dropout=emb_dropout,
                          num_classes=num_classes, num_registers=num_registers)
        self.transformer = ParallelTransformer(dim, depth, heads, dim_head, mlp_dim, num_parallel_branches,
                                               dropout=dropout, drop_path=drop_path)
        self.norm = nn.LayerNorm(dim)


_SEED = dict(image_size=256, patch_size=16, dim=1024, depth=6, heads=8, mlp_dim=2048, num_parallel_branches=2)
_TINY = dict(image_size=32, patch_size=8, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128,
             num_parallel_branches=2)
register_presets(ParallelViT, {"parallel_vit": _SEED, "parallel_vit_tiny": _TINY})
