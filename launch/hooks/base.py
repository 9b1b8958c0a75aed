"""The hook contract of the training loop and the record of one step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StepResult:
    """One optimizer step as the hooks see it."""

    step: int  # the step just run, counting from 0
    loss: float  # this process's loss, mean over the micro-batches (nan or inf when non-finite)
    grad_norm: float  # the global gradient norm before clipping
    lr: float
    weight_decay: float
    skipped: bool  # the optimizer step was skipped: non-finite loss or gradient (on any process)
    images: int  # images of this step over all processes
    data_wait: float  # seconds this process waited for data
    seconds: float  # wall time of the step
    batch: dict[str, Any]  # the last micro-batch (uint8 images on the CPU)

    @property
    def done(self) -> int:
        """Steps completed, counting this one."""
        return self.step + 1


class Hook:
    """A side task of the loop. Every process calls every hook (some do collectives); only the main
    process writes. `after_step` may raise `launch.errors.DivergedError` to stop the run."""

    def on_start(self, trainer: Any) -> None:
        """After set-up, before the first step."""

    def after_step(self, trainer: Any, result: StepResult) -> None:
        """After every optimizer step (skipped or not)."""

    def on_end(self, trainer: Any) -> None:
        """After the last step, before the export."""


def due(done: int, every: int, stop: int) -> bool:
    """True every `every` steps and at the last step (`every` 0: never)."""
    return bool(every) and (done % every == 0 or done == stop)
