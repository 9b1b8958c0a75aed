"""Collapse monitor: a DINO-family loss that sits at ln K (a uniform output) for many steps has collapsed.

`Objective.collapse_loss()` declares the level (None: the objective has none). The monitor warns once per
episode when the per-step loss stays within 1 % of it for `window` consecutive steps; the objective's own
metrics (teacher entropy, KL to uniform) are logged with every record by the metrics hook.
"""

from __future__ import annotations

import math
from typing import Any

from .base import Hook, StepResult


class CollapseMonitor(Hook):
    def __init__(self, trainer: Any, window: int = 50, tolerance: float = 0.01) -> None:
        self.level = trainer.objective.collapse_loss()
        self.window = max(1, min(window, trainer.cfg.train.steps // 5))
        self.tolerance = tolerance
        self.near = 0
        self.warned = False

    def after_step(self, trainer: Any, result: StepResult) -> None:
        if self.level is None or result.skipped or not math.isfinite(result.loss):
            return
        if abs(result.loss - self.level) <= self.tolerance * self.level:
            self.near += 1
        else:
            self.near, self.warned = 0, False
        if self.near >= self.window and not self.warned:
            self.warned = True
            trainer.log.print(f"warning: step {result.done}: the loss has stayed within {self.tolerance:.0%} of "
                              f"{self.level:.3f} (ln K, a uniform output) for {self.near} steps: the run looks "
                              "collapsed; check teacher_entropy in metrics.jsonl and the recipe (docs/recipes.md)")
