"""Attention maps (and reconstructions, for objectives that declare `can_reconstruct`) of the backbone to
export, written to TensorBoard every `train.image_every` steps by the main process."""

from __future__ import annotations

from typing import Any

from ..visualize import log_images
from .base import Hook, StepResult
from .validation import view_normalizer


class Pictures(Hook):
    def __init__(self, trainer: Any) -> None:
        self.every = trainer.cfg.train.image_every if trainer.frames is None else 0

    def after_step(self, trainer: Any, result: StepResult) -> None:
        if not self.every or result.done % self.every or not trainer.main or trainer.log.tb is None:
            return
        d = trainer.cfg.data
        log_images(trainer.log.tb, result.done, backbone=trainer.objective.export_backbone(),
                   images=result.batch["image"][:4], prepare=view_normalizer(trainer), objective=trainer.objective,
                   mean=d.mean, std=d.std)
