"""Collapse monitor for the DINO family, whose `Objective.collapse_loss()` declares ln K (None: no such level).

Two collapses of the targets (Caron et al. 2021, Sec. 5.3): to a uniform output, where the loss sits at ln K
and the teacher's entropy near ln K; and to one prototype, where the teacher's batch-mean output is far from
uniform (`kl_to_uniform` near ln K). The monitor warns once per episode when either holds for `window`
consecutive steps (the loss within 1 % of ln K, the entropy above 95 % of it, or the KL above 90 % of it).

A third collapse leaves the targets sharp and spread and the loss falling: dimensional collapse, where the
backbone's features shrink to a few directions (Jing et al. 2022, arXiv:2110.09348). The objective's
`feature_rank` metric (`objectives.dino.effective_rank` of the teacher's centred pooled features) shows it;
the monitor smooths it over `rank_smoothing` steps (an EMA) and warns once when it falls below `rank_fraction`
of the run's smoothed peak. The metrics themselves are logged with every record by the metrics hook.
"""

from __future__ import annotations

import math
from typing import Any

from .base import Hook, StepResult


class CollapseMonitor(Hook):
    def __init__(self, trainer: Any, window: int | None = None, tolerance: float = 0.01,
                 rank_fraction: float = 0.25, rank_smoothing: int = 10) -> None:
        self.level = trainer.objective.collapse_loss()
        # default: a fifth of the run, between 10 and 50 steps (a few early steps near ln K are normal)
        self.window = window if window is not None else max(10, min(50, trainer.cfg.train.steps // 5))
        self.tolerance = tolerance
        self.rank_fraction, self.rank_smoothing = rank_fraction, rank_smoothing
        self.near = 0
        self.warned = False
        self.rank: float | None = None  # feature_rank smoothed over about `rank_smoothing` steps
        self.rank_peak = 0.0
        self.rank_warned = False

    def after_step(self, trainer: Any, result: StepResult) -> None:
        if self.level is None or result.skipped or not math.isfinite(result.loss):
            return
        metrics = trainer.objective.metrics
        self.watch_targets(trainer, result, metrics)
        if "feature_rank" in metrics:
            self.watch_rank(trainer, result, float(metrics["feature_rank"]))

    def watch_targets(self, trainer: Any, result: StepResult, metrics: dict[str, Any]) -> None:
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

    def watch_rank(self, trainer: Any, result: StepResult, rank: float) -> None:
        if not math.isfinite(rank):
            return
        self.rank = rank if self.rank is None else self.rank + (rank - self.rank) / self.rank_smoothing
        self.rank_peak = max(self.rank_peak, self.rank)
        if self.rank < self.rank_fraction * self.rank_peak and not self.rank_warned:
            self.rank_warned = True
            trainer.log.print(f"warning: step {result.done}: the effective rank of the teacher's features fell to "
                              f"{self.rank:.1f} from {self.rank_peak:.1f} (smoothed over {self.rank_smoothing} steps): "
                              "dimensional collapse, which the loss and the targets need not show; a lower lr "
                              "usually helps; see feature_rank in metrics.jsonl and docs/recipes.md")
