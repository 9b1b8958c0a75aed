"""The loop's hooks and its clipping, on a stand-in trainer: the guard stops a diverging run, the collapse
monitor warns on both collapses, per-parameter clipping follows DINO's formula."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from launch.errors import DivergedError
from launch.hooks import StepResult
from launch.hooks.collapse import CollapseMonitor
from launch.hooks.guard import NonFiniteGuard
from launch.loop import clip_gradients
from launch.strategy import Strategy

DDP = Strategy(SimpleNamespace(mixed_precision="no"))  # the replicated strategy, as one process runs it


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str) -> None:
        self.lines.append(text)


def trainer(level: float | None = None, *, max_bad: int = 3, metrics: dict | None = None, model=None):
    objective = model or torch.nn.Linear(2, 2)
    objective.metrics = metrics if metrics is not None else {}
    objective.collapse_loss = lambda: level
    train = SimpleNamespace(max_bad_steps=max_bad, steps=1000, log_every=1000, checkpoint_every=1000)
    return SimpleNamespace(cfg=SimpleNamespace(train=train), objective=objective, log=Log(), stop=1000,
                           last_checkpoint=None, strategy=DDP)


def result(step: int, loss: float, skipped: bool = False) -> StepResult:
    return StepResult(step, loss, 1.0, 1e-3, 0.0, skipped, 8, 0.0, 0.1, {})


def test_guard_counts_skips_and_stops_after_the_limit():
    t = trainer(max_bad=3)
    guard = NonFiniteGuard(t)
    guard.after_step(t, result(0, math.nan, skipped=True))
    guard.after_step(t, result(1, 1.0))  # a good step resets the count
    guard.after_step(t, result(2, math.inf, skipped=True))
    guard.after_step(t, result(3, math.nan, skipped=True))
    with pytest.raises(DivergedError, match="3 consecutive non-finite steps up to step 5"):
        guard.after_step(t, result(4, math.nan, skipped=True))
    assert len(t.log.lines) == 4 and "skipped" in t.log.lines[0]


def test_guard_stops_on_a_non_finite_weight():
    t = trainer()
    t.cfg.train.log_every = 1
    with torch.no_grad():
        t.objective.weight[0, 0] = math.nan
    with pytest.raises(DivergedError, match="weight weight is not finite"):
        NonFiniteGuard(t).after_step(t, result(0, 1.0))


def test_collapse_monitor_warns_once_at_ln_k_and_not_elsewhere():
    level = math.log(256)
    t = trainer(level)
    monitor = CollapseMonitor(t, window=5)
    for step in range(4):
        monitor.after_step(t, result(step, level * 1.005))
    assert not t.log.lines
    for step in range(4, 12):
        monitor.after_step(t, result(step, level * 0.998))
    assert len(t.log.lines) == 1 and "uniform" in t.log.lines[0]
    healthy = trainer(level)
    monitor = CollapseMonitor(healthy, window=5)
    for step in range(20):
        monitor.after_step(healthy, result(step, level * 0.6))
    assert not healthy.log.lines


def test_collapse_monitor_sees_one_prototype_collapse():
    level = math.log(256)
    t = trainer(level, metrics={"teacher_entropy": 0.01, "kl_to_uniform": level * 0.99})
    monitor = CollapseMonitor(t, window=3)
    for step in range(3):
        monitor.after_step(t, result(step, 2.0))
    assert len(t.log.lines) == 1 and "one prototype" in t.log.lines[0]
    assert CollapseMonitor(trainer(None), window=1).level is None


def test_collapse_monitor_sees_dimensional_collapse():
    """Targets healthy and the loss falling, the features' effective rank falling to a tenth: one warning."""
    level = math.log(256)
    t = trainer(level, metrics={"teacher_entropy": 3.0, "kl_to_uniform": 0.5})
    monitor = CollapseMonitor(t, window=5)
    for step in range(60):
        t.objective.metrics["feature_rank"] = 20.0 if step < 20 else 2.0
        monitor.after_step(t, result(step, 3.0 - step / 100))
    assert len(t.log.lines) == 1 and "effective rank" in t.log.lines[0] and "from 20.0" in t.log.lines[0]
    steady = trainer(level, metrics={"teacher_entropy": 3.0, "kl_to_uniform": 0.5})
    monitor = CollapseMonitor(steady, window=5)
    for step in range(60):  # noisy, and down by half: no warning
        steady.objective.metrics["feature_rank"] = (20.0 if step < 20 else 10.0) + (-1) ** step * 3
        monitor.after_step(steady, result(step, 3.0))
    assert not steady.log.lines


def test_collapse_monitor_forecasts_a_drift_to_uniform_from_the_views():
    """view_agreement below agreement_needed over the first steps: one warning, at the end of them; above it,
    none."""
    level = math.log(256)
    for agreement, warned in ((0.13, True), (0.55, False)):
        t = trainer(level, metrics={"teacher_entropy": 3.0, "kl_to_uniform": 0.5, "view_agreement": agreement,
                                    "agreement_needed": 0.4})
        monitor = CollapseMonitor(t, window=5, agreement_steps=4)
        for step in range(3):
            monitor.after_step(t, result(step, 3.0))
        assert not t.log.lines
        for step in range(3, 20):
            monitor.after_step(t, result(step, 3.0))
        assert len(t.log.lines) == int(warned)
        if warned:
            assert "step 4" in t.log.lines[0] and "0.13" in t.log.lines[0] and "0.40" in t.log.lines[0]


@pytest.mark.parametrize("mode", ["global", "per_param"])
def test_clipping_follows_its_formula(mode):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    before = [p.grad.clone() for p in model.parameters()]
    optim = SimpleNamespace(clip_grad=1.0, clip_mode=mode)
    t = SimpleNamespace(cfg=SimpleNamespace(optim=optim), objective=model, scaler=None, strategy=DDP)
    total = clip_gradients(t)
    assert torch.isclose(total, torch.linalg.vector_norm(torch.stack([g.norm() for g in before])))
    for g, p in zip(before, model.parameters()):
        if mode == "per_param":  # DINO's utils.clip_gradients: each parameter's norm on its own
            expect = g * min(1.0, 1.0 / (g.norm().item() + 1e-6))
        else:
            expect = g * min(1.0, 1.0 / (total.item() + 1e-6))
        torch.testing.assert_close(p.grad, expect)


def test_online_probe_logs_top1_and_leaves_training_alone(tmp_path):
    """The same backbone weights with and without the online probe; its top-1 is in metrics.jsonl."""
    import json

    from safetensors.torch import load_file

    from .test_launch_run import run

    common = ["--objective", "mae", "--backbone", "vit", "--steps", "3", "--set", "data.batch_size=8",
              "--set", "data.num_workers=0", "--set", "train.val_batches=0", "--set", "train.log_every=1",
              "--set", f"data.cache={tmp_path / 'c'}"]
    assert run([*common, "--out", str(tmp_path / "plain")]) == 0
    assert run([*common, "--set", "train.online_probe_every=3", "--out", str(tmp_path / "probe")]) == 0
    a = load_file(tmp_path / "plain" / "checkpoints" / "step_0000003" / "objective.safetensors")
    b = load_file(tmp_path / "probe" / "checkpoints" / "step_0000003" / "objective.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "probe" / "metrics.jsonl").read_text().splitlines()]
    top1 = [r["val/online_probe_top1"] for r in records if "val/online_probe_top1" in r]
    assert len(top1) == 1 and 0.0 <= top1[0] <= 100.0
