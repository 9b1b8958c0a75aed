"""Divergence: a huge learning rate, an injected inf loss, NaN gradients and a non-finite weight. A bad step is
skipped (no update, counted in metrics.jsonl `train/skipped_steps`); after `train.max_bad_steps` in a row, or at
once for a non-finite weight, the run stops with exit status 3 and one line, with no non-finite tensor in any
checkpoint or export on disk and the last good checkpoint intact and not pruned. (`data.std=[0,0,0]` is refused
by the config validation: tests/faults/test_bad_inputs.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from launch import checkpoint as ckpt
from launch.throughput import is_counting
from objectives import MAE
from ssl_vit.files import verify_manifest

from .common import finite_on_disk, leftovers, pretrain, tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def args(cache, out, *extra: str) -> list[str]:
    return tiny(cache, "--set", "train.checkpoint_every=2", "--set", "train.max_bad_steps=2",
                "--set", "train.keep_checkpoints=1", "--out", str(out), *extra)


def inject(monkeypatch, bad_from: int, bad_until: int = 10**9, *, kind: str = "loss") -> None:
    """From the `bad_from`-th training forward of MAE (counting from 1) to `bad_until`: an inf loss, or a finite
    loss whose gradients are NaN."""
    forward, calls = MAE.forward, [0]

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    def patched(self, *a, **k):
        loss = forward(self, *a, **k)
        if not self.training or is_counting():  # validation, or the loop's one-off FLOP count
            return loss
        calls[0] += 1
        if bad_from <= calls[0] <= bad_until:
            return loss * float("inf") if kind == "loss" else NanGrad.apply(loss)
        return loss

    monkeypatch.setattr(MAE, "forward", patched)


def check_stopped(out, rc: int, err: list[str], *, good: str) -> None:
    """Exit 3, one line, nothing non-finite on disk, `good` (the last good checkpoint) intact and the newest."""
    assert rc == 3, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "diverged" in err[0] or "not finite" in err[0], err[0]
    assert finite_on_disk(out) == []
    assert ckpt.step_folders(out)[0].name == good
    verify_manifest(out / "checkpoints" / good)
    assert ckpt.latest(out).name == good
    assert not (out / "export").exists()
    assert leftovers(out) == []


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_injected_non_finite_steps_stop_the_run(kind, cache, tmp_path, monkeypatch):
    """Steps 1-2 good (checkpoint step 2); from step 3 every step is bad: steps 3 and 4 skipped, stop at 4."""
    inject(monkeypatch, 3, kind=kind)
    out = tmp_path / "run"
    good = out / "checkpoints" / "step_0000002"
    rc, err, _ = pretrain(args(cache, out, "--steps", "6"))
    check_stopped(out, rc, err, good=good.name)
    assert "2 consecutive non-finite steps up to step 4" in err[0] and str(good) in err[0]
    train = [r for r in records(out) if "train/loss" in r]
    assert [(r["step"], r["train/skipped_steps"]) for r in train] == [(1, 0), (2, 0), (3, 1)]


def test_one_bad_step_is_skipped_and_the_run_goes_on(cache, tmp_path, monkeypatch):
    """Only step 2 is bad: skipped (the weights after it equal those after step 1), counted, and the run ends."""
    inject(monkeypatch, 2, 2)
    out = tmp_path / "run"
    rc, err, _ = pretrain(args(cache, out, "--steps", "3", "--set", "train.checkpoint_every=1",
                               "--set", "train.keep_checkpoints=3"))
    assert rc == 0, err
    train = [r for r in records(out) if "train/loss" in r]
    assert [r["train/skipped_steps"] for r in train] == [0, 1, 1]
    one, two = (load_file(out / "checkpoints" / f"step_000000{s}" / "objective.safetensors") for s in (1, 2))
    assert all(torch.equal(one[k], two[k]) for k in one)  # no update at the skipped step
    assert finite_on_disk(out) == []
    verify_manifest(out / "export", what="export")


def test_non_finite_weight_stops_at_once(cache, tmp_path, monkeypatch):
    """A weight turned inf after step 3 (the update itself went wrong): exit 3 at that step, nothing written."""
    import launch.loop

    step_fn = launch.loop.train_step

    def patched(trainer, step):
        result = step_fn(trainer, step)
        if step == 2:  # the third step
            with torch.no_grad():
                next(trainer.objective.parameters()).view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(launch.loop, "train_step", patched)
    out = tmp_path / "run"
    rc, err, _ = pretrain(args(cache, out, "--steps", "6"))
    check_stopped(out, rc, err, good="step_0000002")
    assert "is not finite at step 3" in err[0]


def test_huge_learning_rate(cache, tmp_path):
    """optim.lr=1e6: the weights blow up, the loss turns non-finite from step 2 on, and the run stops at step 3
    (train.max_bad_steps=2) with exit status 3; the step-2 checkpoint (finite weights) is the last good one."""
    out = tmp_path / "run"
    rc, err, _ = pretrain(args(cache, out, "--steps", "6", "--set", "optim.lr=1e6"))
    check_stopped(out, rc, err, good="step_0000002")
    assert "likely causes" in err[0] and "optim.lr" in err[0]
    assert max(r.get("train/skipped_steps", 0) for r in records(out)) >= 1
