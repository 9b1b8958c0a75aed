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


def profile_step(step: Callable[[], None], top: int = 25, attribute: tuple[str, ...] = (
        "clone", "cat", "fill_", "copy_", "_to_copy", "square", "zero_", "stack", "zeros_like", "lerp_",
        "_local_scalar_dense", "item", "nonzero"),
        root: str | None = None, warmup: int = 1) -> None:
    """Profile one call of `step` (after `warmup` calls) with torch.profiler and print the `top` ops by
    self CPU time; then run it once more under a dispatch mode that counts, for each aten op named in
    `attribute`, its calls grouped by the innermost Python frame under `root` (default: the repository,
    outside virtual environments), so each fixed per-step cost can be traced to a file:line (ops of the
    backward pass show the line that called `backward`)."""
    import traceback
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    root = os.path.abspath(root or os.path.join(os.path.dirname(__file__), os.pardir))
    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    nested: dict[str, Counter] = {}
    for evt in prof.events():  # every call, nested ones included, by the outermost op it runs under
        name = evt.name.removeprefix("aten::")
        if name not in attribute:
            continue
        outer = evt
        while outer.cpu_parent is not None:
            outer = outer.cpu_parent
        nested.setdefault(name, Counter())[outer.name] += 1
    for name, counter in nested.items():
        print(f"aten::{name}: {sum(counter.values())} kernel-level calls, by outermost op: "
              + ", ".join(f"{n} {op}" for op, n in counter.most_common(6)))

    calls: dict[str, Counter] = {name: Counter() for name in attribute}

    def site() -> str:
        for frame in reversed(traceback.extract_stack()):
            path = os.path.abspath(frame.filename)
            if path.startswith(root) and "/.venv" not in path and not path.endswith("benchmarks/common.py"):
                return f"{os.path.relpath(path, root)}:{frame.lineno} ({frame.name})"
        return "(no frame under the repository)"

    class Sites(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in calls:
                calls[name][site()] += 1
            return func(*args, **(kwargs or {}))

    with Sites():
        step()
    for name, counter in calls.items():
        total = sum(counter.values())
        if total:
            print(f"aten::{name}: {total} calls per step")
            for where, n in counter.most_common(8):
                print(f"    {n:5d}  {where}")


def autocast_step(step: Callable[[], None], device: str = "cpu",
                  dtype: torch.dtype = torch.bfloat16) -> Callable[[], None]:
    """`step` under `torch.autocast(device, dtype)` (what `accelerate launch --mixed_precision bf16` does
    around the forward; the backward then runs in the dtypes the forward chose)."""

    def wrapped() -> None:
        with torch.autocast(device, dtype=dtype):
            step()

    return wrapped
