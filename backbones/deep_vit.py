"""DeepViT (Zhou et al. 2021, "DeepViT: Towards Deeper Vision Transformer").

Re-attention: after the softmax, the attention maps of the heads are mixed by a learned (H, H)
matrix and normalised across heads, so deep layers stop collapsing onto the same map. Everything
else is the plain ViT of `backbones.vit`; the mixing is an `Attention.post_softmax` hook.

`HeadMix` and `HeadMixAttention` are shared with CaiT (talking heads, Shazeer et al. 2020).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vit import TokenBackbone, register_presets
from ssl_vit.layers import Attention, Block, Transformer, drop_path_rates

__all__ = ["DeepViT", "HeadMix", "HeadMixAttention"]


class HeadMix(nn.Module):
    """Mix attention logits or weights across heads: (B, H, N, M) -> (B, H, N, M).

    out[:, g] = sum_h t[:, h] * weight[h, g]. With `norm`, the result is layer-normalised over the
    head axis (re-attention). The mixing starts as the identity, so a fresh model is a plain ViT.

    `key_mask` (bool, broadcastable to (B, 1, N, M), True = may attend) is the call's attention
    mask: masked keys are -inf logits (or 0 weights) in every head, and mixing would turn them into
    NaN or leak the norm's bias onto them, so they are zeroed before mixing and put back to `fill`
    afterwards.
    """

    def __init__(self, heads: int, *, norm: bool = False, fill: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(heads) + 0.02 * torch.randn(heads, heads))
        self.norm_weight = nn.Parameter(torch.ones(heads)) if norm else None
        self.norm_bias = nn.Parameter(torch.zeros(heads)) if norm else None
        self.fill = fill

    def forward(self, t: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = None
        if key_mask is not None and key_mask.dtype == torch.bool:
            hidden = ~key_mask
            t = t.masked_fill(hidden, 0.0)
        # Heads last, so the mix is one matmul and the norm a plain layer_norm (2x faster on CPU
        # than an einsum and a hand-written norm over dim 1); the result is a permuted view.
        t = t.permute(0, 2, 3, 1) @ self.weight
        if self.norm_weight is not None:
            t = F.layer_norm(t, (t.shape[-1],), self.norm_weight, self.norm_bias)
        t = t.permute(0, 3, 1, 2)
        if hidden is not None:
            t = t.masked_fill(hidden, self.fill)
        return t


class HeadMixAttention(Attention):
    """`Attention` with head mixing before the softmax (talking heads) and/or after it
    (talking heads, or re-attention with `post_norm`). (B, N, D) -> (B, N, D).

    The mixing goes through `attend`'s pre_softmax / post_softmax hooks, bound for each call to
    that call's attention mask, so `kv_mask` and cross-attention masks stay exact.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, *, pre_mix: bool = False, post_mix: bool = True,
                 post_norm: bool = False, **kwargs) -> None:
        super().__init__(dim, heads, dim_head, **kwargs)
        if pre_mix:
            self.pre_softmax = HeadMix(heads, fill=float("-inf"))
        if post_mix:
            self.post_softmax = HeadMix(heads, norm=post_norm, fill=0.0)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        pre = None if self.pre_softmax is None else functools.partial(self.pre_softmax, key_mask=attn_mask)
        post = None if self.post_softmax is None else functools.partial(self.post_softmax, key_mask=attn_mask)
        return super()._attend(q, k, v, attn_mask=attn_mask, pre_softmax=pre, post_softmax=post, **kwargs)


def block_stack(blocks: list[nn.Module]) -> Transformer:
    """A `Transformer` (called as transformer(x, attn_mask=...)) holding the given blocks."""
    stack = Transformer(1, 0, 1, 1, 1)  # depth 0: an empty stack with the shared forward
    stack.blocks.extend(blocks)
    return stack


class DeepViT(TokenBackbone):
    """ViT with re-attention in every block. (B, C, H, W) -> logits (B, num_classes) or pooled (B, dim).

    Capabilities are ViT's: token drop, mask token, extra tokens and pos_free (learned additive
    positions are the only positional signal; masked keys stay exactly out of the mixed maps).
    `image_size` / `patch_size` may be (H, W) pairs; any size divisible by the patch works.
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
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        drop_path: float = 0.0,
        num_registers: int = 0,
    ) -> None:
        super().__init__()
        self.build_tokens(image_size=image_size, patch_size=patch_size, dim=dim, channels=channels,
                          pos="learned", num_cls_tokens=1, pool=pool, emb_dropout=emb_dropout,
                          num_classes=num_classes, num_registers=num_registers)
        rates = drop_path_rates(drop_path, depth)
        self.transformer = block_stack([
            Block(dim, heads, dim_head, mlp_dim, dropout=dropout, drop_path=r,
                  attn=HeadMixAttention(dim, heads, dim_head, post_mix=True, post_norm=True, proj_drop=dropout))
            for r in rates
        ])
        self.norm = nn.LayerNorm(dim)


register_presets(DeepViT, {
    "deep_vit": dict(image_size=256, patch_size=32, dim=1024, depth=6, heads=16, mlp_dim=2048),
    "deep_vit_tiny": dict(image_size=32, patch_size=8, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128),
})
