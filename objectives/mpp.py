"""Masked patch prediction (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Sec. 4.6 and
App. B.1.2), the BERT-style objective of the ViT paper.

`mask_prob` of the cells are corrupted; of those, `replace_prob` are swapped for the backbone's
mask token (`mask=`), `random_patch_prob` get the pixels of another cell of the same image, and the
rest stay as they are. Each corrupted cell predicts its mean colour, every channel quantised to
2**output_channel_bits levels (512 classes for 3 bits and RGB); cross-entropy on corrupted cells only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssl_vit import MASK_TOKEN, InputShapeError, Objective, ViewSpec, register_objective
from ssl_vit.masking import gather_tokens, patchify, unpatchify

from .losses import as_unit, masked_cross_entropy, mean_colour_labels
from .mae import draw_mask
from .views import resolve_views

__all__ = ["MPP"]


class MPP(Objective):
    """MPP(transformer=model, patch_size=32, dim=1024, mask_prob=0.15, random_patch_prob=0.3, replace_prob=0.5).

    patch_size / dim / channels: the seed's arguments; they must agree with the backbone's
    `mask_unit`, `embed_dim` and `in_channels` (None: taken from the backbone).
    mean / std: the normalisation the inputs carry (targets are computed after undoing it); inputs are
    otherwise taken to lie in [0, max_pixel_val] and are clamped for quantisation.
    """

    requires = (frozenset({MASK_TOKEN}),)
    tiny_overrides: dict = {}

    def __init__(
        self,
        transformer: nn.Module,
        patch_size: int | None = None,
        dim: int | None = None,
        output_channel_bits: int = 3,
        channels: int | None = None,
        max_pixel_val: float = 1.0,
        mask_prob: float = 0.15,
        replace_prob: float = 0.5,
        random_patch_prob: float = 0.5,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_scale: tuple[float, float] = (0.2, 1.0),
    ) -> None:
        super().__init__(transformer)
        self.transformer = transformer
        self.unit = as_unit(transformer.mask_unit, len(transformer.default_size))
        name = type(transformer).__name__
        if patch_size is not None and tuple(as_unit(patch_size, 2)) != self.unit[-2:]:
            raise ValueError(f"MPP patch_size={patch_size} but {name} masks cells of {self.unit[-2:]} px; "
                             "leave patch_size out to use the backbone's")
        if dim is not None and dim != transformer.embed_dim:
            raise ValueError(f"MPP dim={dim} but {name} has embed_dim={transformer.embed_dim}")
        c = transformer.in_channels
        if channels is not None and channels != c:
            raise ValueError(f"MPP channels={channels} but {name} takes {c} input channels")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        if replace_prob < 0 or random_patch_prob < 0 or replace_prob + random_patch_prob > 1.0 + 1e-9:
            raise ValueError(f"replace_prob ({replace_prob}) and random_patch_prob ({random_patch_prob}) "
                             "must be non-negative and sum to at most 1")
        if (mean is None) != (std is None):
            raise ValueError("MPP: give both mean and std, or neither")
        self.bits, self.max_pixel_val = output_channel_bits, max_pixel_val
        self.mask_prob, self.replace_prob, self.random_patch_prob = mask_prob, replace_prob, random_patch_prob
        self.crop_scale = tuple(crop_scale)
        shape = (1, c) + (1,) * len(transformer.default_size)
        self.register_buffer("mean", None if mean is None else torch.tensor(mean, dtype=torch.float).view(shape),
                             persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float).view(shape),
                             persistent=False)
        self.to_bits = nn.Linear(transformer.embed_dim, 2 ** (output_channel_bits * c))

    @property
    def backbone(self) -> nn.Module:
        return self.transformer

    def view_specs(self) -> list[ViewSpec]:
        """Random resized crop and flip. Targets need pixel values: pass `mean`/`std` when the views
        are normalised."""
        size = tuple(self.transformer.default_size)
        frames = size[0] if len(size) == 3 else None
        return [ViewSpec("mpp", 1, size[-2:], scale=self.crop_scale, hflip=0.5, frames=frames)]

    def corrupt(self, x: Tensor, grid: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, C, H, W) -> (input with random-patch cells swapped in, cells for the mask token
        (B, *grid), all corrupted cells (B, *grid))."""
        b, n = x.shape[0], math.prod(grid)
        corrupted = draw_mask(b, grid, self.mask_prob, x.device, tube=False)
        u = torch.rand(corrupted.shape, device=x.device)
        replace = corrupted & (u < self.replace_prob)
        swap = corrupted & (u >= self.replace_prob) & (u < self.replace_prob + self.random_patch_prob)
        if self.random_patch_prob > 0:
            # another cell of the same image: draw from the N - 1 others, skipping the cell itself
            src = torch.randint(0, n - 1, (b, n), device=x.device)
            src = src + (src >= torch.arange(n, device=x.device))
            patches = patchify(x, self.unit)
            patches = torch.where(swap.flatten(1).unsqueeze(-1), gather_tokens(patches, src), patches)
            x = unpatchify(patches, self.unit, grid, x.shape[1])
        return x, replace, corrupted

    def forward(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        (x,) = resolve_views(self.view_specs(), images)
        grid = self.transformer.mask_grid(x.shape[2:])
        corrupted_input, replace, corrupted = self.corrupt(x, grid)
        out = self.transformer.forward_features(corrupted_input, mask=replace)
        if out.patch_tokens.shape[1] != math.prod(grid):
            raise InputShapeError(
                f"MPP needs one final token per mask cell: {type(self.transformer).__name__} gave "
                f"{out.patch_tokens.shape[1]} tokens for a {tuple(grid)} mask grid")
        pixels = x if self.mean is None else x * self.std + self.mean
        labels = mean_colour_labels(pixels.detach(), self.unit, self.bits, self.max_pixel_val)
        logits = self.to_bits(out.patch_tokens)
        loss = masked_cross_entropy(logits, labels, corrupted)
        with torch.no_grad():
            sel = corrupted.flatten(1)
            acc = (logits[sel].argmax(-1) == labels[sel]).float().mean()
        self.metrics = {"loss": float(loss.detach()), "accuracy": float(acc)}
        return loss


register_objective("mpp", MPP)
