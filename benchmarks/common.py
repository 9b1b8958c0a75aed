"""Side-by-side timing helpers for the benchmark scripts: ratios in one run, never absolute targets.

Each measurement interleaves the contenders round by round (A, B, A, B, ...) so drift in machine
load hits both alike, and reports the median of the rounds.
"""

from __future__ import annotations

import statistics
import time
import tracemalloc
from collections.abc import Callable

import torch


def time_call(fn: Callable[[], object], warmup: int = 2, repeat: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def train_step_fn(model: torch.nn.Module, make_batch: Callable[[], torch.Tensor],
                  loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None) -> Callable[[], None]:
    """One forward+backward pass (gradients zeroed each time)."""
    batch = make_batch()
    loss_fn = loss_fn or (lambda m, x: m(x).float().square().mean())

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()

    return step


def compare(contenders: dict[str, Callable[[], None]], images_per_call: int, rounds: int = 5,
            warmup: int = 2) -> dict[str, float]:
    """Images/s of each contender, measured in interleaved rounds; returns the medians."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(images_per_call / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in samples.items()}


def peak_python_memory(fn: Callable[[], None]) -> int:
    """Peak bytes allocated by Python-side allocations during fn (CPU tensors included)."""
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def report(title: str, rates: dict[str, float], ours: str, peer: str) -> float:
    ratio = rates[ours] / rates[peer]
    print(f"{title:40s} ours {rates[ours]:8.2f} img/s   {peer} {rates[peer]:8.2f} img/s   ratio {ratio:5.2f}x")
    return ratio
