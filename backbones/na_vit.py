"""NaViT (Dehghani et al. 2023, "Patch n' Pack: NaViT, a Vision Transformer for any Aspect Ratio
and Resolution", arXiv:2307.06304).

Images of different sizes are cut into patches and packed into a few sequences; attention is
block-diagonal (a token sees only tokens of its own image), so packing changes nothing but the
speed. Positions are factorised (a learned row embedding plus a learned column embedding), each
image keeps its native aspect ratio, training may drop a random fraction of every image's tokens
(`token_dropout_prob`: a float or a function of (height, width)), queries and keys are normalised
(qk-norm), and each image is pooled by attention with one learned query restricted to its tokens.

The seed's two forms (padded packing and nested tensors) are one class here: a list of images (or of
lists of images, one list per packed sequence) goes through the packed path; a plain (B, C, H, W)
batch is the backbone interface (`forward_features`), so every objective can use NaViT.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from torch import nn

from ssl_vit import MASK_TOKEN, POS_FREE, TOKEN_DROP, Backbone, BackboneOutput, register_presets
from ssl_vit.backbone import make_head
from ssl_vit.embed import to_pair
from ssl_vit.errors import InputShapeError
from ssl_vit.layers import Attention, Transformer
from ssl_vit.masking import gather_tokens, mask_to_keep, random_mask, replace_masked

__all__ = ["NaViT", "group_images_by_max_seq_len"]

DropoutProb = float | Callable[[int, int], float] | None


def group_images_by_max_seq_len(images: Sequence[torch.Tensor], patch_size, max_seq_len: int = 2048,
                                token_dropout: Callable[[int, int], float] | None = None) -> list[list[torch.Tensor]]:
    """Greedy packing in input order: start a new sequence when the next image would overflow.

    The length of an image counts the tokens left after token dropout.
    """
    ph, pw = to_pair(patch_size)
    groups: list[list[torch.Tensor]] = []
    group: list[torch.Tensor] = []
    length = 0
    for image in images:
        h, w = image.shape[-2:]
        n = (h // ph) * (w // pw)
        if token_dropout is not None:
            n = max(1, int(n * (1 - token_dropout(h, w))))
        if n > max_seq_len:
            raise ValueError(f"an image of size {h}x{w} has {n} tokens, more than group_max_seq_len={max_seq_len}")
        if group and length + n > max_seq_len:
            groups.append(group)
            group, length = [], 0
        group.append(image)
        length += n
    if group:
        groups.append(group)
    return groups


class NaViT(Backbone):
    """NaViT: (B, C, H, W) or a list of (C, H, W) images -> logits (num_images, num_classes).

    `forward(images, group_images=True, group_max_seq_len=...)` packs a flat list automatically.
    """

    capabilities = frozenset({TOKEN_DROP, MASK_TOKEN, POS_FREE})

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
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        token_dropout_prob: DropoutProb = None,
        qk_norm: bool = True,
        qk_rmsnorm: bool | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        image_size, patch_size = to_pair(image_size), to_pair(patch_size)
        for s, p in zip(image_size, patch_size):
            if s % p:
                raise ValueError(f"image dimension {s} must be divisible by the patch size {p}")
        if isinstance(token_dropout_prob, (int, float)) and not isinstance(token_dropout_prob, bool):
            if not 0.0 <= token_dropout_prob < 1.0:
                raise ValueError(f"token_dropout_prob must be in [0, 1), got {token_dropout_prob}")
        elif token_dropout_prob is not None and not callable(token_dropout_prob):
            raise ValueError("token_dropout_prob must be None, a float in [0, 1) or a function of (height, width)")
        self.token_dropout_prob = token_dropout_prob
        qk_norm = qk_norm if qk_rmsnorm is None else qk_rmsnorm  # the nested-tensor seed's name
        self.embed_dim, self.in_channels, self.default_size = dim, channels, image_size
        self.patch_size = patch_size
        self.mask_unit, self.size_multiple = patch_size, math.lcm(*patch_size)
        self.num_prefix_tokens = 0
        patch_dim = channels * patch_size[0] * patch_size[1]
        self.patch_norm = nn.LayerNorm(patch_dim)
        self.patch_proj = nn.Linear(patch_dim, dim)
        self.embed_norm = nn.LayerNorm(dim)
        grid = (image_size[0] // patch_size[0], image_size[1] // patch_size[1])
        self.pos_embed_height = nn.Parameter(torch.zeros(grid[0], dim))
        self.pos_embed_width = nn.Parameter(torch.zeros(grid[1], dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout=dropout, qk_norm=qk_norm,
                                       drop_path=drop_path)
        self.norm = nn.LayerNorm(dim)
        self.attn_pool_queries = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn_pool = Attention(dim, heads, dim_head, qk_norm=qk_norm)
        self.pool_norm = nn.LayerNorm(dim)
        self.head = make_head(dim, num_classes)
        for p in (self.pos_embed_height, self.pos_embed_width, self.mask_token, self.attn_pool_queries):
            trunc_normal_(p, std=0.02)

    # ---- pieces -----------------------------------------------------------------------------
    def dropout_prob(self, height: int, width: int) -> float:
        """Fraction of an image's tokens dropped in training (0 when token_dropout_prob is None)."""
        p = self.token_dropout_prob
        if p is None:
            return 0.0
        return float(p(height, width)) if callable(p) else float(p)

    @staticmethod
    def _axis_table(table: torch.Tensor, n: int) -> torch.Tensor:
        """The first n rows of a positional table (n, D); linearly resampled when n exceeds it."""
        if n <= table.shape[0]:
            return table[:n]
        return F.interpolate(table.t()[None], size=n, mode="linear", align_corners=False)[0].t()

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Factorised positions of a (h, w) grid, (h*w, D) row-major: row embedding + column embedding."""
        h, w = grid
        rows = self._axis_table(self.pos_embed_height, h)
        cols = self._axis_table(self.pos_embed_width, w)
        return (rows[:, None, :] + cols[None, :, :]).reshape(h * w, -1)

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> raw patches (B, h*w, C*p*q) and the grid."""
        p, q = self.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // q)
        return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=q), grid

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(..., C*p*q) -> (..., D): layer norm, linear, layer norm (as the seed)."""
        return self.embed_norm(self.patch_proj(self.patch_norm(patches)))

    def encode(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(G, L, D) -> (G, L, D): dropout, transformer, final norm."""
        h = self.emb_dropout(tokens)
        h = self.transformer(h) if attn_mask is None else self.transformer(h, attn_mask=attn_mask)
        return self.norm(h)

    def attention_pool(self, tokens: torch.Tensor, num_queries: int = 1,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(G, L, D) -> (G, Q, D): learned queries attend to tokens (restricted by attn_mask)."""
        queries = self.attn_pool_queries.to(tokens.dtype).expand(tokens.shape[0], num_queries, -1)
        pooled = self.attn_pool(queries, attn_mask=attn_mask, context=tokens) + queries
        return self.pool_norm(pooled)

    # ---- the interface (batch tensors) ------------------------------------------------------
    def forward_features(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        extra_tokens: torch.Tensor | None = None,
        use_pos: bool = True,
    ) -> BackboneOutput:
        """x (B, C, H, W) -> BackboneOutput: every image its own sequence, pooled by attention."""
        self.check_request(x, mask, keep, extra_tokens, use_pos)
        patches, grid = self.patchify(x)
        tokens = self.embed_patches(patches)
        if mask is not None:
            tokens = replace_masked(tokens, mask, self.mask_token[0, 0])
        if use_pos:
            tokens = tokens + self.positions(grid).to(tokens.dtype)
        if keep is not None:
            tokens = gather_tokens(tokens, keep)
        h = self.encode(tokens)
        pooled = self.attention_pool(h)[:, 0]
        return BackboneOutput(h, h[:, :0], pooled, tuple(grid), keep)

    # ---- packed lists of images --------------------------------------------------------------
    def _check_image(self, image: torch.Tensor) -> None:
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise InputShapeError(f"NaViT expects images of shape (C, H, W) in its lists, got {shape}")
        if image.shape[0] != self.in_channels:
            raise InputShapeError(
                f"NaViT expects {self.in_channels} input channels, got {image.shape[0]} (image {tuple(image.shape)})"
            )
        self.check_size(image.shape[-2:])

    def forward_packed(self, batched_images, group_images: bool = False,
                       group_max_seq_len: int = 2048) -> torch.Tensor:
        """Images -> pooled features (num_images, D), in input order.

        batched_images: a list of (C, H, W) images (one packed sequence, or packed greedily with
        `group_images`), or a list of lists (one list per packed sequence).
        """
        if isinstance(batched_images, torch.Tensor) or not len(batched_images):
            raise InputShapeError("forward_packed expects a non-empty list of (C, H, W) images")
        drop = self.training and self.token_dropout_prob is not None
        if group_images:
            if not all(isinstance(i, torch.Tensor) for i in batched_images):
                raise InputShapeError("group_images=True expects a flat list of (C, H, W) images")
            for image in batched_images:
                self._check_image(image)
            groups = group_images_by_max_seq_len(batched_images, self.patch_size, group_max_seq_len,
                                                 self.dropout_prob if drop else None)
        elif all(isinstance(i, torch.Tensor) for i in batched_images):
            groups = [list(batched_images)]
        else:
            groups = [list(g) for g in batched_images]
        images = [image for group in groups for image in group]
        for image in images:
            self._check_image(image)
        device = images[0].device
        group_of_image = torch.tensor([g for g, group in enumerate(groups) for _ in group], device=device)
        index_in_group = torch.tensor([i for group in groups for i in range(len(group))], device=device)

        # Patchify and position images size by size (one batched op per distinct size).
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
        patches: list[torch.Tensor | None] = [None] * len(images)
        positions: list[torch.Tensor | None] = [None] * len(images)
        for size, members in by_size.items():
            raw, grid = self.patchify(torch.stack([images[i] for i in members]))
            pos = self.positions(grid).expand(len(members), -1, -1)
            p = self.dropout_prob(*size) if drop else 0.0
            if p > 0:
                n = raw.shape[1]
                kept = mask_to_keep(random_mask(len(members), (n,), 1 - max(1, int(n * (1 - p))) / n, device=device))
                raw, pos = gather_tokens(raw, kept), gather_tokens(pos, kept)
            for j, i in enumerate(members):
                patches[i], positions[i] = raw[j], pos[j]
        lengths = torch.tensor([t.shape[0] for t in patches], device=device)
        flat = self.embed_patches(torch.cat(patches)) + torch.cat(positions).to(images[0].dtype)

        # Pack: token t of image i goes to sequence group_of_image[i] at its running offset.
        image_of_token = torch.repeat_interleave(torch.arange(len(images), device=device), lengths)
        group_of_token = group_of_image[image_of_token]
        num_groups = len(groups)
        group_len = torch.zeros(num_groups, dtype=torch.long, device=device).index_add_(0, group_of_image, lengths)
        group_start = group_len.cumsum(0) - group_len
        slot = torch.arange(flat.shape[0], device=device) - group_start[group_of_token]
        seq_len = int(group_len.max())
        packed = flat.new_zeros(num_groups, seq_len, flat.shape[-1]).index_put((group_of_token, slot), flat)
        ids = torch.full((num_groups, seq_len), -1, dtype=torch.long, device=device)
        ids[group_of_token, slot] = index_in_group[image_of_token]
        # Block-diagonal attention; padding (id -1) attends to padding only, so no row is empty.
        attn_mask = (ids[:, :, None] == ids[:, None, :]).unsqueeze(1)
        h = self.encode(packed, attn_mask)

        num_queries = max(len(g) for g in groups)
        query_ids = torch.arange(num_queries, device=device)
        pool_mask = query_ids[None, :, None] == ids[:, None, :]  # (G, Q, L)
        counts = torch.tensor([len(g) for g in groups], device=device)
        unused = query_ids[None, :] >= counts[:, None]  # queries beyond a sequence's images: see all, then dropped
        pool_mask = (pool_mask | unused[:, :, None]).unsqueeze(1)
        pooled = self.attention_pool(h, num_queries, pool_mask)
        return pooled[group_of_image, index_in_group]

    def forward(self, x, group_images: bool = False, group_max_seq_len: int = 2048) -> torch.Tensor:
        """Logits (num_images, num_classes) (pooled features when num_classes=0).

        x: a (B, C, H, W) batch, a list of (C, H, W) images, or a list of such lists.
        """
        if isinstance(x, torch.Tensor):
            keep = None
            if self.training and self.token_dropout_prob is not None:
                self.check_input(x)
                grid = self.mask_grid(x.shape[2:])
                n = math.prod(grid)
                p = self.dropout_prob(*x.shape[-2:])
                if p > 0:
                    hidden = random_mask(x.shape[0], grid, 1 - max(1, int(n * (1 - p))) / n, device=x.device)
                    keep = mask_to_keep(hidden)
            pooled = self.forward_features(x, keep=keep).pooled
        else:
            pooled = self.forward_packed(x, group_images, group_max_seq_len)
        return self.forward_head(pooled)


_SEED = dict(image_size=256, patch_size=32, dim=1024, depth=6, heads=16, mlp_dim=2048, token_dropout_prob=0.1)
_TINY = dict(image_size=32, patch_size=8, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128, token_dropout_prob=0.1)
register_presets(NaViT, {"na_vit": _SEED, "na_vit_tiny": _TINY})
