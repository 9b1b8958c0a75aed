"""The non-finite guard: a run never trains on, or writes, NaN or inf.

The loop skips an optimizer step whose loss or gradient norm is not finite on any process (no update, no
schedule change for the weights). This hook counts those skips, says so at once, and stops the run
(`DivergedError`, exit status 3) after `train.max_bad_steps` consecutive ones or as soon as a weight is not
finite (checked every `train.log_every` steps and before every checkpoint). Checkpoints and the export refuse
non-finite tensors themselves, so the last good checkpoint stays the newest.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import DivergedError
from ..strategy import first_non_finite
from .base import Hook, StepResult, due

__all__ = ["CAUSES", "NonFiniteGuard", "first_non_finite"]

CAUSES = ("likely causes: a learning rate too high for this batch (optim.lr, optim.warmup), no or too loose "
          "gradient clipping (optim.clip_grad), fp16 overflow (train.mixed_precision=bf16 or no), or bad inputs")


class NonFiniteGuard(Hook):
    def __init__(self, trainer: Any) -> None:
        self.limit = trainer.cfg.train.max_bad_steps
        self.in_a_row = 0
        self.total = 0

    def after_step(self, trainer: Any, result: StepResult) -> None:
        if result.skipped:
            self.in_a_row += 1
            self.total += 1
            what = "loss" if not math.isfinite(result.loss) else "gradient norm"
            trainer.log.print(f"step {result.done}: non-finite {what}, optimizer step skipped "
                              f"({self.in_a_row} in a row, {self.total} in all; the run stops at {self.limit})")
            if self.in_a_row >= self.limit:
                raise DivergedError(f"diverged: {self.in_a_row} consecutive non-finite steps up to step {result.done}"
                                    f"; {CAUSES}; last good checkpoint: {trainer.last_checkpoint or 'none'}")
        else:
            self.in_a_row = 0
        if due(result.done, trainer.cfg.train.log_every, trainer.stop) or due(
                result.done, trainer.cfg.train.checkpoint_every, trainer.stop):
            bad = trainer.strategy.first_non_finite(trainer.objective)
            if bad is not None:
                raise DivergedError(f"diverged: weight {bad} is not finite at step {result.done}; {CAUSES}; last "
                                    f"good checkpoint: {trainer.last_checkpoint or 'none'}")
