"""Losses and targets of the masked-image objectives, as plain functions of tensors.

Shapes: images (B, C, H, W) or video (B, C, T, H, W); `unit` is the backbone's mask cell in pixels
((p, q) or (pt, p, q)); a `mask` is bool on the mask grid (B, *grid), True = hidden; patches are
flattened (B, N, prod(unit) * C) in `ssl_vit.masking.patchify` order (channel last).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_vit.masking import gather_tokens, patchify, upsample_mask

__all__ = [
    "as_unit", "pixel_targets", "unnormalize_patches",
    "masked_mse", "mae_loss", "simmim_l1", "mean_colour_labels", "masked_cross_entropy",
    "position_labels",
]


def as_unit(mask_unit: int | Sequence[int], dims: int) -> tuple[int, ...]:
    """A backbone's `mask_unit` as one side per grid axis: 16 -> (16, 16) (video: (16, 16, 16))."""
    if isinstance(mask_unit, int):
        return (mask_unit,) * dims
    return tuple(int(u) for u in mask_unit)


def pixel_targets(images: Tensor, unit: Sequence[int], norm_pix: bool = True, eps: float = 1e-6,
                  index: Tensor | None = None) -> Tensor:
    """Patches of `images` as regression targets, (B, N, prod(unit) * C) ((B, M, ...) for `index` (B, M)).

    norm_pix: each patch normalised by its own mean and (unbiased) variance over all its pixels and
    channels (MAE, He et al. 2021, Sec. 3 "normalized pixels as target").
    index: only these cells (e.g. the hidden ones), gathered before normalising.
    """
    target = patchify(images, tuple(unit))
    if index is not None:
        target = gather_tokens(target, index)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    return target


def unnormalize_patches(pred: Tensor, patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Inverse of `pixel_targets(..., norm_pix=True)` for pictures: predictions (B, N, P) in per-patch
    normalised units back to pixels with each patch's own mean and (unbiased) variance, taken from the
    true patches (B, N, P): the picture shows the predicted structure, the statistics are the image's."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return pred.to(patches.dtype) * std + mean


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error per patch, averaged over the hidden patches only.

    pred, target (B, N, P); mask (B, *grid) or (B, N) bool. Returns a scalar.
    """
    per_patch = (pred - target).square().mean(dim=-1)  # (B, N)
    weight = mask.flatten(1).to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp(min=1.0)


def mae_loss(pred: Tensor, images: Tensor, mask: Tensor, unit: Sequence[int], norm_pix: bool = True) -> Tensor:
    """MAE reconstruction loss: pred (B, N, prod(unit) * C) against the (normalised) pixels of the
    hidden patches of images."""
    return masked_mse(pred, pixel_targets(images, unit, norm_pix), mask)


def simmim_l1(pred: Tensor, images: Tensor, mask: Tensor) -> Tensor:
    """SimMIM loss (Xie et al. 2021, Eq. 1): L1 on the hidden pixels, divided once by their count.

    pred, images (B, C, [T,] H, W); mask on any grid that divides the image (B, *grid). The sum of
    |pred - x| over hidden pixels and channels is divided by (hidden pixels x channels).
    """
    factor = [s // g for s, g in zip(images.shape[2:], mask.shape[1:])]
    pixel_mask = upsample_mask(mask, factor).unsqueeze(1).to(images.dtype)  # (B, 1, [T,] H, W)
    err = (pred - images).abs() * pixel_mask
    return err.sum() / (pixel_mask.sum() * images.shape[1]).clamp(min=1.0)


def mean_colour_labels(images: Tensor, unit: Sequence[int], bits: int = 3, max_pixel_val: float = 1.0) -> Tensor:
    """Masked patch prediction targets (Dosovitskiy et al. 2021, App. B.1.2): the mean colour of each
    patch, each channel quantised to 2**bits bins over [0, max_pixel_val], as one class index.

    images (B, C, ...) -> (B, N) long in [0, 2**(bits * C)); channel c contributes bin_c * (2**bits)**c.
    Values outside [0, max_pixel_val] are clamped.
    """
    c = images.shape[1]
    patches = patchify(images.clamp(0.0, max_pixel_val), tuple(unit))  # (B, N, P*C), channel last
    mean = patches.view(*patches.shape[:2], -1, c).mean(dim=2)  # (B, N, C)
    levels = 2**bits
    bins = (mean / max_pixel_val * levels).floor().long().clamp(0, levels - 1)
    weights = levels ** torch.arange(c, device=images.device)
    return (bins * weights).sum(dim=-1)


def masked_cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy over the selected tokens only: logits (B, N, K), labels (B, N), mask (B, *grid)."""
    sel = mask.flatten(1)
    return F.cross_entropy(logits[sel], labels[sel])


def position_labels(batch: int, num_positions: int, device: torch.device | str | None = None) -> Tensor:
    """MP3 (Zhai et al. 2022) labels: every token's own row-major index on the grid, (B, N) long."""
    return torch.arange(num_positions, device=device).expand(batch, num_positions)
