"""Random views of an image (or video) batch, made on the batch's device in a few batched tensor ops.

`make_views(images, specs)` expands every `ViewSpec` into `count` augmented tensors, in spec order,
with per-sample random parameters, following the SimCLR/BYOL/DINO recipes (Caron et al. 2021, Sec.
"Implementation"). One spec costs a fixed number of batched ops, whatever its `count` and the batch:

1. crop boxes for all `count * B` crops at once, by torchvision's `RandomResizedCrop` rule: up to 10
   draws of an area (`scale`, relative to the sample's valid box) and a log-uniform aspect ratio, the
   first that fits, else the whole box with the ratio clamped; integer pixels inside the box;
2. one separable resampling of every crop to `spec.size`: per-crop bicubic weight matrices (Keys
   a = -0.5 with the support widened by the downsampling factor, the antialiased resize of PIL and of
   `F.interpolate(..., antialias=True)`), renormalised at the crop's edges so that no pixel outside the
   crop contributes (never the padding outside a box), applied as two batched matmuls; a horizontal flip
   is the column matrix reversed;
3. photometric ops as masked per-sample tensor ops, in DINO's order: colour jitter (torchvision's
   brightness, contrast, saturation and hue; factors per sample, one random order of the four per
   call), grayscale, Gaussian blur (per-sample sigma, separable grouped convolution, reflected borders),
   solarize (threshold 0.5).

Boxes: `boxes` float (B, 4) = (x0, y0, x1, y1) in canvas pixels marks the valid area of each sample
(`launch.data` batches carry it as `batch["box"]`: the image placed top-left on a padded canvas); crops
are drawn inside it. None: the whole canvas.

Video batches (B, C, T, H, W) get the same crop and colour change on every frame of a clip;
`ViewSpec.frames` picks that many frames (stride T // frames, random start per view).

Standalone objectives (`loss = mae(images)`) call this without `normalize`; the launcher passes
ImageNet statistics for uint8-decoded images.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_vit import IMAGENET_MEAN, IMAGENET_STD, InputShapeError, ViewSpec

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "make_views", "resolve_views", "sample_crops", "resized_crops"]

_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 (scale, ratio) draws before its fallback
_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
# columns of the per-crop uniform draws of one spec
_U_AREA, _U_RATIO = slice(0, _ATTEMPTS), slice(_ATTEMPTS, 2 * _ATTEMPTS)
_U_LEFT, _U_TOP, _U_FLIP, _U_JITTER = 2 * _ATTEMPTS, 2 * _ATTEMPTS + 1, 2 * _ATTEMPTS + 2, 2 * _ATTEMPTS + 3
_U_FACTORS = slice(2 * _ATTEMPTS + 4, 2 * _ATTEMPTS + 8)
_U_GREY, _U_BLUR, _U_SIGMA, _U_SOLAR, _U_FRAME = (2 * _ATTEMPTS + 8 + i for i in range(5))
_U_COLUMNS = 2 * _ATTEMPTS + 13


def _blur_kernel(size: tuple[int, int]) -> int:
    """An odd kernel of about a tenth of the view side (23 px at 224 px, as in BYOL/DINO)."""
    k = max(3, int(0.1 * min(size)))
    return k if k % 2 else k + 1


_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(values: Sequence[float], like: Tensor) -> Tensor:
    """A small constant on `like`'s device and dtype, copied there once (no host-to-device copy, and so
    no synchronisation, per call)."""
    key = (tuple(float(v) for v in values), str(like.device), like.dtype)
    found = _CONSTANTS.get(key)
    if found is None:
        found = _CONSTANTS[key] = torch.tensor(key[0], device=like.device, dtype=like.dtype)
    return found


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) draws on `device`: from `generator` (on its own device) when given, else from the global
    RNG of `device`."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _jitter_order(generator: torch.Generator | None) -> list[int]:
    """A random order of the four colour-jitter ops, drawn on the CPU (no device sync)."""
    if generator is None or generator.device.type == "cpu":
        return torch.rand(4, generator=generator).argsort().tolist()
    return torch.rand(4, generator=generator, device=generator.device).argsort().tolist()


# ---- crops --------------------------------------------------------------------------------------
def _crop_boxes(boxes: Tensor, u: Tensor, scale: Sequence[float], ratio: Sequence[float]) -> Tensor:
    """Crop boxes from uniform draws: boxes (B, 4), u (K, B, _U_COLUMNS) -> (K, B, 4) (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = boxes.unbind(-1)  # (B,)
    bw, bh = (x1 - x0).clamp_min(1.0), (y1 - y0).clamp_min(1.0)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    area = (bw * bh)[None, :, None] * (scale[0] + (scale[1] - scale[0]) * u[..., _U_AREA])  # (K, B, A)
    aspect = torch.exp(lo + (hi - lo) * u[..., _U_RATIO])
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (h > 0) & (w <= bw[None, :, None]) & (h <= bh[None, :, None])
    first = fits.float().argmax(-1, keepdim=True)  # the first attempt that fits
    found = fits.any(-1)
    w, h = w.gather(-1, first).squeeze(-1), h.gather(-1, first).squeeze(-1)  # (K, B)
    # fallback: the whole box, its ratio clamped into `ratio`, centred
    box_ratio = bw / bh
    fw = torch.where(box_ratio > ratio[1], (bh * ratio[1]).round(), bw).clamp(1.0, None)
    fh = torch.where(box_ratio < ratio[0], (bw / ratio[0]).round(), bh).clamp(1.0, None)
    fw, fh = torch.minimum(fw, bw), torch.minimum(fh, bh)
    w, h = torch.where(found, w, fw.expand_as(w)), torch.where(found, h, fh.expand_as(h))
    room_x, room_y = bw - w, bh - h  # (K, B)
    left = torch.where(found, (u[..., _U_LEFT] * (room_x + 1)).floor(), (room_x / 2).floor())
    top = torch.where(found, (u[..., _U_TOP] * (room_y + 1)).floor(), (room_y / 2).floor())
    left, top = torch.minimum(left, room_x).clamp_min(0) + x0, torch.minimum(top, room_y).clamp_min(0) + y0
    return torch.stack([left, top, left + w, top + h], -1)


def sample_crops(boxes: Tensor, count: int, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), *, generator: torch.Generator | None = None) -> Tensor:
    """`count` random resized crop boxes per sample, inside its valid box.

    boxes: float (B, 4) (x0, y0, x1, y1) in pixels. Returns float (count, B, 4) (x0, y0, x1, y1), integer
    sizes and offsets from the box's corner, by torchvision's `RandomResizedCrop.get_params` rule with
    the area relative to the box.
    """
    u = _uniform((count, boxes.shape[0], _U_COLUMNS), generator, boxes.device)
    return _crop_boxes(boxes.float(), u, scale, ratio)


