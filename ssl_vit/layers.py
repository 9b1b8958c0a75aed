"""The layers every backbone is built from, written once: attention, MLP, transformer block.

Attention runs on `F.scaled_dot_product_attention` (fused kernels on GPU, flash/memory-efficient
where available). The explicit softmax path is taken only when a paper needs to touch the
attention matrix (talking heads, re-attention) or when a `Recorder` asks for the maps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from timm.layers import DropPath, LayerScale
from torch import nn

# timm's ViT LayerNorm epsilon, so weights exported in timm's layout give timm's features exactly.
LN_EPS = 1e-6

__all__ = [
    "LN_EPS", "drop_path_rates", "AttentionBase", "Attention", "Mlp", "Block", "Transformer", "attend", "DropPath",
    "LayerScale", "set_block_checkpointing",
]


def drop_path_rates(drop_path: float, n: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to `drop_path` over n blocks (Huang et al. 2016)."""
    return [drop_path * i / max(n - 1, 1) for i in range(n)]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    pre_softmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
    post_softmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention, q (B, H, N, d), k and v (B, H, M, d) -> (B, H, N, d).

    attn_mask: bool (True = may attend) or an additive float bias, broadcastable to (B, H, N, M).
    pre_softmax / post_softmax: maps on the (B, H, N, M) logits / weights (talking heads,
    Shazeer et al. 2020; re-attention, Zhou et al. 2021). With neither and no weights requested,
    this is exactly one `F.scaled_dot_product_attention` call.
    """
    if pre_softmax is None and post_softmax is None and not return_weights:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
        return out, None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    if pre_softmax is not None:
        logits = pre_softmax(logits)
    weights = logits.softmax(dim=-1)
    if post_softmax is not None:
        weights = post_softmax(weights)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return dropped @ v, weights


class AttentionBase(nn.Module):
    """What every attention module shares, so `Recorder` can find and read it.

    Subclasses call `self._attend(q, k, v, ...)`; when `record` is set the post-softmax weights
    (B, H, N, M) are kept in `last_attention`.
    """

    def __init__(self, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.attn_drop = attn_drop
        self.record = False
        self.last_attention: torch.Tensor | None = None
        self.pre_softmax: nn.Module | None = None
        self.post_softmax: nn.Module | None = None

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                pre_softmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
                post_softmax: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        """`attend` with this module's dropout, hooks and recording; `pre_softmax` / `post_softmax`
        replace the module's own hooks for this call (e.g. bound to the call's mask)."""
        out, weights = attend(
            q, k, v,
            dropout_p=self.attn_drop if self.training else 0.0,
            pre_softmax=self.pre_softmax if pre_softmax is None else pre_softmax,
            post_softmax=self.post_softmax if post_softmax is None else post_softmax,
            return_weights=self.record,
            **kwargs,
        )
        if self.record:
            self.last_attention = weights.detach()
        return out


class Attention(AttentionBase):
    """Multi-head attention (Vaswani et al. 2017) with a fused qkv projection.

    x (B, N, D) -> (B, N, D). With `context` (B, M, Dc = D) it is cross-attention: queries from x,
    keys and values from context, through the same weights (CrossViT, CaiT class attention).
    qk_norm normalises queries and keys per head (Dehghani et al. 2023, used by NaViT).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        *,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        out_dim: int | None = None,
    ) -> None:
        super().__init__(attn_drop)
        inner = heads * dim_head
        self.heads, self.dim_head, self.inner = heads, dim_head, inner
        self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(dim_head) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim_head) if qk_norm else nn.Identity()
        out_dim = dim if out_dim is None else out_dim
        project = not (heads == 1 and dim_head == dim == out_dim)
        self.proj = nn.Linear(inner, out_dim) if project else nn.Identity()
        self.proj_drop = nn.Dropout(proj_drop)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "b n (h d) -> b h n d", h=self.heads)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if context is None:
            q, k, v = rearrange(self.qkv(x), "b n (s h d) -> s b h n d", s=3, h=self.heads)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q = self._split(F.linear(x, w[: self.inner], None if b is None else b[: self.inner]))
            kv = F.linear(context, w[self.inner :], None if b is None else b[self.inner :])
            k, v = rearrange(kv, "b m (s h d) -> s b h m d", s=2, h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        out = self._attend(q, k, v, attn_mask=attn_mask)
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))


class Mlp(nn.Module):
    """Position-wise feed-forward: Linear, GELU, Linear (with dropout), (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, out_dim: int | None = None,
                 act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim if out_dim is None else out_dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); (B, N, D) -> (B, N, D).

    Optional LayerScale (CaiT, Touvron et al. 2021) and stochastic depth (DropPath). Parameter
    names follow timm's `Block` so weights map onto timm one to one.

    With `grad_checkpointing` set (see `set_block_checkpointing`), a training forward with grad
    enabled keeps only the block's input and recomputes its activations in backward
    (`torch.utils.checkpoint`, non-reentrant, RNG state preserved so dropout and drop-path match).
    """

    grad_checkpointing: bool = False

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        *,
        dropout: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = attn if attn is not None else Attention(
            dim, heads, dim_head, qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop, proj_drop=dropout
        )
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, attn_mask, use_reentrant=False)
        return self._forward(x, attn_mask)

    def _forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class Transformer(nn.Module):
    """A stack of `Block`s, (B, N, D) -> (B, N, D). `drop_path` rises linearly with depth."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, *,
                 dropout: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, **block_kwargs) -> None:
        super().__init__()
        rates = drop_path_rates(drop_path, depth)
        self.blocks = nn.ModuleList(
            Block(dim, heads, dim_head, mlp_dim, dropout=dropout, attn_drop=attn_drop, drop_path=r, **block_kwargs)
            for r in rates
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return x


def set_block_checkpointing(module: nn.Module, enabled: bool = True) -> int:
    """Switch activation checkpointing on or off in every `Block` inside `module` (itself included);
    returns how many blocks were switched (0: the module has none of the shared blocks)."""
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.grad_checkpointing = enabled
    return len(blocks)
