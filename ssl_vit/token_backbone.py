"""The isotropic-backbone skeleton shared by ViT and its token-based relatives.

Order of operations (one place, so every capability behaves the same on every such model):
patch embedding -> mask token on hidden cells -> positions -> `keep` gather -> prefix tokens
(+ extra tokens) -> transformer -> final norm -> pooling.
A subclass builds the pieces and overrides only what its paper changes (usually `run_blocks`).

Prefix tokens are laid out as in timm's VisionTransformer: class tokens, then register tokens, then
extra tokens (the distillation token), then the patch tokens. Register tokens (Darcet et al. 2024,
"Vision Transformers Need Registers") are learned inputs with no position and no output role: they
are counted in `num_prefix_tokens` and returned in `prefix_tokens`, never pooled, masked or dropped.
"""

from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from torch import nn

from .backbone import (
    EXTRA_TOKENS,
    KV_MASK,
    MASK_TOKEN,
    POS_FREE,
    TOKEN_DROP,
    VIDEO,
    Backbone,
    BackboneOutput,
    make_head,
)
from .embed import LearnedPosEmbed, PatchEmbed, PatchEmbed3d, SinCosPosEmbed, to_pair
from .errors import BadArgument
from .masking import gather_tokens, replace_masked


class TokenBackbone(Backbone):
    """Patch tokens through one transformer: (B, C, H, W) -> BackboneOutput with grid (H/p, W/p).

    Subclasses call `build_tokens(...)` in their constructor, set `self.transformer` (called as
    `transformer(x, attn_mask=...)` on (B, R+N, D), or any module taking (B, L, D)) and `self.norm`,
    then optionally override `run_blocks`. A subclass whose `forward_features` does not take
    `kv_mask` (or whose blocks ignore `attn_mask`) declares its capabilities without `kv_mask`.
    """

    capabilities = frozenset({TOKEN_DROP, MASK_TOKEN, EXTRA_TOKENS, POS_FREE, KV_MASK})
    num_registers: int = 0  # register tokens, after the class tokens (Darcet et al. 2024)

    def build_tokens(
        self,
        *,
        image_size,
        patch_size,
        dim: int,
        channels: int = 3,
        pos: str = "learned",
        num_cls_tokens: int = 1,
        pool: str = "cls",
        emb_dropout: float = 0.0,
        num_classes: int = 0,
        frames: int | None = None,
        frame_patch_size: int | None = None,
        num_registers: int = 0,
        pos_init_std: float = 0.02,
    ) -> None:
        """Patch embedding, positions, class, register and mask tokens, head.

        With `frames` and `frame_patch_size` the backbone takes video (B, C, T, H, W) and its
        grid is (t, h, w) of tubelets (Arnab et al. 2021). `num_registers` learned register tokens
        `reg_token` (1, num_registers, D) follow the class tokens (Darcet et al. 2024); they get no
        position and are initialised N(0, 1e-6) as in timm. `pos_init_std` is the std of learned positions at
        initialisation (docs/recipes.md, "Positions at initialisation").
        """
        if isinstance(pos_init_std, bool) or not isinstance(pos_init_std, (int, float)) or not pos_init_std > 0:
            raise BadArgument(f"pos_init_std must be a number > 0, got {pos_init_std!r}")
        if isinstance(num_registers, bool) or not isinstance(num_registers, int) or num_registers < 0:
            raise BadArgument(f"num_registers must be an integer >= 0, got {num_registers!r}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if pool == "cls" and num_cls_tokens == 0:
            raise ValueError("pool='cls' needs a class token")
        image_size, patch_size = to_pair(image_size), to_pair(patch_size)
        for s, p in zip(image_size, patch_size):
            if s % p:
                raise ValueError(f"image dimension {s} must be divisible by the patch size {p}")
        self.embed_dim, self.in_channels = dim, channels
        self.size_multiple = math.lcm(*patch_size)
        if frames is not None:
            frame_patch_size = frame_patch_size or 1
            if frames % frame_patch_size:
                raise ValueError(f"frames ({frames}) must be divisible by frame_patch_size ({frame_patch_size})")
            self.capabilities = self.capabilities | {VIDEO}
            image_size, patch_size = (frames, *image_size), (frame_patch_size, *patch_size)
            self.patch_embed = PatchEmbed3d(patch_size, channels, dim)
        else:
            self.patch_embed = PatchEmbed(patch_size, channels, dim)
        self.default_size = image_size
        self.mask_unit = patch_size
        self.num_registers = num_registers
        self.num_prefix_tokens = num_cls_tokens + num_registers
        self.pool = pool
        self.pos = pos
        base_grid = tuple(s // p for s, p in zip(image_size, patch_size))
        if pos == "learned":
            self.pos_embed = LearnedPosEmbed(base_grid, dim, float(pos_init_std))
            # Class tokens get their own learned positions (timm keeps them in one table).
            self.prefix_pos = nn.Parameter(torch.zeros(1, num_cls_tokens, dim)) if num_cls_tokens else None
        elif pos == "sincos":
            self.pos_embed, self.prefix_pos = SinCosPosEmbed(dim), None
        else:
            raise ValueError(f"pos must be 'learned' or 'sincos', got {pos!r}")
        self.cls_token = nn.Parameter(torch.zeros(1, num_cls_tokens, dim)) if num_cls_tokens else None
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, dim)) if num_registers else None
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.head = make_head(dim, num_classes)
        for p in (self.cls_token, self.mask_token, self.prefix_pos):
            if p is not None:
                trunc_normal_(p, std=0.02)

    # ---- pieces a subclass may override -------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(B, C, H, W) or (B, C, T, H, W) -> patch tokens (B, N, D) and their grid."""
        return self.patch_embed(x)

    def prepare_patches(self, x: torch.Tensor, *, mask: torch.Tensor | None, keep: torch.Tensor | None,
                        use_pos: bool, mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
        """Patch embedding -> mask token on hidden cells -> positions -> `keep` gather.

        Returns the patch tokens (B, N, D) (or (B, K, D) with `keep`) and the full grid. The one
        place where the order of these steps is fixed, for every model built on this skeleton
        (`mask_token`: a wrapper's own token instead of this model's).
        """
        tokens, grid = self.embed(x)
        if mask is not None:
            token = self.mask_token if mask_token is None else mask_token
            tokens = replace_masked(tokens, mask, token.reshape(-1))
        if use_pos:
            tokens = tokens + self.pos_embed(grid, tokens.device, tokens.dtype)
        if keep is not None:
            tokens = gather_tokens(tokens, keep)
        return tokens, grid

    def prefix(self, batch: int, use_pos: bool) -> torch.Tensor:
        """Class tokens with their positions, then register tokens (no positions): (B, R, D),
        R = `num_prefix_tokens`."""
        parts = []
        if self.cls_token is not None:
            tokens = self.cls_token
            if use_pos and self.prefix_pos is not None:
                tokens = tokens + self.prefix_pos
            parts.append(tokens)
        if self.reg_token is not None:
            parts.append(self.reg_token)
        if not parts:
            return self.mask_token.new_zeros(batch, 0, self.embed_dim)
        return torch.cat(parts, dim=1).expand(batch, -1, -1)

    def run_blocks(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, R+N, D) -> (B, R+N, D)."""
        if attn_mask is None:
            return self.transformer(x)
        return self.transformer(x, attn_mask=attn_mask)

    def pool_tokens(self, prefix: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """prefix (B, R, D), patches (B, N, D) -> (B, D): the class token ("cls"), or the mean of
        the patch tokens only ("mean"; registers and extra tokens are left out, as in the paper)."""
        return prefix[:, 0] if self.pool == "cls" else patches.mean(dim=1)

    # ---- the interface ----------------------------------------------------------------------
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
        """x (B, C, H, W) -> BackboneOutput.

        x may be video (B, C, T, H, W) for backbones built with `frames`; grids are then (t, h, w).
        kv_mask (B, h, w) bool, True = the token is dropped from the keys and values of every
        attention layer but still queries (MP3, Zhai et al. 2022). Needs the `kv_mask` capability.
        """
        self.check_request(x, mask, keep, extra_tokens, use_pos, kv_mask)
        tokens, grid = self.prepare_patches(x, mask=mask, keep=keep, use_pos=use_pos)
        b = tokens.shape[0]
        prefix = self.prefix(b, use_pos)
        if extra_tokens is not None:
            prefix = torch.cat([prefix, extra_tokens.to(prefix.dtype)], dim=1)
        r = prefix.shape[1]
        attn_mask = None
        if kv_mask is not None:
            visible = ~kv_mask.flatten(1)
            if keep is not None:
                visible = torch.gather(visible, 1, keep)
            visible = torch.cat([visible.new_ones(b, r), visible], dim=1)  # prefix tokens always visible
            attn_mask = visible[:, None, None, :]  # (B, 1, 1, L): True = may be attended to
        h = self.emb_dropout(torch.cat([prefix, tokens], dim=1))
        h = self.norm(self.run_blocks(h, attn_mask))
        prefix_out, patches = h[:, :r], h[:, r:]
        return BackboneOutput(patches, prefix_out, self.pool_tokens(prefix_out, patches), tuple(grid), keep)