def _cubic(t: Tensor, a: float = -0.5) -> Tensor:
    """Keys' cubic convolution kernel (a = -0.5: PIL's and torch's antialiased bicubic)."""
    t = t.abs()
    t2, t3 = t * t, t * t * t
    near = (a + 2) * t3 - (a + 3) * t2 + 1
    far = a * t3 - 5 * a * t2 + 8 * a * t - 4 * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _resize_weights(start: Tensor, length: Tensor, out: int, size: int) -> Tensor:
    """Antialiased bicubic resampling matrices: the pixels [start, start + length) of an axis of `size`
    pixels -> `out` pixels. start, length: (M,) -> (M, out, size); every row sums to 1 and is zero outside
    the window."""
    dtype = start.dtype
    scale = length / out  # (M,)
    support = scale.clamp_min(1.0)[:, None, None]  # widened when downsampling: antialiasing
    centre = start[:, None] + (torch.arange(out, device=start.device, dtype=dtype) + 0.5) * scale[:, None]
    pixel = torch.arange(size, device=start.device, dtype=dtype) + 0.5  # pixel centres
    weights = _cubic((pixel - centre[:, :, None]) / support)  # (M, out, size)
    inside = (pixel >= start[:, None]) & (pixel < (start + length)[:, None])  # (M, size)
    weights = weights * inside[:, None, :]
    return weights / weights.sum(-1, keepdim=True)


