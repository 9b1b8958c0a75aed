"""Tokens-to-Token ViT (Yuan et al. 2021, "Tokens-to-Token ViT: Training Vision Transformers from
Scratch on ImageNet").

The stem is a series of soft splits: unfold overlapping k x k windows with stride s (padding
s // 2), concatenating their channels into one token, with a one-layer transformer over the
tokens between splits ("re-structurization"). The tokens then go through a plain ViT. Unlike the
seed, which rebuilt each intermediate image assuming it was square, the stem tracks the (h, w) of
every stage, so non-square inputs work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vit import EXTRA_TOKENS, MASK_TOKEN, BackboneOutput, TokenBackbone, register_presets
from ssl_vit.layers import Transformer
from ssl_vit.masking import hide_pixels

__all__ = ["T2TViT"]


def check_window(kernel: int, stride: int, padding: int, what: str) -> None:
    """A window maps an input of s*m pixels to exactly m outputs iff 2p < k <= 2p + s; the mask grid
    (size // total stride) equals the token grid only then."""
    if not 2 * padding < kernel <= 2 * padding + stride:
        raise ValueError(
            f"{what} (kernel {kernel}, stride {stride}, padding {padding}) does not map a multiple of its "
            f"stride onto an exact grid; it needs 2*padding < kernel <= 2*padding + stride"
        )


class T2TStem(nn.Module):
    """Soft splits and re-structurization: (B, C, H, W) -> tokens (B, h*w, dim) and grid (h, w)."""

    def __init__(self, channels: int, dim: int, layers: Sequence[tuple[int, int]], dropout: float) -> None:
        super().__init__()
        self.windows = [(int(k), int(s)) for k, s in layers]
        if not self.windows:
            raise ValueError("t2t_layers needs at least one (kernel_size, stride) pair")
        width = channels
        blocks = []
        for i, (k, s) in enumerate(self.windows):
            check_window(k, s, s // 2, f"t2t layer {i}")
            width *= k * k
            last = i == len(self.windows) - 1
            # One single-head layer at the unfolded width, as in the seed; none after the last split.
            blocks.append(nn.Identity() if last else Transformer(width, 1, 1, width, width, dropout=dropout))
        self.blocks = nn.ModuleList(blocks)
        self.proj = nn.Linear(width, dim)
        self.stride = math.prod(s for _, s in self.windows)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        tokens = None
        for (k, s), block in zip(self.windows, self.blocks):
            if tokens is not None:  # back to an image on the current grid
                x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
            tokens = F.unfold(x, k, stride=s, padding=s // 2).transpose(1, 2)  # (B, h'*w', C*k*k)
            h, w = h // s, w // s  # exact, by check_window and the size check
            tokens = block(tokens)
        return self.proj(tokens), (h, w)


class T2TViT(TokenBackbone):
    """T2T-ViT. (B, C, H, W) -> logits (B, num_classes) or pooled (B, dim); grid (H/S, W/S), S the
    product of the strides (16 for the default layers).

    Capabilities: mask token (hidden cells' pixels are zeroed before the overlapping soft splits,
    then their final tokens become the mask token) and extra tokens. No token drop: the stem's
    windows overlap and its transformer layers attend over every token, so the encoder cannot run
    on a subset of cells. Not pos_free: the unfold padding marks the borders.
    """

    capabilities = frozenset({MASK_TOKEN, EXTRA_TOKENS})

    def __init__(
        self,
        *,
        image_size,
        num_classes: int,
        dim: int,
        depth: int | None = None,
        heads: int | None = None,
        mlp_dim: int | None = None,
        pool: str = "cls",
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        transformer: nn.Module | None = None,
        t2t_layers: Sequence[tuple[int, int]] = ((7, 4), (3, 2), (3, 2)),
        drop_path: float = 0.0,
        num_registers: int = 0,
    ) -> None:
        super().__init__()
        stem = T2TStem(channels, dim, t2t_layers, dropout)
        self.build_tokens(image_size=image_size, patch_size=stem.stride, dim=dim, channels=channels,
                          pos="learned", num_cls_tokens=1, pool=pool, emb_dropout=emb_dropout,
                          num_classes=num_classes, num_registers=num_registers)
        self.patch_embed = stem  # replaces the plain patch embedding: same (tokens, grid) contract
        if transformer is None:
            if depth is None or heads is None or mlp_dim is None:
                raise ValueError("T2TViT needs depth, heads and mlp_dim (or a `transformer` module)")
            transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout=dropout, drop_path=drop_path)
        self.transformer = transformer
        self.norm = nn.LayerNorm(dim)

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
        """x (B, C, H, W) -> BackboneOutput; see `TokenBackbone.forward_features`."""
        self.check_request(x, mask, keep, extra_tokens, use_pos, kv_mask)
        if mask is not None:
            x = hide_pixels(x, mask)
        return super().forward_features(x, mask=mask, extra_tokens=extra_tokens)

register_presets(T2TViT, {
    "t2t_vit": dict(image_size=224, dim=512, depth=5, heads=8, mlp_dim=512, t2t_layers=((7, 4), (3, 2), (3, 2))),
    "t2t_vit_tiny": dict(image_size=32, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128,
                         t2t_layers=((7, 4), (3, 2))),
})
