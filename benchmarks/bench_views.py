"""View pipeline cost: `objectives.views.make_views` against the Kornia pipeline it replaced.

Both sides make the same views of the same uint8 canvas batch on one device: DINO's multi-crop recipe
(`objectives.dino.dino_view_specs`: two global crops, scale 0.4-1, and six local crops, scale 0.05-0.4;
flip, colour jitter 0.8, grayscale 0.2, blur 1.0 / 0.1 / 0.5, solarize 0 / 0.2 / 0; ImageNet
normalisation), per-sample parameters on both sides.

- new: `make_views`: per spec, all crop boxes drawn at once, one separable antialiased bicubic resampling
  of all `count * B` crops (two batched matmuls), photometric ops as masked batched tensor ops.
- kornia: the previous implementation, kept here verbatim: one cached `kornia.augmentation`
  `AugmentationSequential` per spec (RandomResizedCrop in "resample" mode, flip, ColorJitter, grayscale,
  Gaussian blur, solarize), called once per crop.

Printed per case: milliseconds per call (median of interleaved rounds) and the number of ATen ops one
call dispatches (counted with a TorchDispatchMode: on a GPU, about one kernel launch each).

Run: `.venv/bin/python -m benchmarks.bench_views [--device cuda] [--rounds 10]`
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from objectives.dino import dino_view_specs
from objectives.views import IMAGENET_MEAN, IMAGENET_STD, make_views
from ssl_vit import ViewSpec

NORM = (IMAGENET_MEAN, IMAGENET_STD)
CASES = {  # name: (batch, canvas, global size, local size, locals)
    "dino-small b64 canvas32 2x32+6x16": (64, 32, 32, 16, 6),
    "dino b16 canvas256 2x224+6x96": (16, 256, 224, 96, 6),
}


# ---- the previous implementation (Kornia), for comparison --------------------------------------------
_CACHE: dict = {}
_LOCK = threading.Lock()


def _blur_kernel(size: tuple[int, int]) -> int:
    k = max(3, int(0.1 * min(size)))
    return k if k % 2 else k + 1


def _kornia_pipeline(spec: ViewSpec):
    import kornia.augmentation as K

    with _LOCK:
        pipe = _CACHE.get(spec)
        if pipe is None:
            ops = [K.RandomResizedCrop(tuple(spec.size), scale=spec.scale, ratio=spec.ratio, cropping_mode="resample",
                                       p=1.0)]
            if spec.hflip > 0:
                ops.append(K.RandomHorizontalFlip(p=spec.hflip))
            if spec.color_jitter > 0:
                ops.append(K.ColorJitter(*spec.jitter, p=spec.color_jitter))
            if spec.grayscale > 0:
                ops.append(K.RandomGrayscale(p=spec.grayscale))
            if spec.blur > 0:
                k = _blur_kernel(spec.size)
                ops.append(K.RandomGaussianBlur((k, k), sigma=spec.blur_sigma, p=spec.blur))
            if spec.solarize > 0:
                ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=spec.solarize))
            pipe = _CACHE[spec] = K.AugmentationSequential(*ops)
    return pipe


def kornia_views(images: torch.Tensor, specs: Sequence[ViewSpec], normalize=NORM) -> list[torch.Tensor]:
    images = images.float().div_(255.0)
    mean = torch.tensor(normalize[0], device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(normalize[1], device=images.device).view(1, -1, 1, 1)
    views = []
    for spec in specs:
        pipe = _kornia_pipeline(spec)
        for _ in range(spec.count):
            views.append((pipe(images) - mean) / std)
    return views


# ---- measuring ---------------------------------------------------------------------------------------
class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    with _CountOps() as mode:
        fn()
    return mode.count


def time_ms(contenders: dict[str, Callable[[], object]], device: torch.device, rounds: int) -> dict[str, float]:
    """Median milliseconds per call, contenders interleaved round by round."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in contenders.values():
        fn(), fn()
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    for name, (batch, canvas, global_size, local_size, num_local) in CASES.items():
        specs = dino_view_specs((global_size,) * 2, (local_size,) * 2, num_local)
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch, 3, canvas, canvas), generator=g, dtype=torch.uint8).to(device)
        boxes = torch.tensor([[0.0, 0.0, canvas, canvas * 3 // 4]], device=device).expand(batch, 4)
        contenders = {
            "new": lambda x=images, s=specs: make_views(x, s, normalize=NORM),
            "new+boxes": lambda x=images, s=specs, b=boxes: make_views(x, s, normalize=NORM, boxes=b),
            "kornia": lambda x=images, s=specs: kornia_views(x, s),
        }
        ms = time_ms(contenders, device, args.rounds)
        ops = {k: count_ops(fn) for k, fn in contenders.items()}
        print(f"{name}: " + ", ".join(f"{k} {ms[k]:.1f} ms ({ops[k]} ops)" for k in contenders)
              + f"; kornia / new = {ms['kornia'] / ms['new']:.2f}x")


if __name__ == "__main__":
    main()
