"""The loop's side tasks, one module each, run in this order after every step (and at start and end):

- `guard.NonFiniteGuard`: counts skipped non-finite steps, stops a diverging run (exit status 3);
- `collapse.CollapseMonitor`: warns when a DINO-family loss stays at its collapse level (ln K);
- `metrics.MetricsLogger`: progress bar, metrics.jsonl and TensorBoard every `train.log_every` steps;
- `validation.Validation`: the objective's loss on `--val-data` every `train.val_every` steps;
- `validation.KnnMonitor`: DINO's weighted k-NN of the backbone to export every `train.knn_every` steps;
- `online_probe.OnlineProbe`: a linear head on frozen features, its top-1 every `train.online_probe_every` steps;
- `pictures.Pictures`: attention maps and reconstructions in TensorBoard every `train.image_every` steps;
- `checkpointing.Checkpointing`: a checkpoint every `train.checkpoint_every` steps and at the end.

A hook is a `base.Hook`: `on_start(trainer)`, `after_step(trainer, result)`, `on_end(trainer)`.
"""

from __future__ import annotations

from typing import Any

from .base import Hook, StepResult
from .checkpointing import Checkpointing
from .collapse import CollapseMonitor
from .guard import NonFiniteGuard
from .metrics import MetricsLogger
from .online_probe import OnlineProbe
from .pictures import Pictures
from .validation import KnnMonitor, Validation

__all__ = ["Hook", "StepResult", "default_hooks"]


def default_hooks(trainer: Any) -> list[Hook]:
    """The hooks of a pretraining run, in the order they run."""
    return [NonFiniteGuard(trainer), CollapseMonitor(trainer), MetricsLogger(trainer), Validation(trainer),
            KnnMonitor(trainer), OnlineProbe(trainer), Pictures(trainer), Checkpointing(trainer)]
