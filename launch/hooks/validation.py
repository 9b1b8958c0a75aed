"""Validation on `--val-data`: the objective's loss every `train.val_every` steps, and DINO's weighted k-NN
monitor (k=20, T=0.07; Caron et al. 2021, Sec. 4.1) of the backbone to export every `train.knn_every` steps.

Both fork the RNG and run without a graph, so training continues exactly as it would without them.
"""

from __future__ import annotations

from typing import Any

import torch

from objectives.views import make_views

from ..data import ShardStream, make_loader
from ..knn import knn_accuracy, normalizer
from .base import Hook, StepResult, due


def _devices(trainer: Any) -> list:
    return [trainer.accelerator.device] if trainer.accelerator.device.type == "cuda" else []


def _stream(trainer: Any, urls: list[str], *, need_labels: bool, training_canvas: bool = False) -> ShardStream:
    """A finite stream of `urls`; `training_canvas`: decoded as for training (aspect kept, with boxes), else
    the centre square that k-NN and probes read."""
    d = trainer.cfg.data
    canvas = {"decode_size": d.decode_size or d.image_size, "max_aspect": d.max_aspect} if training_canvas else {}
    return ShardStream(urls, batch_size=d.batch_size, image_size=d.image_size,
                       rank=trainer.accelerator.process_index, world=trainer.world, seed=0, infinite=False,
                       need_labels=need_labels, frames=trainer.frames, frame_stride=d.frame_stride, **canvas)


def validation_loss(trainer: Any) -> float:
    """Mean objective loss over `train.val_batches` batches of the validation shards (every process reads
    its part), in eval mode."""
    acc, objective = trainer.accelerator, trainer.objective
    loader = make_loader(_stream(trainer, trainer.plan.val_urls, need_labels=objective.needs_labels,
                                 training_canvas=True), min(1, trainer.cfg.data.num_workers))
    total = torch.zeros(2, device=acc.device)
    objective.eval()
    with torch.random.fork_rng(devices=_devices(trainer)), torch.no_grad():
        torch.manual_seed(1234 + acc.process_index)
        batches = iter(loader)
        for _ in range(trainer.cfg.train.val_batches):
            batch = next(batches, None)
            # FSDP: every forward all-gathers with every process, so all stop at the first one that runs out
            if not trainer.strategy.all_true(batch is not None):
                break
            views = make_views(batch["image"].to(acc.device), trainer.specs, normalize=trainer.norm,
                               boxes=batch["box"].to(acc.device))
            with acc.autocast():
                labels = batch["label"].to(acc.device) if objective.needs_labels else None
                loss = objective(views, labels=labels) if labels is not None else objective(views)
            n = float(len(batch["key"]))
            total += torch.stack([loss.float() * n, torch.tensor(n, device=acc.device)])
    objective.train()
    trainer.strategy.after_eval()
    total = acc.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp_min(1))


class Validation(Hook):
    def __init__(self, trainer: Any) -> None:
        t = trainer.cfg.train
        self.every = t.val_every if trainer.plan.val_urls and t.val_batches > 0 else 0

    def after_step(self, trainer: Any, result: StepResult) -> None:
        if due(result.done, self.every, trainer.stop):
            val = validation_loss(trainer)
            trainer.log.scalars(result.done, {"loss": val}, prefix="val")
            trainer.log.print(f"step {result.done}: val loss {val:.4f}")


def view_normalizer(trainer: Any):
    """uint8 batches -> normalised floats at the first view's size, as the backbone saw in training."""
    return normalizer(trainer.cfg.data.mean, trainer.cfg.data.std, size=tuple(trainer.specs[0].size))


class KnnMonitor(Hook):
    def __init__(self, trainer: Any) -> None:
        labelled = trainer.plan.val_urls and trainer.frames is None
        self.every = trainer.cfg.train.knn_every if labelled else 0

    def after_step(self, trainer: Any, result: StepResult) -> None:
        if not due(result.done, self.every, trainer.stop):
            return
        workers = min(1, trainer.cfg.data.num_workers)
        train = make_loader(_stream(trainer, trainer.plan.train_urls, need_labels=True), workers)
        val = make_loader(_stream(trainer, trainer.plan.val_urls, need_labels=True), workers)
        with torch.random.fork_rng(devices=_devices(trainer)):
            top1 = knn_accuracy(trainer.objective.export_backbone(), train, val, trainer.accelerator,
                                prepare=view_normalizer(trainer), max_batches=trainer.cfg.train.knn_batches)
        trainer.log.scalars(result.done, {"knn_top1": top1}, prefix="val")
        trainer.log.print(f"step {result.done}: k-NN top-1 {top1:.2f}%")
