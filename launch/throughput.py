"""Throughput, FLOPs and model FLOP utilisation (MFU) of a training run.

- `count_step_flops(objective, views, labels=None)`: the FLOPs of one forward + backward of the
  objective on these views, counted once per configuration with `torch.utils.flop_counter`, without
  touching the run (no optimizer step, buffers and metrics restored, RNG forked, no `.grad` written).
- `peak_flops(device, dtype)`: the accelerator's dense peak at that dtype from `PEAK_TABLE`
  (vendor datasheets), or on a CPU (and on an accelerator missing from the table) a measured matmul
  peak, cached per process.
- `Throughput`: the loop reports each step's images, seconds and data-wait seconds; it gives
  images/s, achieved FLOP/s, MFU, the data-wait share and peak memory as a dict of floats.

FLOPs count multiply-adds as two FLOPs (matmuls, convolutions, attention's two products), which is the
convention of the datasheets' peaks; element-wise work (norms, GELU, softmax) is not counted.
"""

from __future__ import annotations

import math
import os
import re
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ssl_vit import Objective

__all__ = ["PEAK_TABLE", "Throughput", "count_callable_flops", "count_step_flops", "measured_matmul_peak", "peak_flops",
           "peak_memory_bytes"]

aten = torch.ops.aten


# ---- FLOP counting ----------------------------------------------------------------------------------

def _cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's registry covers the CUDA attention kernels; the CPU flash kernel `F.scaled_dot_product_attention`
# dispatches to is not in it and would count as zero.
_EXTRA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


def _rng_devices(tensors: Sequence[Tensor]) -> list[torch.device]:
    return sorted({t.device for t in tensors if t.device.type == "cuda"}, key=str)


def count_callable_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attention `fn()` runs (forward and any backward it calls),
    with the CPU attention kernels counted too. No state is saved or restored: see `count_step_flops`."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with counter:
        fn()
    return int(counter.get_total_flops())


_COUNTING = [False]


def is_counting() -> bool:
    """True while `count_step_flops` runs the objective: that forward is a measurement, not a training step
    (fault-injection tests that count training forwards skip it)."""
    return _COUNTING[0]


