"""ViViT (Arnab et al. 2021): factorised space-time attention for video.

Two of the paper's variants, as in the seed:
- `factorized_encoder` (model 2): a spatial transformer inside each frame, then a temporal
  transformer over one token per frame.
- `factorized_self_attention` (model 3): every block attends within a frame, then across frames
  at each location, then applies the MLP.
Tokens are tubelets (B, t, n, D); the mask grid is (t, h, w). `frame_mask` (B, T) (True = frame
present, the seed's `mask` argument) removes missing frames from temporal attention.
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce
from timm.layers import trunc_normal_
from torch import nn

from ssl_vit import MASK_TOKEN, VIDEO, Backbone, BackboneOutput, register_presets
from ssl_vit.backbone import make_head
from ssl_vit.embed import LearnedPosEmbed, PatchEmbed3d, to_pair
from ssl_vit.layers import Attention, Mlp, Transformer
from ssl_vit.masking import replace_masked

__all__ = ["ViViT"]


class FactorizedBlock(nn.Module):
    """Spatial attention, temporal attention, MLP, each pre-norm with a residual.

    x (B, t, n, D) -> (B, t, n, D); temporal_mask (B, t) bool, True = frame may be attended to.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm_s, self.norm_t, self.norm_f = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.spatial = Attention(dim, heads, dim_head, attn_drop=dropout, proj_drop=dropout)
        self.temporal = Attention(dim, heads, dim_head, attn_drop=dropout, proj_drop=dropout)
        self.mlp = Mlp(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor, temporal_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, n, _ = x.shape
        s = rearrange(x, "b t n d -> (b t) n d")
        s = s + self.spatial(self.norm_s(s))
        s = rearrange(s, "(b t) n d -> (b n) t d", b=b)
        mask = None
        if temporal_mask is not None:
            mask = temporal_mask.repeat_interleave(n, dim=0)[:, None, None, :]
        s = s + self.temporal(self.norm_t(s), attn_mask=mask)
        s = s + self.mlp(self.norm_f(s))
        return rearrange(s, "(b n) t d -> b t n d", b=b)


class ViViT(Backbone):
    """ViViT. (B, C, T, H, W) -> logits (B, num_classes), or pooled features with num_classes=0.

    patch_tokens are the tubelet tokens after space(-time) attention, (B, t*h*w, D) row-major
    over (t, h, w); pooled is what the head reads (temporal class token, or the mean).
    """

    capabilities = frozenset({MASK_TOKEN, VIDEO})

    def __init__(
        self,
        *,
        image_size,
        image_patch_size,
        frames: int,
        frame_patch_size: int,
        num_classes: int,
        dim: int,
        spatial_depth: int,
        temporal_depth: int,
        heads: int,
        mlp_dim: int,
        pool: str = "cls",
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        variant: str = "factorized_encoder",
    ) -> None:
        super().__init__()
        if variant not in ("factorized_encoder", "factorized_self_attention"):
            raise ValueError(f"variant must be 'factorized_encoder' or 'factorized_self_attention', got {variant!r}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if variant == "factorized_self_attention" and spatial_depth != temporal_depth:
            raise ValueError("factorized_self_attention needs spatial_depth == temporal_depth")
        image_size, patch = to_pair(image_size), to_pair(image_patch_size)
        if frames % frame_patch_size or any(s % p for s, p in zip(image_size, patch)):
            raise ValueError(f"frames {frames} and image size {image_size} must be divisible by the patch sizes "
                             f"{frame_patch_size} and {patch}")
        self.embed_dim, self.in_channels, self.variant, self.pool = dim, channels, variant, pool
        self.default_size = (frames, *image_size)
        self.mask_unit = (frame_patch_size, *patch)
        self.size_multiple = max(patch)
        self.frame_patch_size = frame_patch_size
        self.patch_embed = PatchEmbed3d(self.mask_unit, channels, dim)
        self.pos_embed = LearnedPosEmbed(tuple(s // u for s, u in zip(self.default_size, self.mask_unit)), dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.emb_dropout = nn.Dropout(emb_dropout)
        use_cls = pool == "cls"
        self.spatial_cls = nn.Parameter(torch.zeros(1, 1, 1, dim)) if use_cls else None
        if variant == "factorized_encoder":
            self.temporal_cls = nn.Parameter(torch.zeros(1, 1, dim)) if use_cls else None
            self.spatial = Transformer(dim, spatial_depth, heads, dim_head, mlp_dim, dropout=dropout, attn_drop=dropout)
            self.spatial_norm = nn.LayerNorm(dim)
            self.temporal = Transformer(dim, temporal_depth, heads, dim_head, mlp_dim, dropout=dropout,
                                        attn_drop=dropout)
        else:
            self.blocks = nn.ModuleList(FactorizedBlock(dim, heads, dim_head, mlp_dim, dropout)
                                        for _ in range(spatial_depth))
        self.norm = nn.LayerNorm(dim)
        self.head = make_head(dim, num_classes)
        for p in (self.mask_token, self.spatial_cls, getattr(self, "temporal_cls", None)):
            if p is not None:
                trunc_normal_(p, std=0.02)

    def _temporal_mask(self, frame_mask: torch.Tensor | None, t: int) -> torch.Tensor | None:
        """(B, T) frames present -> (B, t) tubelets present (all frames of a tubelet present)."""
        if frame_mask is None:
            return None
        return reduce(frame_mask.bool(), "b (t f) -> b t", "min", f=self.frame_patch_size)[:, :t]

    def forward_features(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, keep=None, extra_tokens=None,
                         use_pos: bool = True, frame_mask: torch.Tensor | None = None) -> BackboneOutput:
        self.check_request(x, mask, keep, extra_tokens, use_pos)
        tokens, grid = self.patch_embed(x)
        if mask is not None:
            tokens = replace_masked(tokens, mask, self.mask_token)
        tokens = tokens + self.pos_embed(grid)
        t, h, w = grid
        b = tokens.shape[0]
        tokens = self.emb_dropout(rearrange(tokens, "b (t n) d -> b t n d", t=t))
        tmask = self._temporal_mask(frame_mask, t)
        r = 0
        if self.spatial_cls is not None:
            tokens = torch.cat([self.spatial_cls.expand(b, t, 1, -1), tokens], dim=2)
            r = 1
        if self.variant == "factorized_encoder":
            s = self.spatial_norm(self.spatial(rearrange(tokens, "b t n d -> (b t) n d")))
            s = rearrange(s, "(b t) n d -> b t n d", b=b)
            patches = s[:, :, r:]
            per_frame = s[:, :, 0] if r else patches.mean(2)
            if self.temporal_cls is not None:
                per_frame = torch.cat([self.temporal_cls.expand(b, -1, -1), per_frame], dim=1)
                if tmask is not None:
                    tmask = torch.cat([tmask.new_ones(b, 1), tmask], dim=1)
            attn_mask = None if tmask is None else tmask[:, None, None, :]
            z = self.norm(self.temporal(per_frame, attn_mask=attn_mask))
            pooled = z[:, 0] if self.pool == "cls" else z.mean(1)
            prefix = z[:, :1] if self.pool == "cls" else z[:, :0]
        else:
            for block in self.blocks:
                tokens = block(tokens, tmask)
            tokens = self.norm(tokens)
            patches = tokens[:, :, r:]
            prefix = tokens[:, :, :r].mean(1)  # one class token, averaged over frames
            pooled = prefix[:, 0] if r else patches.mean((1, 2))
        patch_tokens = rearrange(patches, "b t n d -> b (t n) d")
        return BackboneOutput(patch_tokens, prefix, pooled, (t, h, w), None)

    @property
    def num_prefix_tokens(self) -> int:  # type: ignore[override]
        return 1 if self.pool == "cls" else 0

    def forward(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; `mask` (B, T) is the seed's per-frame mask, True = frame present."""
        return self.forward_head(self.forward_features(video, frame_mask=mask).pooled)


_SEED = dict(image_size=128, frames=16, image_patch_size=16, frame_patch_size=2, dim=1024, spatial_depth=6,
             temporal_depth=6, heads=8, mlp_dim=2048, variant="factorized_encoder")
_TINY = dict(image_size=32, frames=4, image_patch_size=8, frame_patch_size=2, dim=64, spatial_depth=1,
             temporal_depth=1, heads=2, dim_head=32, mlp_dim=128)
register_presets(ViViT, {
    "vivit": _SEED,
    "vivit_tiny": _TINY,
    "vivit_fsa_tiny": {**_TINY, "variant": "factorized_self_attention"},
})
