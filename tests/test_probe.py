"""Linear probe, weighted k-NN, export.py from a real run, and the pictures (launch.probe, launch.knn,
launch.visualize, export.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ssl_vit
from launch.knn import extract_features, knn_accuracy, knn_classify, topk_accuracy
from launch.probe import train_linear_heads

ROOT = Path(__file__).resolve().parents[1]
# A short run on the embedded digits, shared by the end-to-end tests below.
PRETRAIN = ["--objective", "mae", "--backbone", "vit", "--steps", "60", "--set", "data.num_workers=0",
            "--set", "backbone_args.pool=mean"]


def _env(tmp: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "SSL_VIT_CACHE": str(tmp / "cache")}


def _run(args: list[str], tmp: Path, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(tmp), capture_output=True, text=True,
                         timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


class _OneProcess:  # the part of an Accelerator that extract_features uses, for one CPU process
    device = torch.device("cpu")
    num_processes = 1

    @staticmethod
    def autocast():
        return torch.autocast("cpu", enabled=False)


def test_knn_weighted_votes_follow_dino_formula():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
    scores = knn_classify(bank, labels, query, k=3, t=0.07, num_classes=2)
    sim = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T
    top, idx = sim.topk(3, dim=1)
    expected = torch.zeros(2, 2).scatter_add_(1, labels[idx], (top / 0.07).exp())
    torch.testing.assert_close(scores, expected)
    assert topk_accuracy(scores, torch.tensor([0, 1]), ks=(1,)) == [100.0]


def test_linear_heads_learn_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (200,), generator=g)
    x = F.one_hot(y, 4).float() * 3 + 0.3 * torch.randn(200, 4, generator=g)
    heads = train_linear_heads(x, y, [0.01, 0.1], 4, epochs=20, batch_size=32)
    assert len(heads) == 2
    with torch.no_grad():
        assert topk_accuracy(heads[1](x), y, ks=(1,))[0] > 95


def test_knn_monitor_on_backbone():
    model = ssl_vit.create_backbone("vit_tiny")
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8, generator=g),
                "label": torch.tensor([0, 1, 0, 1])} for _ in range(3)]
    f, y = extract_features(model, batches, _OneProcess())
    assert f.shape == (12, 64) and y.shape == (12,) and model.training  # mode restored
    acc = knn_accuracy(model, batches, batches, _OneProcess(), k=1)
    assert acc == 100.0  # each sample's nearest neighbour is itself


@pytest.mark.parametrize("argv, message", [
    (["--weights", "/nonexistent/export"], "not a backbone export"),
    (["--weights", "x", "--train", "a.tar"], "both --train and --val"),
])
def test_probe_bad_input_one_line_exit_2(argv, message, tmp_path):
    out = _run(["linear_probe.py", *argv], tmp_path, check=False)
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr


def test_export_bad_input_exit_2(tmp_path):
    out = _run(["export.py", str(tmp_path / "missing"), str(tmp_path / "out")], tmp_path, check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    model = ssl_vit.create_backbone("cvt_tiny")
    ssl_vit.save_backbone(model, tmp_path / "cvt")
    out = _run(["export.py", str(tmp_path / "cvt"), str(tmp_path / "o"), "--format", "timm"], tmp_path, check=False)
    assert out.returncode == 2 and "no timm counterpart" in out.stderr and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    _run(["pretrain.py", *PRETRAIN, "--out", str(tmp / "run")], tmp)
    return tmp / "run"


def test_export_from_run_matches_training_backbone(run_dir):
    from launch import checkpoint as ckpt
    from launch.build import restore

    tmp = run_dir.parent
    _run(["export.py", str(run_dir), str(tmp / "exp")], tmp)
    meta = json.loads((tmp / "exp" / "backbone.json").read_text())
    assert meta["objective"] == "mae" and meta["step"] == 60
    trained = restore(ckpt.latest(run_dir)).objective.export_backbone().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for folder in (tmp / "exp", run_dir / "export"):  # export.py and the launcher's own export
            assert torch.equal(ssl_vit.load_backbone(folder)(x), trained(x))
    out = _run(["export.py", str(run_dir), str(tmp / "t"), "--which", "teacher"], tmp, check=False)
    assert out.returncode == 2 and "no teacher" in out.stderr


def test_pictures_of_a_run(run_dir):
    """The figures show content: not blank, and the rows of different images differ."""
    import numpy as np
    from PIL import Image

    _run(["-m", "launch.visualize", str(run_dir)], run_dir.parent)
    for name in ("attention", "reconstruction", "curves"):
        with Image.open(run_dir / "visualize" / f"{name}.png") as img:
            pixels = np.asarray(img.convert("L"), dtype=np.float32)
        assert img.width > 100 and img.height > 100
        assert pixels.std() > 10, f"{name}.png is (nearly) blank"
        # curves are lines on white; the image grids are mostly picture
        drawn = (pixels < 250).mean() if name == "curves" else (pixels != np.median(pixels)).mean()
        assert drawn > (0.01 if name == "curves" else 0.1), f"{name}.png is mostly one colour"


def test_attention_maps_depend_on_the_image():
    """Maps of two different images differ, and a map is not constant over the grid."""
    from launch.visualize import attention_maps

    backbone = ssl_vit.create_backbone("vit_tiny").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps, what = attention_maps(backbone, x)
    assert what == "class token" and maps.shape[:2] == (2, backbone.init_config["heads"])
    assert (maps.flatten(2).std(-1) > 0.05).all()
    assert (maps[0] - maps[1]).abs().max() > 0.05


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory):
    """150 DINO steps of the demo recipe (cvt_tiny at 32 px, the tiny DINO head) on the digits."""
    tmp = tmp_path_factory.mktemp("dino")
    _run(["pretrain.py", "--objective", "dino", "--backbone", "cvt", "--steps", "150", "--set", "data.num_workers=0",
          "--set", "train.val_batches=0", "--out", str(tmp / "run")], tmp)
    return tmp / "run"


def test_pretrained_beats_random_init(dino_run):
    """The exported teacher against the same architecture at its initial weights (the probe's
    --random-init seeds like pretraining), on the same frozen, unaugmented features and splits."""
    tmp = dino_run.parent
    weights = dino_run / "export"
    common = ["linear_probe.py", "--weights", str(weights), "--workers", "0", "--epochs", "10"]
    _run(common, tmp)
    _run([*common, "--random-init"], tmp)
    pretrained = json.loads((weights / "results.json").read_text())
    baseline = json.loads((weights / "random_init" / "results.json").read_text())
    assert set(pretrained["best"]) == {"lr", "top1", "top5"} and "knn" in pretrained
    assert pretrained["objective"] == "dino" and pretrained["train_samples"] == baseline["train_samples"]
    assert pretrained["best"]["top1"] > baseline["best"]["top1"], (pretrained["best"], baseline["best"])
    assert pretrained["knn"]["top1"] > baseline["knn"]["top1"], (pretrained["knn"], baseline["knn"])
    # and DINO did not collapse: uniform outputs (the old failure) sit at ln(K) = ln(256) = 5.55
    losses = [r["train/loss"] for r in map(json.loads, (dino_run / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in r]
    assert sum(losses[-5:]) / 5 < math.log(256) - 0.3, losses
