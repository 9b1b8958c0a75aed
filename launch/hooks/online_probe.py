"""Online linear probe (as solo-learn's, da Costa et al. 2022): a linear head on the frozen features of the
backbone to export, trained on the labelled samples of every training batch with its own optimizer, its top-1 on
the labelled `--val-data` logged every `train.online_probe_every` steps next to the k-NN monitor.

It never touches the backbone's gradients or the random state: features are computed in eval mode without a
graph (no dropout draws), and the head is not in the run's optimizer. The feature is the one the objective
trains (`Objective.trained_pool`: the mean of the patch tokens for masked-image objectives, else the pooled
output; without positions where `Objective.trained_positions` is False).
The head restarts after a resume (it is a monitor, not part of the checkpoint).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..data import make_loader
from ..knn import normalizer
from .base import Hook, StepResult, due
from .validation import _stream


def probe_features(trainer: Any, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> (B, D) features of the backbone to export, without a graph, in eval mode."""
    objective = trainer.objective
    backbone = objective.backbone if objective.trained_pool == "mean" else objective.export_backbone()
    d = trainer.cfg.data
    x = normalizer(d.mean, d.std, size=tuple(trainer.specs[0].size))(images.to(trainer.accelerator.device))
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone.forward_features(x, use_pos=objective.trained_positions)
    finally:
        backbone.train(was_training)
    feats = out.patch_tokens.mean(1) if objective.trained_pool == "mean" else out.pooled
    return feats.float()


class OnlineProbe(Hook):
    def __init__(self, trainer: Any, lr: float = 1e-3) -> None:
        t = trainer.cfg.train
        self.every = t.online_probe_every if trainer.plan.val_urls and trainer.frames is None else 0
        self.lr = lr
        self.head: torch.nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _grow(self, dim: int, classes: int, device: torch.device) -> None:
        """A head for `classes` classes, keeping what the old one learned."""
        old = self.head
        with torch.random.fork_rng(devices=[]):  # its initial weights must not move the run's random stream
            self.head = torch.nn.Linear(dim, classes).to(device)
        if old is not None:
            with torch.no_grad():
                self.head.weight[: old.out_features] = old.weight
                self.head.bias[: old.out_features] = old.bias
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=self.lr)

    def train_head(self, trainer: Any, images: torch.Tensor, labels: torch.Tensor) -> None:
        acc = trainer.accelerator
        labels = labels.to(acc.device)
        known = labels >= 0
        classes = int(labels.max()) + 1 if bool(known.any()) else 0
        if trainer.world > 1:  # every process grows its head alike
            classes = int(acc.reduce(torch.tensor(classes, device=acc.device), reduction="max"))
        if classes == 0:
            return
        feats = probe_features(trainer, images)
        if self.head is None or classes > self.head.out_features:
            self._grow(feats.shape[1], max(classes, self.head.out_features if self.head else 0), acc.device)
        loss = F.cross_entropy(self.head(feats[known]), labels[known]) if bool(known.any()) else \
            self.head.weight.sum() * 0.0
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if trainer.world > 1:  # one head for all processes: average its gradients
            for p in self.head.parameters():
                p.grad = acc.reduce(p.grad, reduction="mean")
        self.optimizer.step()

    @torch.no_grad()
    def top1(self, trainer: Any) -> float:
        acc = trainer.accelerator
        counts = torch.zeros(2, device=acc.device)
        loader = make_loader(_stream(trainer, trainer.plan.val_urls, need_labels=True),
                             min(1, trainer.cfg.data.num_workers))
        for batch in loader:
            labels = batch["label"].to(acc.device)
            pred = self.head(probe_features(trainer, batch["image"])).argmax(-1)
            counts += torch.stack([(pred == labels).sum().float(), torch.tensor(float(len(labels)), device=acc.device)])
        counts = acc.reduce(counts, reduction="sum") if trainer.world > 1 else counts
        return float(100.0 * counts[0] / counts[1].clamp_min(1))

    def after_step(self, trainer: Any, result: StepResult) -> None:
        if not self.every:
            return
        self.train_head(trainer, result.batch["image"], result.batch["label"])
        if due(result.done, self.every, trainer.stop) and self.head is not None:
            devices = [trainer.accelerator.device] if trainer.accelerator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # the loader draws worker seeds
                top1 = self.top1(trainer)
            trainer.log.scalars(result.done, {"online_probe_top1": top1}, prefix="val")
            trainer.log.print(f"step {result.done}: online linear probe top-1 {top1:.2f}%")
