"""Side-by-side timing helpers for the benchmark scripts: ratios in one run, never absolute targets.

Each measurement interleaves the contenders round by round (A, B, A, B, ...) so drift in machine
load hits both alike, and reports the median of the rounds.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import time
from collections.abc import Callable

import torch


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


def report(title: str, rates: dict[str, float], ours: str, peer: str) -> float:
    ratio = rates[ours] / rates[peer]
    print(f"{title:40s} ours {rates[ours]:8.2f} img/s   {peer} {rates[peer]:8.2f} img/s   ratio {ratio:5.2f}x")
    return ratio


def pick_threads() -> int:
    """2 threads when the machine is idle (1-minute load below 0.5), else 1."""
    idle = os.getloadavg()[0] < 0.5 and (os.cpu_count() or 1) >= 2
    return 2 if idle else 1


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_kb() -> int:
    """This process's peak RSS since the last `_reset_peak` (VmHWM); ru_maxrss only where /proc has no
    VmHWM (it survives exec: a spawned child would report its parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _peak_memory_child(build: Callable[[int], Callable[[], None]], batch: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    step = build(batch)
    step()  # warm-up: optimizer state and allocator pools exist before the baseline
    _reset_peak()
    before = _rss_kb()
    for _ in range(3):
        step()
    peak = _peak_kb()
    queue.put((peak / 1024, max(0, peak - before) / 1024))


def peak_memory_mb(build: Callable[[int], Callable[[], None]], batch: int, threads: int) -> tuple[float, float]:
    """(peak RSS, its growth over three train steps) in MB of `build(batch)`'s step, measured in a fresh
    spawned process after one warm-up step. `build` must be a module-level function (it is pickled)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(build, batch, threads, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value