def resized_crops(x: Tensor, crops: Tensor, size: Sequence[int], flip: Tensor | None = None) -> Tensor:
    """Cut and resize crops, antialiased bicubic, two batched matmuls for all of them.

    x: (B, P, H, W) float (P: channels, or channels x frames). crops: (K, B, 4) (x0, y0, x1, y1) in pixels.
    size: (h, w). flip: bool (K, B) mirrors those crops left-right. Returns (K, B, P, h, w).
    """
    b, p, height, width = x.shape
    k = crops.shape[0]
    h, w = int(size[0]), int(size[1])
    flat = crops.reshape(k * b, 4).to(x.dtype)
    wx = _resize_weights(flat[:, 0], flat[:, 2] - flat[:, 0], w, width)  # (K*B, w, W)
    if flip is not None:
        wx = torch.where(flip.reshape(-1, 1, 1), wx.flip(1), wx)
    wy = _resize_weights(flat[:, 1], flat[:, 3] - flat[:, 1], h, height).view(k, b, h, height)
    cols = torch.bmm(x.reshape(b, p * height, width),
                     wx.view(k, b, w, width).permute(1, 3, 0, 2).reshape(b, width, k * w))  # (B, P*H, K*w)
    out = torch.einsum("kbih,bphkj->kbpij", wy, cols.view(b, p, height, k, w))
    return out.contiguous()


def _pick_frames(clips: Tensor, frames: int, u: Tensor) -> Tensor:
    """(N, C, T, h, w) -> (N, C, frames, h, w): uniform stride T // frames, start drawn from u (N,)."""
    n, c, t = clips.shape[:3]
    if frames > t:
        raise InputShapeError(f"a view asks for {frames} frames but the clips have only {t}")
    if frames == t:
        return clips
    stride = t // frames
    span = stride * (frames - 1) + 1
    start = (u * (t - span + 1)).floor().clamp(max=t - span).long()
    index = start[:, None] + stride * torch.arange(frames, device=clips.device)  # (N, frames)
    index = index.view(n, 1, frames, 1, 1).expand(n, c, frames, *clips.shape[3:])
    return torch.gather(clips, 2, index)


