"""Metrics every `train.log_every` steps: the progress bar, `metrics.jsonl` and TensorBoard.

A record holds the loss (mean over processes), learning rate, weight decay, gradient norm, images/s, the
share of time spent waiting for data, skipped samples and steps, and the objective's own metrics.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import Hook, StepResult, due


class MetricsLogger(Hook):
    def __init__(self, trainer: Any) -> None:
        self.every = trainer.cfg.train.log_every
        self._reset()
        self.skipped_steps = 0
        self.wait_total = self.time_total = 0.0

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.images = 0
        self.wait = self.seconds = 0.0

    def after_step(self, trainer: Any, result: StepResult) -> None:
        trainer.log.start()  # the bar opens once a step has run: an input error at the first step stays one line
        self.skipped_steps += int(result.skipped)
        if not result.skipped:
            self.losses.append(result.loss)
        self.images += result.images
        self.wait += result.data_wait
        self.seconds += result.seconds
        if not due(result.done, self.every, trainer.stop):
            return
        acc = trainer.accelerator
        local = torch.tensor([sum(self.losses), len(self.losses)], dtype=torch.float64, device=acc.device)
        total = acc.reduce(local, reduction="sum") if trainer.world > 1 else local
        loss = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        skipped = trainer.skips.total
        if trainer.world > 1:
            skipped = int(acc.reduce(torch.tensor(skipped, device=acc.device), reduction="sum"))
        seconds = max(self.seconds, 1e-9)
        record = {"loss": loss, "lr": result.lr, "weight_decay": result.weight_decay,
                  "images_per_s": self.images / seconds, "data_wait": self.wait / seconds,
                  "skipped_samples": skipped, "skipped_steps": self.skipped_steps}
        if math.isfinite(result.grad_norm):
            record["grad_norm"] = result.grad_norm
        record.update({k: float(v) for k, v in trainer.objective.metrics.items()
                       if isinstance(v, (int, float)) and k != "loss"})
        trainer.log.scalars(result.done, record)
        postfix = {"loss": f"{loss:.4f}", "lr": f"{result.lr:.2e}", "img/s": f"{record['images_per_s']:.0f}",
                   "wait": f"{record['data_wait']:.0%}"}
        if self.skipped_steps:
            postfix["skipped"] = str(self.skipped_steps)
        trainer.log.progress(result.done, postfix)
        trainer.last_loss = loss
        self.wait_total += self.wait
        self.time_total += self.seconds
        trainer.data_wait = self.wait_total / self.time_total if self.time_total else 0.0
        self._reset()
