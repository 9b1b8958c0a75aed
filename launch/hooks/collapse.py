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

A forecast, before either target collapse shows: `view_agreement` (`objectives.dino.view_agreement`) below
`agreement_needed` (teacher_temp / student_temp), averaged over the first `agreement_steps` steps, means the
run's views change each image more than the sharpening can hold: near a uniform output the targets flatten
instead of sharpening. The monitor says so once, with what to change.
"""

from __future__ import annotations

import math
from typing import Any

from .base import Hook, StepResult


class CollapseMonitor(Hook):
    def __init__(self, trainer: Any, window: int | None = None, tolerance: float = 0.01,
                 rank_fraction: float = 0.25, rank_smoothing: int = 10, agreement_steps: int = 5) -> None:
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
        self.agreement_steps = agreement_steps
        self.agreements: list[tuple[float, float]] = []  # (view_agreement, agreement_needed) of the first steps

    def after_step(self, trainer: Any, result: StepResult) -> None:
        if self.level is None or result.skipped or not math.isfinite(result.loss):
            return
        metrics = trainer.objective.metrics
        self.watch_targets(trainer, result, metrics)
        if "feature_rank" in metrics:
            self.watch_rank(trainer, result, float(metrics["feature_rank"]))
        if "view_agreement" in metrics and len(self.agreements) < self.agreement_steps:
            self.forecast(trainer, result, float(metrics["view_agreement"]), float(metrics["agreement_needed"]))

    def forecast(self, trainer: Any, result: StepResult, agreement: float, needed: float) -> None:
        if not math.isfinite(agreement):
            return
        self.agreements.append((agreement, needed))
        if len(self.agreements) < self.agreement_steps:
            return
        agreement = sum(a for a, _ in self.agreements) / len(self.agreements)
        needed = sum(n for _, n in self.agreements) / len(self.agreements)
        if agreement < needed:
            trainer.log.print(
                f"warning: step {result.done}: the student's views carry {agreement:.2f} of the teacher's "
                f"image-to-image variation (view_agreement), below the {needed:.2f} that teacher_temp / student_temp "
                "needs: the targets will likely drift to a uniform output. Milder views (fewer local crops, "
                "photometric_augment=false) raise it; a teacher_temp below view_agreement x student_temp lowers "
                "the need; see docs/recipes.md")

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
