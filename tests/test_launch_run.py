"""Launcher end to end in one process: a short run, exact resume, export, and every bad input
(one clear line, exit status 2, nothing overwritten)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

import ssl_vit
from launch.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run(args: list[str]) -> int:
    """main() in this process, with accelerate's process-wide state reset between runs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return main(args)


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return ["--objective", "dino", "--backbone", "vit", "--set", f"data.cache={cache}",
            "--set", "data.batch_size=8", "--set", "train.log_every=1", "--set", "train.val_batches=1",
            "--set", "train.val_every=3", "--set", "train.checkpoint_every=2", "--set", "data.shuffle_buffer=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, common):
    """4 steps straight; the same stopped at 2 and resumed to 4."""
    root = tmp_path_factory.mktemp("runs")
    straight, split = root / "straight", root / "split"
    assert run([*common, "--steps", "4", "--out", str(straight)]) == 0
    assert run([*common, "--steps", "4", "--out", str(split), "--set", "train.stop_at=2"]) == 0
    assert (split / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert run([*common, "--steps", "4", "--out", str(split), "--resume"]) == 0
    return straight, split


def test_run_outputs_and_export(runs, capsys):
    straight, _ = runs
    cfg = yaml.safe_load((straight / "config.yaml").read_text())
    assert cfg["backbone"] == "vit_tiny" and cfg["profile"] == "demo" and cfg["data"]["image_size"] == 32
    ckpt = straight / "checkpoints" / "step_0000004"
    assert {p.name for p in ckpt.iterdir()} >= {"objective.safetensors", "optimizer.pt", "rng.pt", "state.json",
                                                  "config.yaml"}
    assert not list((straight / "checkpoints").glob(".tmp-*"))
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4 and state["batches_consumed"] == 4 and state["backbone"] == "vit_tiny"
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(0 <= r["train/data_wait"] <= 1 and r["train/images_per_s"] > 0 for r in train)
    assert any("val/loss" in r for r in records)
    assert list((straight / "tensorboard").iterdir())
    meta = json.loads((straight / "export" / "backbone.json").read_text())
    assert meta["registry_name"] == "vit_tiny" and meta["objective"] == "dino" and meta["step"] == 4
    assert (straight / "export" / "config.yaml").is_file()
    model = ssl_vit.load_backbone(straight / "export")  # the teacher (DINO exports it)
    teacher = {k[len("teacher.backbone."):]: v for k, v in load_file(ckpt / "objective.safetensors").items()
               if k.startswith("teacher.backbone.")}
    for k, v in model.state_dict().items():
        assert torch.equal(v, teacher[k]), k


def test_resume_gives_identical_weights(runs):
    straight, split = runs
    a = load_file(straight / "checkpoints" / "step_0000004" / "objective.safetensors")
    b = load_file(split / "checkpoints" / "step_0000004" / "objective.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    first = load_file(split / "checkpoints" / "step_0000002" / "objective.safetensors")
    assert not all(torch.equal(first[k], a[k]) for k in a)  # it did train after resuming
    sa = torch.load(straight / "checkpoints" / "step_0000004" / "optimizer.pt", weights_only=True)
    sb = torch.load(split / "checkpoints" / "step_0000004" / "optimizer.pt", weights_only=True)
    assert sa["param_groups"][0]["lr"] == sb["param_groups"][0]["lr"]
    assert all(torch.equal(sa["state"][i]["exp_avg"], sb["state"][i]["exp_avg"]) for i in sa["state"])


def _train_losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_resume_repeats_the_per_step_losses(runs):
    straight, split = runs
    a, b = _train_losses(straight), _train_losses(split)
    assert sorted(a) == [1, 2, 3, 4] and {3, 4} <= set(b)
    for step in (1, 2, 3, 4):
        if step in b:
            assert b[step] == pytest.approx(a[step], abs=1e-6), step


def test_only_the_last_checkpoints_are_kept(common, tmp_path):
    out = tmp_path / "keep"
    assert run([*common, "--steps", "3", "--out", str(out), "--set", "train.checkpoint_every=1",
                "--set", "train.keep_checkpoints=2"]) == 0
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_0000002", "step_0000003"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000003"


def _snapshot(folder):
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


@pytest.mark.parametrize("case", [
    "missing_data", "empty_data", "no_images", "unknown_objective", "unknown_backbone", "incompatible",
    "bad_yaml", "unknown_key", "resume_not_checkpoint", "resume_other_backbone", "out_has_checkpoints",
])
def test_bad_input_exits_2_with_one_line(case, runs, common, tmp_path, capsys):
    import tarfile

    straight, _ = runs
    out = tmp_path / "out"
    base = [*common, "--steps", "2", "--out", str(out)]
    (tmp_path / "empty").mkdir()
    with tarfile.open(tmp_path / "text.tar", "w") as tar:
        tar.add(__file__, arcname="a.txt")
    (tmp_path / "bad.yaml").write_text("optim: [1, 2\n")
    args = {
        "missing_data": [*base, "--data", str(tmp_path / "nope-{000..002}.tar")],
        "empty_data": [*base, "--data", str(tmp_path / "empty")],
        "no_images": [*base, "--data", str(tmp_path / "text.tar")],
        "unknown_objective": [*base, "--objective", "dinno"],
        "unknown_backbone": [*base, "--backbone", "vitt"],
        "incompatible": [*base, "--objective", "mp3", "--backbone", "cvt"],
        "bad_yaml": [*base, "--config", str(tmp_path / "bad.yaml")],
        "unknown_key": [*base, "--set", "optim.lrr=1"],
        "resume_not_checkpoint": [*base, "--resume", str(tmp_path / "empty")],
        "resume_other_backbone": [*base, "--backbone", "simple_vit", "--resume",
                                  str(straight / "checkpoints" / "step_0000004")],
        "out_has_checkpoints": [*common, "--steps", "4", "--out", str(straight)],
    }[case]
    before = _snapshot(straight)
    capsys.readouterr()
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    expect = {"missing_data": "does not exist", "empty_data": "no .tar", "no_images": "no images",
              "unknown_objective": "did you mean: dino", "unknown_backbone": "unknown backbone",
              "incompatible": "pos_free", "bad_yaml": "not valid YAML", "unknown_key": "closest: optim.lr",
              "resume_not_checkpoint": "is not a checkpoint", "resume_other_backbone": "belongs to backbone 'vit_tiny'",
              "out_has_checkpoints": "already holds checkpoints"}[case]
    assert expect in err[0]
    assert not out.exists()
    assert _snapshot(straight) == before


def test_help_lists_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "objectives:" in text and "dino" in text and "cvt_tiny" in text and "--resume" in text
    assert os.path.isfile("pretrain.py")


def test_knn_monitor_and_pictures_in_tensorboard(common, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "monitor"
    assert run([*common, "--steps", "2", "--out", str(out), "--set", "train.knn_every=2",
                "--set", "train.image_every=2", "--set", "train.knn_batches=4"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    knn = [r["val/knn_top1"] for r in records if "val/knn_top1" in r]
    assert len(knn) == 1 and 0.0 <= knn[0] <= 100.0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "images/attention" in events.Tags()["images"]
    assert "val/knn_top1" in events.Tags()["scalars"]


def test_fsdp_without_gpus_is_one_line(common, tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine can run FSDP")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "fsdp"
    assert run([*common, "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FSDP needs GPUs" in err[0]
    assert not out.exists()


def test_fused_adamw_takes_the_same_steps_as_the_loop():
    """optim.fused picks torch's fused AdamW on CPU; its updates equal the per-tensor loop's."""
    from launch.build import make_adamw

    torch.manual_seed(0)
    weights = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    copies = [w.detach().clone().requires_grad_(True) for w in weights]
    start = [w.detach().clone() for w in weights]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    fused = make_adamw([{"params": weights, "weight_decay": 0.05}], **kw)
    loop = make_adamw([{"params": copies, "weight_decay": 0.05}], **kw, fused=False)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for _ in range(3):
        for params, opt in ((weights, fused), (copies, loop)):
            opt.zero_grad()
            (params[0].sin().sum() + params[1].square().sum()).backward()
            opt.step()
    for a, b, a0 in zip(weights, copies, start):
        torch.testing.assert_close(a, b)
        assert (a - a0).abs().min() > 1e-3  # every weight moved
