"""CrossViT (Chen et al. 2021, "CrossViT: Cross-Attention Multi-Scale Vision Transformer").

Two ViT branches see the image at two patch sizes (small patches, narrow; large patches, wide).
After every round of per-branch self-attention, each branch's class token attends to the other
branch's patch tokens (projected to that branch's width and back), which is how the scales meet.

Interface mapping (one feature width for everything, D = sm_dim + lg_dim):
- mask grid = the large-patch grid (mask_unit = lg_patch_size);
- patch_tokens (B, h*w, D): per large cell, [mean of the small tokens inside it, the large token];
- prefix_tokens (B, 1, D) and pooled (B, D): [LN(small class token), LN(large class token)]; the
  head is one Linear on it, which equals the seed's sum of two per-branch heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vit import KV_MASK, MASK_TOKEN, POS_FREE, TOKEN_DROP, Backbone, BackboneOutput, register_presets
from ssl_vit.backbone import make_head
from ssl_vit.embed import LearnedPosEmbed, PatchEmbed, to_pair
from ssl_vit.layers import Attention, Transformer
from ssl_vit.masking import gather_tokens, replace_masked, upsample_mask

__all__ = ["CrossViT", "MultiScaleEncoder"]


class BranchEmbed(nn.Module):
    """One scale: patches -> tokens (B, N, D) with learned positions, a class token and a mask token."""

    def __init__(self, image_size: tuple[int, int], patch: int, channels: int, dim: int) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch, channels, dim)
        self.pos_embed = LearnedPosEmbed((image_size[0] // patch, image_size[1] // patch), dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        for p in (self.cls_token, self.cls_pos, self.mask_token):
            nn.init.trunc_normal_(p, std=0.02)


class EncoderStage(nn.Module):
    """A branch's self-attention blocks and final LayerNorm, (B, 1+N, D) -> (B, 1+N, D)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout=dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(self.transformer(x, attn_mask=attn_mask))


