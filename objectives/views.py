"""Random views of an image (or video) batch, made on the batch's device with Kornia.

`make_views(images, specs)` expands every `ViewSpec` into `count` augmented tensors, in spec order,
with per-sample random parameters (random resized crop, horizontal flip, colour jitter, grayscale,
Gaussian blur, solarize), as in the SimCLR/BYOL/DINO recipes (Caron et al. 2021, Sec. "Implementation").
The pipeline of each spec is built once and cached. Video batches (B, C, T, H, W) get the same
crop and colour change on every frame of a clip; `ViewSpec.frames` picks that many frames.

Standalone objectives (`loss = mae(images)`) call this without `normalize`; the launcher passes
ImageNet statistics for uint8-decoded images.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from ssl_vit import InputShapeError, ViewSpec

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "make_views", "build_pipeline", "resolve_views"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CACHE: dict[tuple[ViewSpec, bool], nn.Module] = {}
_LOCK = threading.Lock()


def _blur_kernel(size: tuple[int, int]) -> int:
    """An odd kernel of about a tenth of the view side (23 px at 224 px, as in BYOL/DINO)."""
    k = max(3, int(0.1 * min(size)))
    return k if k % 2 else k + 1


def _augmentations(spec: ViewSpec) -> list[nn.Module]:
    # cropping_mode="resample" warps the whole batch at once (one grid_sample), instead of a
    # Python loop over samples that "slice" mode runs.
    ops: list[nn.Module] = [
        K.RandomResizedCrop(tuple(spec.size), scale=spec.scale, ratio=spec.ratio, cropping_mode="resample",
                            p=1.0),
    ]
    if spec.hflip > 0:
        ops.append(K.RandomHorizontalFlip(p=spec.hflip))
    if spec.color_jitter > 0:
        b, c, s, h = spec.jitter
        ops.append(K.ColorJitter(b, c, s, h, p=spec.color_jitter))
    if spec.grayscale > 0:
        ops.append(K.RandomGrayscale(p=spec.grayscale))
    if spec.blur > 0:
        k = _blur_kernel(spec.size)
        ops.append(K.RandomGaussianBlur((k, k), sigma=spec.blur_sigma, p=spec.blur))
    if spec.solarize > 0:
        # threshold fixed at 0.5 (BYOL), no additive brightness change
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=spec.solarize))
    return ops


def build_pipeline(spec: ViewSpec, video: bool = False) -> nn.Module:
    """The (cached) Kornia pipeline of one spec: (B, C, H, W) -> (B, C, *spec.size).

    video=True: a `VideoSequential` on (B, C, T, H, W) drawing one set of parameters per clip.
    """
    key = (spec, video)
    with _LOCK:
        pipe = _CACHE.get(key)
        if pipe is None:
            ops = _augmentations(spec)
            if video:
                pipe = K.VideoSequential(*ops, data_format="BCTHW", same_on_frame=True)
            else:
                pipe = K.AugmentationSequential(*ops)
            _CACHE[key] = pipe
    return pipe


def _pick_frames(clips: Tensor, frames: int, generator: torch.Generator | None) -> Tensor:
    """(B, C, T, H, W) -> (B, C, frames, H, W): uniform stride T // frames, random start per clip."""
    b, c, t = clips.shape[:3]
    if frames > t:
        raise InputShapeError(f"a view asks for {frames} frames but the clips have only {t}")
    stride = t // frames
    span = stride * (frames - 1) + 1
    start = torch.randint(0, t - span + 1, (b,), generator=generator,
                          device="cpu" if generator is None else generator.device).to(clips.device)
    index = start[:, None] + stride * torch.arange(frames, device=clips.device)  # (B, frames)
    index = index.view(b, 1, frames, 1, 1).expand(b, c, frames, *clips.shape[3:])
    return torch.gather(clips, 2, index)


def _normalise(x: Tensor, normalize: tuple[Sequence[float], Sequence[float]]) -> Tensor:
    mean, std = normalize
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - mean_t) / std_t


def make_views(
    images: Tensor,
    specs: Sequence[ViewSpec],
    *,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Augmented views of a batch.

    images: (B, C, H, W) float (uint8 is scaled to [0, 1]); video (B, C, T, H, W).
    specs: each expands to `count` tensors (B, C, *spec.size) (video: (B, C, frames or T, *spec.size)),
        returned in spec order.
    normalize: (mean, std) per channel, applied after the augmentations; None leaves values as they are.
    generator: makes the views reproducible (Kornia draws from torch's global RNG, so it is seeded
        from `generator` inside a forked RNG state that is restored afterwards).
    """
    if images.dim() not in (4, 5):
        raise InputShapeError(
            f"make_views expects (B, C, H, W) images or (B, C, T, H, W) clips, got shape {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    elif not images.is_floating_point():
        raise InputShapeError(f"make_views expects float or uint8 images, got {images.dtype}")
    video = images.dim() == 5
    if generator is None:
        return _make(images, specs, normalize, video, None)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _make(images, specs, normalize, video, generator)


def _make(images: Tensor, specs: Sequence[ViewSpec], normalize, video: bool,
          generator: torch.Generator | None) -> list[Tensor]:
    views: list[Tensor] = []
    for spec in specs:
        pipe = build_pipeline(spec, video)
        for _ in range(spec.count):
            src = images
            if video and spec.frames is not None:
                src = _pick_frames(images, spec.frames, generator)
            view = pipe(src)
            if normalize is not None:
                view = _normalise(view, normalize)
            views.append(view)
    return views


def spec_for_input(spec: ViewSpec, images: Tensor) -> ViewSpec:
    """The same spec at the size of `images` (standalone calls train at the size they are given)."""
    return dataclasses.replace(spec, size=tuple(int(s) for s in images.shape[-2:]))


def resolve_views(specs: Sequence[ViewSpec], inputs: Tensor | Sequence[Tensor],
                  generator: torch.Generator | None = None) -> list[Tensor]:
    """What an objective's `forward` receives, as a list of views in `specs` order.

    inputs: a plain batch (B, C, H, W) / (B, C, T, H, W): the views are made here at the batch's
    own size, without normalisation (standalone use, as in the seed README); or the list of views
    the launcher already made, returned as it is after a count check.
    """
    if isinstance(inputs, Tensor):
        return make_views(inputs, [spec_for_input(s, inputs) for s in specs], generator=generator)
    views = list(inputs)
    want = sum(s.count for s in specs)
    if len(views) != want:
        raise InputShapeError(
            f"expected {want} views ({', '.join(f'{s.count} x {s.name}' for s in specs)}), got {len(views)}"
        )
    return views
