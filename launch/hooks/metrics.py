"""Metrics every `train.log_every` steps: the progress bar, `metrics.jsonl` and TensorBoard.

A record holds the loss (mean over processes), learning rate, weight decay, gradient norm, throughput
(images/s over all processes, FLOP/s and MFU per device, data-wait share, peak memory: launch.throughput),
skipped samples and steps, and the objective's own metrics.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import Hook, StepResult, due


class MetricsLogger(Hook):
    def __init__(self, trainer: Any) -> None:
        self.every = trainer.cfg.train.log_every
        self.losses: list[float] = []  # this window's losses of steps not skipped
        self.skipped_steps = 0

    def after_step(self, trainer: Any, result: StepResult) -> None:
        trainer.log.start()  # the bar opens once a step has run: an input error at the first step stays one line
        self.skipped_steps += int(result.skipped)
        if not result.skipped:
            self.losses.append(result.loss)
        trainer.meter.update(result.images, result.seconds, result.data_wait)
        if not due(result.done, self.every, trainer.stop):
            return
        acc = trainer.accelerator
        local = torch.tensor([sum(self.losses), len(self.losses)], dtype=torch.float64, device=acc.device)
        total = acc.reduce(local, reduction="sum") if trainer.world > 1 else local
        loss = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        skipped = trainer.skips.total
        if trainer.world > 1:
            skipped = int(acc.reduce(torch.tensor(skipped, device=acc.device), reduction="sum"))
        record = {"loss": loss, "lr": result.lr, "weight_decay": result.weight_decay, **trainer.meter.window(),
                  "skipped_samples": skipped, "skipped_steps": self.skipped_steps}
        if math.isfinite(result.grad_norm):
            record["grad_norm"] = result.grad_norm
        record.update({k: float(v) for k, v in trainer.objective.metrics.items()
                       if isinstance(v, (int, float)) and k != "loss"})
        trainer.log.scalars(result.done, record)
        postfix = {"loss": f"{loss:.4f}", "lr": f"{result.lr:.2e}", "img/s": f"{record['images_per_s']:.0f}",
                   "wait": f"{record['data_wait']:.0%}"}
        if "mfu" in record:
            postfix["mfu"] = f"{record['mfu']:.1%}"
        if self.skipped_steps:
            postfix["skipped"] = str(self.skipped_steps)
        trainer.log.progress(result.done, postfix)
        trainer.last_loss = loss
        trainer.data_wait = trainer.meter.totals()["data_wait"]
        self.losses = []