# ---- photometric ops on (N, C, ..., h, w), parameters per sample (N,) -----------------------------
def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def _grey(x: Tensor) -> Tensor:
    """(N, C, ...) -> (N, 1, ...): luma of RGB, the channel mean otherwise."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    r, g, b = x.unbind(1)
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(1)


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    return (factor * a + (1 - factor) * b).clamp(0.0, 1.0)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, g, b = x.unbind(1)
    maxc, minc = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    equal = maxc == minc
    delta = maxc - minc
    ones = torch.ones_like(maxc)
    s = delta / torch.where(equal, ones, maxc)
    delta = torch.where(equal, ones, delta)
    rc, gc, bc = (maxc - r) / delta, (maxc - g) / delta, (maxc - b) / delta
    is_r, is_g = maxc == r, (maxc == g) & (maxc != r)
    hue = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = hue / 6.0  # in (-1/6, 5/6)
    return hue + (hue < 0).to(hue.dtype), s, maxc


_SECTOR_OFFSETS = (5.0, 3.0, 1.0)  # r, g, b in the closed form of HSV -> RGB


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """(N, ...) hue in turns, saturation, value -> (N, 3, ...): c = v - v s clamp(min(k, 4 - k), 0, 1) with
    k = (n + 6 h) mod 6, n = 5, 3, 1 (the sector table of torchvision's _hsv2rgb in closed form)."""
    n = _constant(_SECTOR_OFFSETS, h).view(1, 3, *([1] * (h.dim() - 1)))
    k = n + 6.0 * h.unsqueeze(1)  # h in [0, 1): k in [1, 11)
    k = k - 6.0 * (k >= 6.0).to(k.dtype)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    v, s = v.unsqueeze(1), s.unsqueeze(1)
    return v - v * s * ramp


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """x: (N, 3, ...) in [0, 1], shift (N,) in turns."""
    h, s, v = _rgb_to_hsv(x)
    h = h + _per_sample(shift, h)  # shift in [-0.5, 0.5]
    return _hsv_to_rgb(h - torch.floor(h), s, v)


def _colour_jitter(x: Tensor, spec: ViewSpec, u: Tensor, order: list[int]) -> Tensor:
    """torchvision's ColorJitter with probability spec.color_jitter per sample: factors from u (N, 4)
    (brightness, contrast, saturation in [1 - s, 1 + s] (not below 0), hue shift in [-h, h]), the four
    applied in `order` (a permutation of 0..3)."""
    apply = u[:, 0] < spec.color_jitter
    strength = spec.jitter
    out = x
    for op in order:
        amount = float(strength[op])
        if amount <= 0 or (op in (2, 3) and x.shape[1] != 3):
            continue
        draw = u[:, 1 + op]
        if op == 3:
            out = _adjust_hue(out, torch.where(apply, (2 * draw - 1) * amount, torch.zeros_like(draw)))
            continue
        lo = max(0.0, 1.0 - amount)
        factor = _per_sample(torch.where(apply, lo + (1.0 + amount - lo) * draw, torch.ones_like(draw)), x)
        if op == 0:
            out = (out * factor).clamp(0.0, 1.0)
        elif op == 1:
            out = _blend(out, _grey(out).mean(dim=(-2, -1), keepdim=True), factor)
        else:
            out = _blend(out, _grey(out), factor)
    return torch.where(_per_sample(apply, x), out, x)


def _gaussian_blur(x: Tensor, apply: Tensor, sigma: Tensor, k: int) -> Tensor:
    """Separable Gaussian blur of the samples where `apply` (N,), sigma (N,), odd kernel `k`, reflected
    borders; the others pass unchanged (a unit kernel). x: (N, C, ..., h, w)."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    per = x[0].numel() // (h * w)  # planes per sample
    taps = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    kernel = kernel / kernel.sum(-1, keepdim=True)
    unit = (taps == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where(apply[:, None], kernel, unit).repeat_interleave(per, 0)  # (N*per, k)
    pad = k // 2
    planes = x.reshape(1, n * per, h, w)
    if pad < w:
        planes = F.conv2d(F.pad(planes, (pad, pad, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * per)
    if pad < h:
        planes = F.conv2d(F.pad(planes, (0, 0, pad, pad), mode="reflect"), kernel[:, None, :, None], groups=n * per)
    return planes.view_as(x)


def _normalise(x: Tensor, normalize: tuple[Sequence[float], Sequence[float]]) -> Tensor:
    mean, std = normalize
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - _constant(mean, x).view(shape)) / _constant(std, x).view(shape)


# ---- views ------------------------------------------------------------------------------------------
def _check_boxes(boxes: Tensor | None, images: Tensor) -> Tensor:
    b, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    if boxes is None:
        return _constant((0.0, 0.0, width, height), images[:0].float()).expand(b, 4)
    if boxes.shape != (b, 4):
        raise InputShapeError(f"make_views expects boxes of shape ({b}, 4) (x0, y0, x1, y1) for {b} images, "
                              f"got {tuple(boxes.shape)}")
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    x0, y0 = boxes[:, 0].clamp(0, width - 1), boxes[:, 1].clamp(0, height - 1)
    x1 = torch.maximum(boxes[:, 2].clamp(max=width), x0 + 1)
    y1 = torch.maximum(boxes[:, 3].clamp(max=height), y0 + 1)
    return torch.stack([x0, y0, x1, y1], -1)


def _spec_views(images: Tensor, boxes: Tensor, spec: ViewSpec, generator: torch.Generator | None,
                clamp: bool) -> Tensor:
    """The `count` views of one spec: images (B, C, [T,] H, W) -> (count, B, C, [frames,] *spec.size)."""
    b, c = images.shape[:2]
    k = spec.count
    u = _uniform((k, b, _U_COLUMNS), generator, images.device)
    order = _jitter_order(generator)
    crops = _crop_boxes(boxes, u, spec.scale, spec.ratio)  # (K, B, 4)
    flip = u[..., _U_FLIP] < spec.hflip if spec.hflip > 0 else None
    x = resized_crops(images.reshape(b, -1, *images.shape[-2:]), crops, spec.size, flip)  # (K, B, P, h, w)
    x = x.view(k * b, c, *images.shape[2:-2], *x.shape[-2:])  # (N, C, [T,] h, w)
    if clamp:
        x = x.clamp(0.0, 1.0)
    u = u.view(k * b, _U_COLUMNS)
    if x.dim() == 5 and spec.frames is not None:
        x = _pick_frames(x, spec.frames, u[:, _U_FRAME])
    if spec.color_jitter > 0:
        x = _colour_jitter(x, spec, torch.cat([u[:, _U_JITTER:_U_JITTER + 1], u[:, _U_FACTORS]], 1), order)
    if spec.grayscale > 0:
        x = torch.where(_per_sample(u[:, _U_GREY] < spec.grayscale, x), _grey(x).expand_as(x), x)
    if spec.blur > 0:
        lo, hi = spec.blur_sigma
        x = _gaussian_blur(x, u[:, _U_BLUR] < spec.blur, lo + (hi - lo) * u[:, _U_SIGMA], _blur_kernel(spec.size))
    if spec.solarize > 0:
        x = torch.where(_per_sample(u[:, _U_SOLAR] < spec.solarize, x) & (x >= 0.5), 1.0 - x, x)
    return x.view(k, b, *x.shape[1:])


def make_views(
    images: Tensor,
    specs: Sequence[ViewSpec],
    *,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    generator: torch.Generator | None = None,
    boxes: Tensor | None = None,
) -> list[Tensor]:
    """Augmented views of a batch; see the module docstring.

    images: (B, C, H, W) float (uint8 is scaled to [0, 1]); video (B, C, T, H, W).
    specs: each expands to `count` tensors (B, C, *spec.size) (video: (B, C, frames or T, *spec.size)),
        returned in spec order.
    normalize: (mean, std) per channel, applied after the augmentations; None leaves values as they are.
    generator: makes the views reproducible (every draw comes from it); None draws from the global RNG
        of the images' device.
    boxes: float (B, 4) (x0, y0, x1, y1), the valid area of each sample in pixels; crops are drawn inside
        it (scale and ratio relative to it). None: the whole image.
    """
    if images.dim() not in (4, 5):
        raise InputShapeError(
            f"make_views expects (B, C, H, W) images or (B, C, T, H, W) clips, got shape {tuple(images.shape)}"
        )
    clamp = images.dtype == torch.uint8  # known range: resampling overshoot is clipped, as PIL does
    if clamp:
        images = images.float().div_(255.0)
    elif not images.is_floating_point():
        raise InputShapeError(f"make_views expects float or uint8 images, got {images.dtype}")
    elif images.dtype not in (torch.float32, torch.float64):
        images = images.float()
    boxes = _check_boxes(boxes, images)
    views: list[Tensor] = []
    for spec in specs:
        out = _spec_views(images, boxes, spec, generator, clamp)
        if normalize is not None:
            out = _normalise(out.flatten(0, 1), normalize).view_as(out)
        views.extend(out.unbind(0))
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
