"""Masked patch prediction (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Sec. 4.6 and
App. B.1.2), the BERT-style objective of the ViT paper.

The paper's recipe is the default: 50 % of the cells are corrupted (`mask_prob`); of those, 80 % are
swapped for the backbone's mask token (`replace_prob`, through `mask=`), 10 % get another cell of
the same image (`random_patch_prob`: its pixels, so its patch embedding, while the cell keeps its own
position) and 10 % stay as they are. Each corrupted cell predicts its mean colour, every channel
quantised to 2**output_channel_bits levels (512 classes for 3 bits and RGB); cross-entropy on all
corrupted cells. Labels are computed from the un-normalised pixels (`input_mean` / `input_std`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssl_vit import MASK_TOKEN, BadArgument, InputShapeError, Objective, ViewSpec, register_objective
from ssl_vit.masking import draw_mask, gather_tokens, patchify, unpatchify

from .losses import as_unit, masked_cross_entropy, mean_colour_labels
from .pooling import with_pool
from .views import resolve_views

__all__ = ["MPP"]


class MPP(Objective):
    """MPP(transformer=model, patch_size=32, dim=1024, mask_prob=0.15, random_patch_prob=0.3, replace_prob=0.5)
    as in the seed; without those keywords the paper's 50 % / 80 % / 10 % (App. B.1.2).

    patch_size / dim / channels: the seed's arguments; they must agree with the backbone's
    `mask_unit`, `embed_dim` and `in_channels` (None: taken from the backbone).
    replace_prob / random_patch_prob: shares of the corrupted cells given the mask token / another
    cell; the rest (1 - both) stay unchanged.
    mean / std: the per-channel normalisation the inputs carry, `(pixels - mean) / std` (the seed's
    arguments; the same as `set_input_normalization`, which the launcher calls and which replaces
    them). Labels are computed after undoing it; pixels are taken to lie in [0, max_pixel_val] and
    are clamped for quantisation.
    """

    requires = (frozenset({MASK_TOKEN}),)
    trained_pool = "mean"

    def __init__(
        self,
        transformer: nn.Module,
        patch_size: int | None = None,
        dim: int | None = None,
        output_channel_bits: int = 3,
        channels: int | None = None,
        max_pixel_val: float = 1.0,
        mask_prob: float = 0.5,
        replace_prob: float = 0.8,
        random_patch_prob: float = 0.1,
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
        self.bits, self.max_pixel_val = output_channel_bits, max_pixel_val
        self.mask_prob, self.replace_prob, self.random_patch_prob = mask_prob, replace_prob, random_patch_prob
        self.crop_scale = tuple(crop_scale)
        self.set_input_normalization(mean, std)
        self.to_bits = nn.Linear(transformer.embed_dim, 2 ** (output_channel_bits * c))

    @property
    def backbone(self) -> nn.Module:
        return self.transformer

    def export_backbone(self) -> nn.Module:
        """The transformer, pooling by the mean of its patch tokens where it has that option."""
        return with_pool(self.transformer, self.trained_pool)

    def set_input_normalization(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        """The views are `(pixels - mean) / std` per channel (None: raw pixels); checked against the
        backbone's channels, since the labels undo it."""
        if (mean is None) != (std is None):
            raise ValueError("MPP: give both mean and std, or neither")
        c = self.transformer.in_channels
        for name, value in (("mean", mean), ("std", std)):
            if value is not None and len(value) != c:
                raise BadArgument(f"MPP: {name} has {len(value)} values for {c} input channels")
        if std is not None and any(float(s) <= 0 for s in std):
            raise BadArgument(f"MPP: std must be positive, got {tuple(std)}")
        super().set_input_normalization(mean, std)

    def pixels(self, x: Tensor) -> Tensor:
        """Views (B, C, ...) -> the pixels they were made from, undoing `input_mean` / `input_std`."""
        if self.input_mean is None:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.input_mean, device=x.device, dtype=x.dtype).view(shape)
        std = torch.tensor(self.input_std, device=x.device, dtype=x.dtype).view(shape)
        return x * std + mean

    def labels(self, x: Tensor) -> Tensor:
        """Mean-colour class of every cell of the views x (B, C, H, W): (B, N) long."""
        return mean_colour_labels(self.pixels(x.detach()), self.unit, self.bits, self.max_pixel_val)

    def view_specs(self) -> list[ViewSpec]:
        """Random resized crop and flip."""
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
        labels = self.labels(x)
        logits = self.to_bits(out.patch_tokens)
        loss = masked_cross_entropy(logits, labels, corrupted)
        with torch.no_grad():
            sel = corrupted.flatten(1)
            acc = (logits[sel].argmax(-1) == labels[sel]).float().mean()
        self.metrics = {"loss": float(loss.detach()), "accuracy": float(acc)}
        return loss


register_objective("mpp", MPP)
