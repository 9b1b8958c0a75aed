"""Learnable Memory ViT (Sandler et al. 2022, "Fine-tuning Image Transformers using Learnable
Memory", arXiv:2203.15243).

A trained ViT is frozen; each layer gets a few learned memory tokens that are appended to its
keys and values, plus a new task class token and head. The attention mask lets the new class token
see everything (image tokens and memories) while the original tokens see only each other, so the
original ViT's outputs are exactly unchanged and several tasks can share one backbone.

`MemoryViT(vit, num_memories_per_layer=...)` wraps a `backbones.vit.ViT`; `Adapter(vit=..., ...)` is
the seed's name and argument order. The ViT may also be given as a dict of its keyword arguments
(presets, and rebuilding an export).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import nn

from ssl_vit import (
    EXTRA_TOKENS,
    MASK_TOKEN,
    POS_FREE,
    TOKEN_DROP,
    Backbone,
    BackboneOutput,
    register_presets,
)
from ssl_vit.backbone import make_head
from ssl_vit.layers import Transformer

from .vit import ViT

__all__ = ["MemoryViT", "Adapter"]


class MemoryViT(Backbone):
    """A frozen ViT plus per-layer memories, a task class token and head.

    (B, C, H, W) -> logits (B, num_classes) read from the task class token. forward_features gives
    the ViT's own patch tokens (unchanged by the memories), prefix tokens [task class, ViT class,
    extra...] and pooled = the normed task class token.
    """

    capabilities = frozenset({TOKEN_DROP, MASK_TOKEN, EXTRA_TOKENS, POS_FREE})

    def __init__(self, vit: ViT | dict[str, Any], *, num_memories_per_layer: int = 10, num_classes: int = 0,
                 freeze_vit: bool = True) -> None:
        super().__init__()
        if isinstance(vit, dict):
            vit = ViT(**{"num_classes": 0, **vit})
        if not isinstance(vit, ViT) or not isinstance(vit.transformer, Transformer):
            raise TypeError("MemoryViT wraps a backbones.ViT built with its own blocks (no custom `transformer`)")
        if getattr(vit, "cls_token", None) is None:
            raise ValueError("MemoryViT needs a ViT with a class token (pool='cls' or 'mean' with one class token)")
        if num_memories_per_layer < 0:
            raise ValueError(f"num_memories_per_layer must be >= 0, got {num_memories_per_layer}")
        # Record the ViT by its arguments, so an export can rebuild this module without pickling one.
        self.init_config = {**self.init_config, "vit": dict(getattr(vit, "init_config", {}))}
        self.vit = vit
        if freeze_vit:
            vit.requires_grad_(False)
        dim = vit.embed_dim
        depth = len(vit.transformer.blocks)
        self.embed_dim, self.default_size, self.in_channels = dim, vit.default_size, vit.in_channels
        self.mask_unit, self.size_multiple = vit.mask_unit, vit.size_multiple
        self.num_prefix_tokens = 1 + vit.num_prefix_tokens
        self.memory_cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.memories = nn.Parameter(torch.zeros(depth, num_memories_per_layer, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # trainable even when the ViT is frozen
        self.norm = nn.LayerNorm(dim)
        self.head = make_head(dim, num_classes)
        for p in (self.memory_cls_token, self.memories, self.mask_token):
            trunc_normal_(p, std=0.02)

    def attention_mask(self, length: int, device: torch.device) -> torch.Tensor:
        """(1+L, 1+L+M) bool for [task class, L original tokens] queries over [those, memories] keys:
        the task class token sees everything, the original tokens only the original tokens."""
        m = self.memories.shape[1]
        mask = torch.zeros(1 + length, 1 + length + m, dtype=torch.bool, device=device)
        mask[0] = True
        mask[1:, 1 : 1 + length] = True
        return mask

    def forward_features(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        extra_tokens: torch.Tensor | None = None,
        use_pos: bool = True,
    ) -> BackboneOutput:
        """x (B, C, H, W) -> BackboneOutput; same token order and positions as the wrapped ViT."""
        self.check_request(x, mask, keep, extra_tokens, use_pos)
        vit = self.vit
        tokens, grid = vit.prepare_patches(x, mask=mask, keep=keep, use_pos=use_pos, mask_token=self.mask_token)
        b = tokens.shape[0]
        prefix = vit.prefix(b, use_pos)
        if extra_tokens is not None:
            prefix = torch.cat([prefix, extra_tokens.to(prefix.dtype)], dim=1)
        r = prefix.shape[1]
        h = vit.emb_dropout(torch.cat([prefix, tokens], dim=1))
        h = torch.cat([self.memory_cls_token.to(h.dtype).expand(b, -1, -1), h], dim=1)
        attn_mask = self.attention_mask(h.shape[1] - 1, h.device)
        for block, memories in zip(vit.transformer.blocks, self.memories):
            normed = block.norm1(h)
            # Memories join the keys and values only (un-normed, as in the paper's reference code).
            context = torch.cat([normed, memories.to(h.dtype).expand(b, -1, -1)], dim=1)
            h = h + block.drop_path1(block.ls1(block.attn(normed, attn_mask=attn_mask, context=context)))
            h = h + block.drop_path2(block.ls2(block.mlp(block.norm2(h))))
        task = self.norm(h[:, :1])
        own = vit.norm(h[:, 1:])
        prefix_out = torch.cat([task, own[:, :r]], dim=1)
        return BackboneOutput(own[:, r:], prefix_out, task[:, 0], tuple(grid), keep)

    def vit_output(self, out: BackboneOutput) -> torch.Tensor:
        """The wrapped ViT's pooled features from a MemoryViT output (for checks and reuse)."""
        prefix = out.prefix_tokens[:, 1:]
        return self.vit.pool_tokens(prefix, out.patch_tokens)


class Adapter(MemoryViT):
    """The seed's `Adapter(vit=..., num_memories_per_layer=10, num_classes=2)`: a MemoryViT head for
    one fine-tuning task over a frozen ViT."""

    def __init__(self, *, vit: ViT | dict[str, Any], num_memories_per_layer: int = 10, num_classes: int = 2,
                 freeze_vit: bool = True) -> None:
        super().__init__(vit, num_memories_per_layer=num_memories_per_layer, num_classes=num_classes,
                         freeze_vit=freeze_vit)


_VIT_SEED = dict(image_size=256, patch_size=16, dim=1024, depth=6, heads=8, mlp_dim=2048)
_VIT_TINY = dict(image_size=32, patch_size=8, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128)
register_presets(MemoryViT, {
    "memory_vit": dict(vit=_VIT_SEED, num_memories_per_layer=10),
    "memory_vit_tiny": dict(vit=_VIT_TINY, num_memories_per_layer=4),
})
