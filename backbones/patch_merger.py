"""ViT with a Patch Merger (Renggli et al. 2022, "Learning to Merge Tokens in Vision Transformers",
arXiv:2202.12015).

A PatchMerger turns N tokens into M by attention pooling with M learned queries: weights
softmax(Q norm(X)^T / sqrt(D)) (M, N), output weights @ norm(X). Placed midway through the
transformer it cuts the cost of the remaining layers to M tokens.

Interface: the patch grid exists only up to the merge, so `patch_tokens` are the patch tokens at
the merge point (after their own final norm), in grid order; the M merged tokens, after the rest of
the transformer and the final norm, are the `prefix_tokens` (register-like summaries of the image)
and their mean is `pooled`, which the head reads (the seed mean-pools the merged tokens too).
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_vit import EXTRA_TOKENS, MASK_TOKEN, POS_FREE, TOKEN_DROP, BackboneOutput, TokenBackbone, register_presets
from ssl_vit.layers import Transformer, attend

__all__ = ["PatchMergerViT", "PatchMerger"]


class PatchMerger(nn.Module):
    """(B, N, D) -> (B, num_tokens_out, D): learned queries attend over the normed tokens.

    `key_mask` (B, N) bool, True = the token may be merged, leaves padding out.
    """

    def __init__(self, dim: int, num_tokens_out: int) -> None:
        super().__init__()
        self.scale = dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(num_tokens_out, dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(x)
        kv = x.unsqueeze(1)  # one head: (B, 1, N, D)
        q = self.queries.to(x.dtype).expand(x.shape[0], 1, -1, -1)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out, _ = attend(q, kv, kv, attn_mask=attn_mask, scale=self.scale)
        return out.squeeze(1)


class PatchMergerViT(TokenBackbone):
    """The seed's `vit_pytorch.vit_with_patch_merger.ViT`: no class token, learned positions,
    mean pooling of the merged tokens. (B, C, H, W) -> logits (B, num_classes).

    patch_merge_layer: merge after this many layers (default: depth // 2, as in the paper).
    No kv_mask: the merger mixes every token into each merged one.
    """

    capabilities = frozenset({TOKEN_DROP, MASK_TOKEN, EXTRA_TOKENS, POS_FREE})

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
        patch_merge_layer: int | None = None,
        patch_merge_num_tokens: int = 8,
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        layer = depth // 2 if patch_merge_layer is None else int(patch_merge_layer)
        if not 1 <= layer <= depth:
            raise ValueError(f"patch_merge_layer must be between 1 and depth={depth}, got {layer}")
        if patch_merge_num_tokens < 1:
            raise ValueError(f"patch_merge_num_tokens must be positive, got {patch_merge_num_tokens}")
        self.build_tokens(image_size=image_size, patch_size=patch_size, dim=dim, channels=channels,
                          pos="learned", num_cls_tokens=0, pool="mean", emb_dropout=emb_dropout,
                          num_classes=num_classes)
        self.num_prefix_tokens = patch_merge_num_tokens  # the merged tokens are reported as prefix tokens
        self.patch_merge_layer = layer
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout=dropout, drop_path=drop_path)
        self.patch_merger = PatchMerger(dim, patch_merge_num_tokens)
        self.patch_norm = nn.LayerNorm(dim)  # the patch tokens at the merge point
        self.norm = nn.LayerNorm(dim)        # the merged tokens at the end

    def forward_features(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        extra_tokens: torch.Tensor | None = None,
        use_pos: bool = True,
    ) -> BackboneOutput:
        """x (B, C, H, W) -> patch_tokens (B, N, D) at the merge, prefix_tokens (B, M [+E], D),
        pooled (B, D) = mean of the merged tokens."""
        self.check_request(x, mask, keep, extra_tokens, use_pos)
        tokens, grid = self.prepare_patches(x, mask=mask, keep=keep, use_pos=use_pos)
        e = 0 if extra_tokens is None else extra_tokens.shape[1]
        h = tokens if extra_tokens is None else torch.cat([extra_tokens.to(tokens.dtype), tokens], dim=1)
        h = self.emb_dropout(h)
        blocks = self.transformer.blocks
        for block in blocks[: self.patch_merge_layer]:
            h = block(h)
        patches = self.patch_norm(h[:, e:])
        # Extra tokens (e.g. distillation) pass the merge untouched and keep running.
        h = torch.cat([self.patch_merger(h[:, e:]), h[:, :e]], dim=1)
        for block in blocks[self.patch_merge_layer:]:
            h = block(h)
        h = self.norm(h)
        merged = h[:, : h.shape[1] - e]
        return BackboneOutput(patches, h, merged.mean(dim=1), tuple(grid), keep)


_SEED = dict(image_size=256, patch_size=16, dim=1024, depth=12, heads=8, patch_merge_layer=6,
             patch_merge_num_tokens=8, mlp_dim=2048)
_TINY = dict(image_size=32, patch_size=8, dim=64, depth=2, heads=2, dim_head=32, patch_merge_layer=1,
             patch_merge_num_tokens=4, mlp_dim=128)
register_presets(PatchMergerViT, {"patch_merger_vit": _SEED, "patch_merger_vit_tiny": _TINY})
