"""Continued pretraining (`--init`): weights from an export or a timm-layout file seed the backbone, and the
teacher starts from them too; a mismatch is one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import ssl_vit
from launch.build import build_objective
from launch.config import parse, resolve

from .test_launch_run import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _cfg(objective: str, cache, init=None):
    cfg, _ = resolve(objective, "vit", profile_hint="demo", sets=[f"data.cache={cache}"])
    return parse({**cfg, "init": str(init) if init else None})


def test_init_from_an_export_seeds_student_and_teacher(tmp_path):
    torch.manual_seed(7)
    source = ssl_vit.create_backbone("vit_tiny")
    ssl_vit.save_backbone(source, tmp_path / "exp")
    backbone, dino = build_objective(_cfg("dino", tmp_path / "c"), init=tmp_path / "exp")
    for (name, a), b in zip(source.state_dict().items(), backbone.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(backbone.parameters(), dino.export_backbone().parameters()):  # the teacher copies it
        assert torch.equal(a, b)
    fresh, _ = build_objective(_cfg("dino", tmp_path / "c"))
    assert any(not torch.equal(a, b) for a, b in zip(fresh.parameters(), backbone.parameters()))


def test_init_from_a_timm_layout_file(tmp_path):
    source = ssl_vit.create_backbone("vit_tiny")
    save_file({k: v.contiguous() for k, v in source.timm_state_dict().items()}, str(tmp_path / "w.safetensors"))
    backbone, _ = build_objective(_cfg("mae", tmp_path / "c"), init=tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(backbone.eval().forward_features(x).patch_tokens,
                              source.eval().forward_features(x).patch_tokens, atol=1e-6)


def test_mae_from_dino_and_dino_from_mae_run(tmp_path):
    common = ["--backbone", "vit", "--steps", "2", "--set", "data.batch_size=4", "--set", "data.num_workers=0",
              "--set", "train.val_batches=0", "--set", f"data.cache={tmp_path / 'c'}"]
    assert run(["--objective", "dino", *common, "--out", str(tmp_path / "dino")]) == 0
    assert run(["--objective", "mae", *common, "--init", str(tmp_path / "dino" / "export"),
                "--out", str(tmp_path / "mae")]) == 0
    assert run(["--objective", "dino", *common, "--init", str(tmp_path / "mae" / "export"),
                "--out", str(tmp_path / "dino2")]) == 0


def test_mismatched_init_is_one_line(tmp_path, capsys):
    ssl_vit.save_backbone(ssl_vit.create_backbone("cvt_tiny"), tmp_path / "cvt")
    args = ["--objective", "mae", "--backbone", "vit", "--steps", "2", "--set", f"data.cache={tmp_path / 'c'}",
            "--out", str(tmp_path / "run")]
    assert run([*args, "--init", str(tmp_path / "cvt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0] and "missing keys" in err[0], err
    assert run([*args, "--init", str(tmp_path / "nothing")]) == 2
    assert "--init" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
