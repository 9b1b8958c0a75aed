"""kill -9 at a (seeded) random step and in every phase of a checkpoint write and of the export, then
`--resume`: the per-step losses equal the uninterrupted run's (CPU fp32, 1e-6), every checkpoint under its
final name verifies, nothing is lost and the temporaries of the interrupted write are gone after the restart.

Each kill is a subprocess (tests/faults/common.py KILLER) that patches one function, as launch sees it, to
SIGKILL its own process on the N-th matching call; the resume runs in this process."""

from __future__ import annotations

import random
import signal

import pytest
import torch
from safetensors.torch import load_file

import ssl_vit
from launch import checkpoint as ckpt
from ssl_vit.files import verify_manifest

from .common import kill_run, leftovers, pretrain, tiny, train_losses

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 6
RANDOM_STEP = random.Random(12).randint(2, STEPS)  # seeded: the same "random" step on every run of the suite


def schedule(cache, out, *extra: str) -> list[str]:
    """6 steps, a checkpoint every 2 (steps 2, 4, 6), the last 2 kept."""
    return tiny(cache, "--steps", str(STEPS), "--set", "train.checkpoint_every=2", "--out", str(out), *extra)


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("kill") / "straight"
    rc, err, _ = pretrain(schedule(cache, out))
    assert rc == 0, err
    losses = train_losses(out)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    return out, dict(losses), load_file(out / "export" / "backbone.safetensors")


# name: (target "module:attr", mode, regex over the call's path arguments, nth matching call, extra args)
KILLS = {
    "random_step": ("launch.loop:train_step", "before", "", RANDOM_STEP, ()),
    "ckpt_weights_written": ("launch.checkpoint:save_file", "after", "", 2, ()),
    "ckpt_optimizer_written": ("torch:save", "after", r"optimizer\.pt$", 2, ()),
    "ckpt_before_rng": ("torch:save", "before", r"rng\.pt$", 2, ()),
    "ckpt_before_manifest": ("launch.checkpoint:write_manifest", "before", "", 2, ()),
    "ckpt_before_rename": ("os:replace", "before", r"/step_0000004$", 1, ()),
    "ckpt_before_latest": ("os:replace", "before", r"/checkpoints/latest$", 2, ()),
    "ckpt_latest_written": ("os:replace", "after", r"/checkpoints/latest$", 2, ()),
    "ckpt_mid_prune": ("shutil:rmtree", "partial", r"step_0000002", 1, ("--set", "train.keep_checkpoints=1")),
    "export_weights_written": ("ssl_vit.export:save_file", "after", "", 1, ()),
    "export_before_manifest": ("ssl_vit.export:write_manifest", "before", "", 1, ()),
    "export_before_rename": ("os:replace", "before", r"/export$", 1, ()),
}
def check_on_disk_after_kill(out) -> None:
    """What a kill may leave: every step_* folder and a present export verify; `latest` names one of them."""
    for path in ckpt.step_folders(out):
        verify_manifest(path)
    pointer = out / "checkpoints" / "latest"
    if pointer.exists():
        assert ckpt.latest(out) is not None, pointer.read_text()
        verify_manifest(ckpt.latest(out))
    if (out / "export").exists():
        verify_manifest(out / "export", what="export")


def check_resumed(out, straight) -> None:
    _, losses, export = straight
    got = train_losses(out)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), got  # replayed records dropped, none missing
    for step, loss in got:
        assert loss == pytest.approx(losses[step], abs=1e-6), step
    assert leftovers(out) == []
    newest = ckpt.step_folders(out)
    assert newest and newest[0].name == f"step_{STEPS:07d}"
    for path in newest:
        verify_manifest(path)
    assert ckpt.latest(out) == newest[0]
    model = ssl_vit.load_backbone(out / "export")  # verified, and the same weights as the straight run
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, export[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", list(KILLS))
def test_kill_then_resume(case, cache, straight, tmp_path):
    target, mode, match, nth, extra = KILLS[case]
    out = tmp_path / "run"
    killed = kill_run(target, schedule(cache, out, *extra), mode=mode, match=match, nth=nth)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    check_on_disk_after_kill(out)
    if case == "random_step":  # killed before step RANDOM_STEP ran: the checkpoints due before it are there
        done = RANDOM_STEP - 1
        assert [s for s, _ in train_losses(out)] == list(range(1, done + 1))
        assert [p.name for p in ckpt.step_folders(out)] == [f"step_{s:07d}" for s in (4, 2) if s <= done]
    else:
        assert ckpt.step_folders(out), "the checkpoint before the kill is gone"
    rc, err, _ = pretrain(schedule(cache, out, *extra, "--resume"))
    assert rc == 0, err
    check_resumed(out, straight)


def test_kill_while_replacing_an_export_keeps_one(cache, straight, tmp_path):
    """A run stopped at step 4 has exported; its resume is killed between moving that export aside and moving
    the new one in. The next resume must leave an export that verifies (it holds step 6's weights)."""
    out = tmp_path / "run"
    rc, err, _ = pretrain(schedule(cache, out, "--set", "train.stop_at=4"))
    assert rc == 0, err
    verify_manifest(out / "export", what="export")
    killed = kill_run("os:replace", schedule(cache, out, "--resume"), match=r"/export$")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    check_on_disk_after_kill(out)
    rc, err, _ = pretrain(schedule(cache, out, "--resume"))
    assert rc == 0, err
    check_resumed(out, straight)
