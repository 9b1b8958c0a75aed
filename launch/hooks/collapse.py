"""Collapse monitor for the DINO family, whose `Objective.collapse_loss()` declares ln K (None: no such level).

Two collapses (Caron et al. 2021, Sec. 5.3): to a uniform output, where the loss sits at ln K and the
teacher's entropy near ln K; and to one prototype, where the teacher's batch-mean output is far from uniform
(`kl_to_uniform` near ln K). The monitor warns once per episode when either holds for `window` consecutive
steps (the loss within 1 % of ln K, the entropy above 95 % of it, or the KL above 90 % of it); the metrics
themselves are logged with every record by the metrics hook.
"""

from __future__ import annotations

import math
from typing import Any

from .base import Hook, StepResult


class CollapseMonitor(Hook):
    def __init__(self, trainer: Any, window: int | None = None, tolerance: float = 0.01) -> None:
        self.level = trainer.objective.collapse_loss()
        # default: a fifth of the run, between 10 and 50 steps (a few early steps near ln K are normal)
        self.window = window if window is not None else max(10, min(50, trainer.cfg.train.steps // 5))
        self.tolerance = tolerance
        self.near = 0
        self.warned = False

    def after_step(self, trainer: Any, result: StepResult) -> None:
        if self.level is None or result.skipped or not math.isfinite(result.loss):
            return
        metrics = trainer.objective.metrics
        uniform = abs(result.loss - self.level) <= self.tolerance * self.level or \
            float(metrics.get("teacher_entropy", 0.0)) > 0.95 * self.level
        one_prototype = float(metrics.get("kl_to_uniform", 0.0)) > 0.9 * self.level
        if uniform or one_prototype:
            self.near += 1
        else:
            self.near, self.warned = 0, False
        if self.near >= self.window and not self.warned:
            self.warned = True
            what = "a uniform output (loss or teacher entropy at ln K)" if uniform else "one prototype for every image"
            trainer.log.print(f"warning: step {result.done}: for {self.near} steps the teacher has given {what}, "
                              f"ln K = {self.level:.3f}: the run looks collapsed; see teacher_entropy and "
                              "kl_to_uniform in metrics.jsonl and the recipe notes in docs/recipes.md")
