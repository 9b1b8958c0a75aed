"""CaiT (Touvron et al. 2021, "Going deeper with Image Transformers").

Two changes to ViT for depth: LayerScale (a learned per-channel factor on every residual branch,
initialised small) and a class-attention stage: the patch tokens attend among themselves (with
talking heads, Shazeer et al. 2020) and only in the last `cls_depth` layers does the class token
read them, the patches no longer being updated. `layer_dropout` is stochastic depth (DropPath per
sample, inactive in eval), not the seed's whole-layer skipping that also fired at inference.

`ClassAttentionBackbone` holds the patch-stage -> class-stage forward shared with XCiT.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_vit import BackboneOutput, TokenBackbone, register_presets
from ssl_vit.layers import Attention, Block, DropPath, LayerScale, Mlp

from .deep_vit import HeadMixAttention, block_stack

__all__ = ["CaiT", "ClassAttentionBlock", "layer_scale_init"]


def layer_scale_init(depth: int) -> float:
    """LayerScale's initial value for a network of `depth` blocks (CaiT, section 2):
    0.1 up to 18 blocks, 1e-5 up to 24, 1e-6 beyond."""
    if depth <= 18:
        return 0.1
    return 1e-5 if depth <= 24 else 1e-6


class ClassAttentionBlock(nn.Module):
    """Class attention: class tokens cls (B, R, D) read [cls, patches] (B, R+N, D); returns the
    updated cls (B, R, D). The patch tokens pass through unchanged (CaiT, section 3)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, *, dropout: float = 0.0,
                 drop_path: float = 0.0, layer_scale: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, proj_drop=dropout)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.ls2 = LayerScale(dim, layer_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, cls: torch.Tensor, patches: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        u = self.norm1(torch.cat([cls, patches], dim=1))
        cls = cls + self.drop_path(self.ls1(self.attn(u[:, : cls.shape[1]], attn_mask=attn_mask, context=u)))
        return cls + self.drop_path(self.ls2(self.mlp(self.norm2(cls))))


class ClassAttentionBackbone(TokenBackbone):
    """Patch tokens through `run_patch_stage`, then class tokens through `cls_blocks`.

    Subclasses build (with `build_tokens(..., num_cls_tokens=0, pool="mean")`, since the class
    token joins only at the class stage) `cls_token` (1, 1, D), `cls_blocks` and `norm`, and
    implement `run_patch_stage`. Extra tokens join the class token as further class-stage queries
    (CaiT's distillation token). Pooled = the class token after the final norm.
    """

    num_prefix_tokens = 1

    def build_class_stage(self, *, image_size, patch_size, dim: int, channels: int, emb_dropout: float,
                          num_classes: int, depth: int, cls_depth: int, heads: int, dim_head: int, mlp_dim: int,
                          dropout: float, layer_dropout: float, layer_scale: float | None) -> float:
        """Patch embedding and positions, the class token, the class-attention stage and the final
        norm, shared by CaiT and XCiT; returns the LayerScale init the patch stage should use."""
        self.build_tokens(image_size=image_size, patch_size=patch_size, dim=dim, channels=channels,
                          pos="learned", num_cls_tokens=0, pool="mean", emb_dropout=emb_dropout,
                          num_classes=num_classes)
        self.pool, self.num_prefix_tokens = "cls", 1  # the class token joins only at the class stage
        eps = layer_scale_init(depth) if layer_scale is None else layer_scale
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.cls_blocks = nn.ModuleList(
            ClassAttentionBlock(dim, heads, dim_head, mlp_dim, dropout=dropout, drop_path=layer_dropout,
                                layer_scale=eps)
            for _ in range(cls_depth)
        )
        self.norm = nn.LayerNorm(dim)
        return eps

    def run_patch_stage(self, tokens: torch.Tensor, grid: tuple[int, int],
                        attn_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        extra_tokens: torch.Tensor | None = None,
        use_pos: bool = True,
        kv_mask: torch.Tensor | None = None,
    ) -> BackboneOutput:
        """x (B, C, H, W) -> BackboneOutput with grid (H/p, W/p) and one class token.

        kv_mask (B, h, w) bool, True = the patch is left out of every attention's keys and values
        (the `kv_mask` capability).
        """
        self.check_request(x, mask, keep, extra_tokens, use_pos, kv_mask)
        tokens, grid = self.prepare_patches(x, mask=mask, keep=keep, use_pos=use_pos)
        b = tokens.shape[0]
        visible = None
        if kv_mask is not None:
            visible = ~kv_mask.flatten(1)
            if keep is not None:
                visible = torch.gather(visible, 1, keep)
        tokens = self.run_patch_stage(self.emb_dropout(tokens), tuple(grid),
                                      None if visible is None else visible[:, None, None, :])
        cls = self.cls_token.expand(b, -1, -1)
        if extra_tokens is not None:
            cls = torch.cat([cls, extra_tokens.to(cls.dtype)], dim=1)
        r = cls.shape[1]
        cls_mask = None
        if visible is not None:  # class tokens always see each other
            cls_mask = torch.cat([visible.new_ones(b, r), visible], dim=1)[:, None, None, :]
        for blk in self.cls_blocks:
            cls = blk(cls, tokens, cls_mask)
        h = self.norm(torch.cat([cls, tokens], dim=1))
        return BackboneOutput(h[:, r:], h[:, :r], h[:, 0], tuple(grid), keep)


class CaiT(ClassAttentionBackbone):
    """Class-Attention in Image Transformers. (B, C, H, W) -> logits (B, num_classes) or pooled (B, dim).

    Capabilities: token drop (the patch stage is global attention over patch tokens only), mask
    token, extra tokens (further class-stage tokens), pos_free (learned additive positions are
    the only positional signal; talking heads keep masked keys exactly out). LayerScale starts at
    `layer_scale_init(depth)` unless `layer_scale` is given. `image_size` / `patch_size` may be pairs.
    """

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
        layer_dropout: float = 0.0,
        channels: int = 3,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        eps = self.build_class_stage(image_size=image_size, patch_size=patch_size, dim=dim, channels=channels,
                                     emb_dropout=emb_dropout, num_classes=num_classes, depth=depth,
                                     cls_depth=cls_depth, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim,
                                     dropout=dropout, layer_dropout=layer_dropout, layer_scale=layer_scale)
        # Paper and timm: the same stochastic-depth rate in every layer.
        self.transformer = block_stack([
            Block(dim, heads, dim_head, mlp_dim, dropout=dropout, drop_path=layer_dropout, layer_scale=eps,
                  attn=HeadMixAttention(dim, heads, dim_head, pre_mix=True, post_mix=True, proj_drop=dropout))
            for _ in range(depth)
        ])

    def run_patch_stage(self, tokens: torch.Tensor, grid: tuple[int, int],
                        attn_mask: torch.Tensor | None) -> torch.Tensor:
        return self.run_blocks(tokens, attn_mask)


register_presets(CaiT, {
    "cait": dict(image_size=256, patch_size=32, dim=1024, depth=12, cls_depth=2, heads=16, mlp_dim=2048,
                 layer_dropout=0.05),
    "cait_tiny": dict(image_size=32, patch_size=8, dim=64, depth=2, cls_depth=1, heads=2, dim_head=32,
                      mlp_dim=128),
})
