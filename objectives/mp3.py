"""MP3: masked position prediction (Zhai et al. 2022, "Position Prediction as an Effective
Pretraining Strategy").

Patch tokens enter the transformer without positional embedding (`use_pos=False`); a random
`masking_ratio` of them is removed from the keys and values of every attention layer (they still
ask queries, `kv_mask=`), and every token predicts its own index on the patch grid (cross-entropy
over all grid positions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_vit import KV_MASK, POS_FREE, InputShapeError, Objective, ViewSpec, register_objective
from ssl_vit.masking import draw_mask

from .losses import position_labels
from .pooling import with_pool, without_positions
from .views import resolve_views

__all__ = ["MP3"]


class MP3(Objective):
    """MP3(vit=v, masking_ratio=0.75) over any backbone with the `pos_free` and `kv_mask`
    capabilities (ssl_vit.TokenBackbone has both). Positions are classes over the mask grid of the
    backbone's default size, so training runs at that size."""

    requires = (frozenset({POS_FREE, KV_MASK}),)
    trained_pool = "mean"  # the position loss trains the patch tokens, not a class token
    trained_positions = False  # ... of an encoder that never sees positional embeddings

    def __init__(self, vit: nn.Module, *, masking_ratio: float = 0.75,
                 crop_scale: tuple[float, float] = (0.2, 1.0)) -> None:
        super().__init__(vit)
        if not 0.0 < masking_ratio < 1.0:
            raise ValueError(f"masking_ratio must be in (0, 1), got {masking_ratio}")
        self.vit = vit
        self.masking_ratio = masking_ratio
        self.crop_scale = tuple(crop_scale)
        self.grid = tuple(vit.mask_grid(vit.default_size))
        self.num_positions = math.prod(self.grid)
        self.mlp_head = nn.Sequential(nn.LayerNorm(vit.embed_dim), nn.Linear(vit.embed_dim, self.num_positions))

    @property
    def backbone(self) -> nn.Module:
        return self.vit

    def export_backbone(self) -> nn.Module:
        """The encoder as trained: pooling by the mean of its patch tokens where it has that option, and
        without positions (its learned ones zeroed: `forward_features(x)` is the trained `use_pos=False` one)."""
        pooled = with_pool(self.vit, self.trained_pool)
        return without_positions(pooled, copy=pooled is self.vit)  # with_pool may have copied it already

    def view_specs(self) -> list[ViewSpec]:
        """Random resized crop and flip at the backbone's default size."""
        size = tuple(self.vit.default_size)
        frames = size[0] if len(size) == 3 else None
        return [ViewSpec("mp3", 1, size[-2:], scale=self.crop_scale, hflip=0.5, frames=frames)]

    def forward(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        (x,) = resolve_views(self.view_specs(), images)
        grid = tuple(self.vit.mask_grid(x.shape[2:]))
        if grid != self.grid:
            raise InputShapeError(
                f"MP3 predicts positions on the {self.grid} grid of {tuple(self.vit.default_size)} inputs; "
                f"got input {tuple(x.shape[2:])} (grid {grid})")
        mask = draw_mask(x.shape[0], grid, self.masking_ratio, x.device, tube=False)
        out = self.vit.forward_features(x, use_pos=False, kv_mask=mask)
        if out.patch_tokens.shape[1] != self.num_positions:
            raise InputShapeError(
                f"MP3 needs one final token per position: {type(self.vit).__name__} gave "
                f"{out.patch_tokens.shape[1]} tokens for {self.num_positions} positions")
        logits = self.mlp_head(out.patch_tokens)  # (B, N, N)
        labels = position_labels(x.shape[0], self.num_positions, x.device)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels).float().mean()
        self.metrics = {"loss": float(loss.detach()), "accuracy": float(acc)}
        return loss


register_objective("mp3", MP3)
