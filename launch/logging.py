"""Run logging on the main process: a tqdm bar, TensorBoard scalars and `metrics.jsonl`.

Other processes get a `RunLogger(enabled=False)` whose methods do nothing, so the loop calls the
same methods everywhere and only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ssl_vit.files import atomic_write_text

from .build import resolve_precision

METRICS = "metrics.jsonl"


class RunLogger:
    """Progress bar (step, loss, lr, images/s, data-wait share), TensorBoard and JSONL metrics."""

    def __init__(self, out_dir: str | Path, *, total: int, initial: int = 0, enabled: bool = True,
                 tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        self._bar_args = dict(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True,
                              file=sys.stderr, mininterval=1.0)
        self.jsonl = open(out_dir / METRICS, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run drops the events a crashed run logged past its checkpoint
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=initial + 1 if initial else None)
            except Exception as err:  # TensorBoard missing or broken: JSONL still has every scalar
                print(f"TensorBoard logging off: {err}", file=sys.stderr)

    def start(self) -> None:
        """Open the progress bar (after the start-up summary is printed)."""
        if self.enabled and self.bar is None:
            self.bar = tqdm(**self._bar_args)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def progress(self, step: int, postfix: Mapping[str, str]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(postfix, refresh=False)

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        # non-finite values are written as null: metrics.jsonl stays strict JSON
        record = {"step": step, "time": round(time.time(), 3),
                  **{f"{prefix}/{k}": float(v) if math.isfinite(float(v)) else None for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def truncate_metrics(out_dir: str | Path, step: int) -> int:
    """Drop the records of `metrics.jsonl` past `step` (a resumed run logs them again); returns how many.
    Unreadable lines (a crash mid-write) are dropped too."""
    path = Path(out_dir) / METRICS
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            ok = int(record["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def summary_lines(trainer: Any) -> list[str]:
    """The start-up summary: what trains on what, the batch and learning-rate arithmetic, the steps."""
    cfg, plan, acc = trainer.cfg, trainer.plan, trainer.accelerator
    d, o = cfg.data, cfg.optim
    preset = (f" (the {cfg.backbone_size} preset of {plan.requested_backbone}: {cfg.profile} profile)"
              if plan.requested_backbone and plan.backbone_name != plan.requested_backbone else "")
    frames = trainer.frames
    views = ", ".join(f"{s.count}x{f'{s.frames or frames}x' if frames else ''}{s.size[0]}x{s.size[1]} {s.name}"
                      for s in trainer.specs)
    params = sum(p.numel() for p in trainer.backbone.parameters()) / 1e6
    return [
        f"objective {cfg.objective} on backbone {plan.backbone_name}{preset}, {params:.2f}M backbone parameters",
        f"data {d.train} ({len(plan.train_urls)} shards), canvas {d.image_size} px"
        + (f", clips of {frames} frames {d.frame_stride} apart" if frames else "") + f", views {views}",
        f"processes {trainer.world}, batch {d.batch_size} per process x {o.grad_accum} accumulation = global batch "
        f"{trainer.global_batch}",
        f"lr {o.lr} x ({trainer.global_batch}/{o.base_batch}) [{o.lr_scaling}] = {trainer.peak_lr:.3g}, warm-up "
        f"{trainer.warmup} steps, cosine to {o.min_lr}; weight decay {o.weight_decay} -> {o.weight_decay_end}; "
        f"clipping {o.clip_grad or 'off'} ({o.clip_mode})",
        f"steps {trainer.start} -> {trainer.stop} of {trainer.total}, mixed precision {trainer.strategy.precision}"
        + (" (auto: this CPU computes bf16 natively; --set train.mixed_precision=no for fp32)"
           if cfg.train.mixed_precision == "auto" and resolve_precision(cfg) == "bf16" and acc.device.type == "cpu"
           else "") + ", "
        f"device {acc.device}, out {plan.out}" + (f", resumed from {plan.resume}" if plan.resume else ""),
        f"strategy {trainer.strategy.describe()}",
    ]