def count_step_flops(objective: Objective, views: list[Tensor], labels: Tensor | None = None) -> int:
    """FLOPs of one training step's forward and backward on `views` (one micro-batch of one process).

    objective: the unwrapped objective (not the DDP/Accelerate wrapper), in the mode it trains in.
    views: the step's views as the loop passes them; copies are used. labels: passed as `labels=`
    when given (objectives with `needs_labels`).
    Nothing of the run changes: every parameter's `.grad` is put back as it was (accumulated
    micro-batches included), every buffer (DINO's centre, batch-norm statistics) and `metrics` are restored, and the
    RNG (CPU and the views' CUDA devices) is forked, so the next training step draws the same numbers
    as without the count. The optimizer and `on_step_end` are not called. Call it inside the step's
    autocast context to run the same kernels; the count does not depend on the dtype.
    Multiply by gradient-accumulation micro-batches for an optimizer step.
    """
    copies = [v.detach().clone() for v in views]
    kwargs = {} if labels is None else {"labels": labels.detach().clone()}
    buffers = [(b, b.detach().clone()) for b in objective.buffers()]
    metrics = dict(objective.metrics)
    params = [p for p in objective.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    _COUNTING[0] = True
    try:
        with torch.random.fork_rng(devices=_rng_devices(copies)), counter:
            loss = objective(copies, **kwargs)
            if loss.requires_grad:
                loss.backward()
    finally:
        _COUNTING[0] = False
        for p, grad in zip(params, grads):
            p.grad = grad
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        objective.metrics = metrics
    return int(counter.get_total_flops())


# ---- peak FLOP/s ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PeakEntry:
    """Dense (no structured sparsity) peak TFLOP/s of one accelerator, from its vendor's datasheet.

    pattern: a regular expression searched in `torch.cuda.get_device_name()` (case-insensitive);
    bf16 / fp16: tensor-core peak with fp32 accumulation; tf32: tensor-core fp32 matmuls (used when
    torch allows TF32 matmuls); fp32: the plain fp32 peak.
    """

    pattern: str
    name: str
    bf16: float | None
    fp16: float | None
    tf32: float | None
    fp32: float
    source: str


_NV = "https://www.nvidia.com/en-us/data-center/"
# Most specific patterns first (H100 PCIe / NVL before the SXM part, A10G / A10 after A100). Datasheet
# figures "with sparsity" are halved to their dense values.
PEAK_TABLE: tuple[PeakEntry, ...] = (
    PeakEntry(r"GH200", "GH200", 989.4, 989.4, 494.7, 66.9, _NV + "grace-hopper-superchip/"),
    PeakEntry(r"H200.*NVL", "H200 NVL", 835.0, 835.0, 418.0, 60.0, _NV + "h200/ (H200 NVL column)"),
    PeakEntry(r"H200", "H200 SXM", 989.4, 989.4, 494.7, 66.9, _NV + "h200/ (H200 SXM column)"),
    PeakEntry(r"H100.*PCIe", "H100 PCIe", 756.0, 756.0, 378.0, 51.2, _NV + "h100/ (H100 PCIe column)"),
    PeakEntry(r"H100.*NVL", "H100 NVL", 835.0, 835.0, 418.0, 60.0, _NV + "h100/ (H100 NVL column)"),
    PeakEntry(r"H100|H800", "H100 SXM", 989.4, 989.4, 494.7, 66.9, _NV + "h100/ (H100 SXM column)"),
    PeakEntry(r"A100|A800", "A100", 312.0, 312.0, 156.0, 19.5, _NV + "a100/ (A100 datasheet)"),
    PeakEntry(r"L40S", "L40S", 362.05, 362.05, 183.0, 91.6, _NV + "l40s/"),
    PeakEntry(r"\bL4\b", "L4", 121.0, 121.0, 60.0, 30.3, _NV + "l4/"),
    PeakEntry(r"\bA10G\b", "A10G", 70.0, 70.0, 35.0, 31.2, "https://aws.amazon.com/ec2/instance-types/g5/"),
    PeakEntry(r"\bA10\b", "A10", 125.0, 125.0, 62.5, 31.2, _NV + "products/a10-gpu/"),
    PeakEntry(r"V100", "V100 SXM2", None, 125.0, None, 15.7, _NV + "v100/"),
    PeakEntry(r"\bT4\b", "T4", None, 65.0, None, 8.1, _NV + "tesla-t4/"),
    PeakEntry(r"MI300X", "MI300X", 1307.4, 1307.4, 653.7, 163.4,
              "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html"),
)

_MEASURED: dict[tuple[str, str, int], float] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None,
                         seconds: float = 0.3) -> float:
    """FLOP/s of the fastest of repeated `size` x `size` matmuls at `dtype` on `device` with the
    process's current threads (about `seconds` of work), cached per (device, dtype, threads)."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    key = (str(device), str(dtype), threads)
    if key in _MEASURED:
        return _MEASURED[key]
    n = size or (1024 if device.type == "cpu" else 8192)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, packing buffers
    _sync(device)
    best = math.inf
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or (time.perf_counter() < deadline and reps < 50):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    _MEASURED[key] = 2.0 * n ** 3 / best
    return _MEASURED[key]


def _table_entry(name: str) -> PeakEntry | None:
    return next((e for e in PEAK_TABLE if re.search(e.pattern, name, flags=re.IGNORECASE)), None)


def _tf32_allowed() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) of one `device` at `dtype` (the autocast dtype, or float32).

    CUDA: the dense peak of `PEAK_TABLE` matched on `torch.cuda.get_device_name`; fp32 reads the TF32
    column when torch allows TF32 matmuls. A GPU or dtype the table lacks, and the CPU, get a measured
    matmul peak (`measured_matmul_peak`: cached per process, at the process's threads).
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        entry = _table_entry(name)
        if entry is not None:
            column = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
            if column is None and dtype == torch.float32:
                column = "tf32" if _tf32_allowed() and entry.tf32 is not None else "fp32"
            value = getattr(entry, column) if column else None
            if value is not None:
                return value * 1e12, f"{entry.name} dense {column} datasheet peak ({entry.source})"
        how = f"measured matmul peak at {dtype} on {name} (not in the peak table)"
        return measured_matmul_peak(device, dtype), how
    value = measured_matmul_peak(device, dtype)
    return value, f"measured {device.type} matmul peak at {dtype}, {torch.get_num_threads()} threads"


# ---- memory and the per-step meter ---------------------------------------------------------------------

def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: `torch.cuda.max_memory_allocated(device)`; otherwise this process's peak resident set
    size (VmHWM of /proc/self/status, else `ru_maxrss`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if os.uname().sysname == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class Throughput:
    """Per-step meter of a run.

    flops_per_step: FLOPs of one optimizer step on one process (`count_step_flops` x micro-batches),
    or None when not counted (no FLOP/s or MFU then). peak: one device's peak FLOP/s (`peak_flops`).
    `update(images, seconds, data_wait)` once per step: images of the step (the caller decides whether
    they are this process's or all processes'), the step's wall time including the data wait, and the
    seconds spent waiting for the batch. `window()` gives the figures since its last call and starts a
    new window; `totals()` the figures of the whole run.
    """

    def __init__(self, device: torch.device, flops_per_step: int | None = None, peak: float | None = None) -> None:
        self.device = torch.device(device)
        self.flops_per_step = flops_per_step
        self.peak = peak
        self._total = [0, 0, 0.0, 0.0]   # steps, images, seconds, data-wait seconds
        self._window = [0, 0, 0.0, 0.0]

    def update(self, images: int, seconds: float, data_wait: float = 0.0) -> None:
        """Record one step."""
        for acc in (self._total, self._window):
            acc[0] += 1
            acc[1] += int(images)
            acc[2] += float(seconds)
            acc[3] += float(data_wait)

    def _figures(self, steps: int, images: int, seconds: float, wait: float) -> dict[str, float]:
        out = {"images_per_s": images / seconds if seconds > 0 else 0.0,
               "data_wait": wait / seconds if seconds > 0 else 0.0,
               "peak_memory_mb": peak_memory_bytes(self.device) / 2 ** 20}
        if self.flops_per_step is not None:
            achieved = steps * self.flops_per_step / seconds if seconds > 0 else 0.0
            out["flops_per_s"] = achieved
            if self.peak:
                out["mfu"] = achieved / self.peak
        return out

    def window(self) -> dict[str, float]:
        """Figures since the previous `window()` call (or the start); starts a new window."""
        figures = self._figures(*self._window)
        self._window = [0, 0, 0.0, 0.0]
        return figures

    def totals(self) -> dict[str, float]:
        """Figures over every step recorded; adds `steps`."""
        return {"steps": float(self._total[0]), **self._figures(*self._total)}

    def describe(self) -> str:
        """One line for the end-of-run summary."""
        t = self.totals()
        parts = [f"{t['images_per_s']:.1f} img/s"]
        if "flops_per_s" in t:
            parts.append(f"{t['flops_per_s'] / 1e12:.3g} TFLOP/s")
        if "mfu" in t:
            parts.append(f"MFU {100 * t['mfu']:.1f}% of {self.peak / 1e12:.3g} TFLOP/s")
        parts.append(f"data wait {100 * t['data_wait']:.0f}%")
        parts.append(f"peak memory {t['peak_memory_mb']:.0f} MB")
        return ", ".join(parts)