class CrossAttention(nn.Module):
    """A class token (B, 1, Din) attends to [itself, the other branch's patches (B, M, Dout)] at the
    other branch's width; returns the update (B, 1, Din)."""

    def __init__(self, dim_in: int, dim_out: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        self.project_in = nn.Linear(dim_in, dim_out) if dim_in != dim_out else nn.Identity()
        self.norm = nn.LayerNorm(dim_out)
        self.attn = Attention(dim_out, heads, dim_head, proj_drop=dropout)
        self.project_out = nn.Linear(dim_out, dim_in) if dim_in != dim_out else nn.Identity()

    def forward(self, cls: torch.Tensor, others: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm(self.project_in(cls))
        return self.project_out(self.attn(q, attn_mask=attn_mask, context=torch.cat([q, others], dim=1)))


class MultiScaleEncoder(nn.Module):
    """`depth` rounds of (small-branch stage, large-branch stage, `cross_attn_depth` class-token
    exchanges). forward(sm (B, 1+Ns, Ds), lg (B, 1+Nl, Dl)) -> (sm, lg), both branches' tokens,
    class token first: the output the seed README's `Extractor(v, layer_name='multi_scale_encoder')`
    hooks. Masks (B, 1, 1, 1+N) bool, True = may be attended to, keep tokens out of keys."""

    def __init__(self, *, depth: int, sm_dim: int, lg_dim: int, sm_enc: dict, lg_enc: dict, cross_attn_heads: int,
                 cross_attn_depth: int, cross_attn_dim_head: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            cross = nn.ModuleList()
            for _ in range(cross_attn_depth):
                cross.append(nn.ModuleList([
                    CrossAttention(sm_dim, lg_dim, cross_attn_heads, cross_attn_dim_head, dropout),
                    CrossAttention(lg_dim, sm_dim, cross_attn_heads, cross_attn_dim_head, dropout),
                ]))
            self.layers.append(nn.ModuleList([
                EncoderStage(sm_dim, dropout=dropout, **sm_enc), EncoderStage(lg_dim, dropout=dropout, **lg_enc), cross,
            ]))

    def forward(self, sm: torch.Tensor, lg: torch.Tensor, sm_mask: torch.Tensor | None = None,
                lg_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        for sm_stage, lg_stage, cross in self.layers:
            sm, lg = sm_stage(sm, sm_mask), lg_stage(lg, lg_mask)
            sm_cls, sm_patches, lg_cls, lg_patches = sm[:, :1], sm[:, 1:], lg[:, :1], lg[:, 1:]
            for sm_reads_lg, lg_reads_sm in cross:
                sm_cls = sm_cls + sm_reads_lg(sm_cls, lg_patches, lg_mask)
                lg_cls = lg_cls + lg_reads_sm(lg_cls, sm_patches, sm_mask)
            sm, lg = torch.cat([sm_cls, sm_patches], dim=1), torch.cat([lg_cls, lg_patches], dim=1)
        return sm, lg


class CrossViT(Backbone):
    """CrossViT. (B, C, H, W) -> logits (B, num_classes) or pooled (B, sm_dim + lg_dim).

    Capabilities, when lg_patch_size is a multiple of sm_patch_size (every small patch lies in one
    large cell): token drop (a kept large cell keeps its large token and the small tokens inside
    it; every attention is global, so both branches run on the subset), mask token (both branches'
    tokens of a hidden cell become that branch's mask token) and pos_free (learned additive
    positions are the only positional signal) and kv_mask (on both branches). Otherwise small
    patches straddle cells and only pos_free (use_pos=False) is offered. No extra tokens: the two
    branches have different widths and one class token each.
    """

    def __init__(
        self,
        *,
        image_size,
        num_classes: int,
        sm_dim: int,
        lg_dim: int,
        sm_patch_size: int = 12,
        sm_enc_depth: int = 1,
        sm_enc_heads: int = 8,
        sm_enc_mlp_dim: int = 2048,
        sm_enc_dim_head: int = 64,
        lg_patch_size: int = 16,
        lg_enc_depth: int = 4,
        lg_enc_heads: int = 8,
        lg_enc_mlp_dim: int = 2048,
        lg_enc_dim_head: int = 64,
        cross_attn_depth: int = 2,
        cross_attn_heads: int = 8,
        cross_attn_dim_head: int = 64,
        depth: int = 3,
        dropout: float = 0.1,
        emb_dropout: float = 0.1,
        channels: int = 3,
    ) -> None:
        super().__init__()
        size = to_pair(image_size)
        for p in (sm_patch_size, lg_patch_size):
            if size[0] % p or size[1] % p:
                raise ValueError(f"image_size {size} must be divisible by the patch sizes ({sm_patch_size}, "
                                 f"{lg_patch_size})")
        self.embed_dim, self.in_channels, self.default_size = sm_dim + lg_dim, channels, size
        self.mask_unit = lg_patch_size
        self.size_multiple = math.lcm(sm_patch_size, lg_patch_size)
        self.num_prefix_tokens = 1
        self.aligned = lg_patch_size % sm_patch_size == 0
        self.factor = lg_patch_size // sm_patch_size if self.aligned else 0
        self.capabilities = frozenset({TOKEN_DROP, MASK_TOKEN, POS_FREE, KV_MASK} if self.aligned else {POS_FREE})
        self.sm_dim, self.lg_dim = sm_dim, lg_dim
        self.sm_image_embedder = BranchEmbed(size, sm_patch_size, channels, sm_dim)
        self.lg_image_embedder = BranchEmbed(size, lg_patch_size, channels, lg_dim)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.multi_scale_encoder = MultiScaleEncoder(
            depth=depth, sm_dim=sm_dim, lg_dim=lg_dim,
            sm_enc=dict(depth=sm_enc_depth, heads=sm_enc_heads, dim_head=sm_enc_dim_head, mlp_dim=sm_enc_mlp_dim),
            lg_enc=dict(depth=lg_enc_depth, heads=lg_enc_heads, dim_head=lg_enc_dim_head, mlp_dim=lg_enc_mlp_dim),
            cross_attn_heads=cross_attn_heads, cross_attn_depth=cross_attn_depth,
            cross_attn_dim_head=cross_attn_dim_head, dropout=dropout,
        )
        self.sm_norm = nn.LayerNorm(sm_dim)
        self.lg_norm = nn.LayerNorm(lg_dim)
        self.head = make_head(sm_dim + lg_dim, num_classes)

    def small_index(self, keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Large-cell indices (B, K) -> the small-patch indices inside them (B, K*f*f), cell by cell."""
        f, w = self.factor, grid[1]
        a = torch.arange(f, device=keep.device)
        offsets = (a[:, None] * (w * f) + a[None, :]).flatten()  # (f*f,) within a cell
        base = (keep // w) * f * (w * f) + (keep % w) * f
        return (base[..., None] + offsets).flatten(1)

    def _branch(self, emb: BranchEmbed, x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None,
                use_pos: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, grid = emb.patch_embed(x)
        if mask is not None:
            tokens = replace_masked(tokens, mask, emb.mask_token[0, 0])
        if use_pos:
            tokens = tokens + emb.pos_embed(grid, tokens.device, tokens.dtype)
        if keep is not None:
            tokens = gather_tokens(tokens, keep)
        cls = emb.cls_token + emb.cls_pos if use_pos else emb.cls_token
        return self.emb_dropout(torch.cat([cls.expand(x.shape[0], -1, -1), tokens], dim=1)), grid

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
        """x (B, C, H, W) -> BackboneOutput on the large-patch grid, features sm_dim + lg_dim wide.

        kv_mask (B, h, w) bool on the large grid, True = the cell's tokens (both branches) are left
        out of every attention's keys and values (the `kv_mask` capability: aligned patch sizes).
        """
        grid = self.check_request(x, mask, keep, extra_tokens, use_pos, kv_mask)
        f = self.factor
        sm_mask = None if mask is None else upsample_mask(mask, f)
        sm_keep = None if keep is None else self.small_index(keep, grid)
        sm, sm_grid = self._branch(self.sm_image_embedder, x, sm_mask, sm_keep, use_pos)
        lg, lg_grid = self._branch(self.lg_image_embedder, x, mask, keep, use_pos)
        sm_attn = lg_attn = None
        if kv_mask is not None:
            lg_vis, sm_vis = ~kv_mask.flatten(1), ~upsample_mask(kv_mask, f).flatten(1)
            if keep is not None:
                lg_vis, sm_vis = torch.gather(lg_vis, 1, keep), torch.gather(sm_vis, 1, sm_keep)
            ones = lg_vis.new_ones(x.shape[0], 1)
            lg_attn = torch.cat([ones, lg_vis], 1)[:, None, None, :]
            sm_attn = torch.cat([ones, sm_vis], 1)[:, None, None, :]
        sm, lg = self.multi_scale_encoder(sm, lg, sm_attn, lg_attn)
        pooled = torch.cat([self.sm_norm(sm[:, 0]), self.lg_norm(lg[:, 0])], dim=-1)
        sm_patches, lg_patches = sm[:, 1:], lg[:, 1:]
        if keep is not None:  # small tokens arrive cell by cell
            sm_cells = sm_patches.reshape(x.shape[0], keep.shape[1], f * f, self.sm_dim).mean(2)
        else:
            img = sm_patches.transpose(1, 2).reshape(x.shape[0], self.sm_dim, *sm_grid)
            sm_cells = F.adaptive_avg_pool2d(img, lg_grid).flatten(2).transpose(1, 2)
        patches = torch.cat([sm_cells, lg_patches], dim=-1)
        return BackboneOutput(patches, pooled[:, None], pooled, tuple(lg_grid), keep)


register_presets(CrossViT, {
    "cross_vit": dict(image_size=256, depth=4, sm_dim=192, sm_patch_size=16, sm_enc_depth=2, sm_enc_heads=8,
                      sm_enc_mlp_dim=2048, lg_dim=384, lg_patch_size=64, lg_enc_depth=3, lg_enc_heads=8,
                      lg_enc_mlp_dim=2048, cross_attn_depth=2, cross_attn_heads=8),
    "cross_vit_tiny": dict(image_size=32, depth=1, sm_dim=32, sm_patch_size=4, sm_enc_depth=1, sm_enc_heads=2,
                           sm_enc_mlp_dim=64, sm_enc_dim_head=16, lg_dim=64, lg_patch_size=8, lg_enc_depth=1,
                           lg_enc_heads=2, lg_enc_mlp_dim=128, lg_enc_dim_head=32, cross_attn_depth=1,
                           cross_attn_heads=2, cross_attn_dim_head=16, dropout=0.0, emb_dropout=0.0),
})
