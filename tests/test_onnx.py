"""`export.py --format onnx`: the ONNX graph run in onnxruntime gives torch's features, at any batch size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ssl_vit
from launch.errors import LaunchError
from launch.export_run import main as export_main
from launch.onnx_export import ONNX_FILE, ONNX_META, export_onnx, onnx_meta
from ssl_vit.files import verify_manifest

ort = pytest.importorskip("onnxruntime")  # a test dependency only


def _session(folder):
    return ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])


def _check_features(model, folder, batches=(1, 3)):
    session = _session(folder)
    assert [i.name for i in session.get_inputs()] == ["images"]  # no mask or keep input
    assert [o.name for o in session.get_outputs()] == ["pooled", "patch_tokens"]
    for b in batches:
        x = torch.randn(b, model.in_channels, *model.default_size, generator=torch.Generator().manual_seed(b))
        pooled, tokens = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            want = model.forward_features(x)
        assert pooled.shape == tuple(want.pooled.shape) and tokens.shape == tuple(want.patch_tokens.shape)
        np.testing.assert_allclose(pooled, want.pooled.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(tokens, want.patch_tokens.numpy(), rtol=0, atol=1e-4)


def test_export_py_writes_onnx_from_an_export(tmp_path, capsys):
    torch.manual_seed(0)
    native = ssl_vit.save_backbone(ssl_vit.create_backbone("vit_tiny"), tmp_path / "native", objective="mae",
                                   step=7, config={"data": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}})
    out = tmp_path / "onnx"
    assert export_main([str(native), str(out), "--format", "onnx"]) == 0
    verify_manifest(out, what="export")  # checksums.json lists and matches every file
    assert json.loads((out / "checksums.json").read_text())["files"].keys() == {ONNX_FILE, ONNX_META}
    meta = json.loads((out / ONNX_META).read_text())
    assert meta["registry_name"] == "vit_tiny" and meta["objective"] == "mae" and meta["step"] == 7
    assert meta["format"] == "onnx" and meta["onnx"]["opset"] >= 17 and meta["config"]["data"]["std"][0] == 0.2
    assert meta["onnx"]["inputs"]["images"]["shape"] == ["batch", 3, 32, 32]
    model = ssl_vit.load_backbone(native)
    _check_features(model, out)
    import onnx

    graph = onnx.load(str(out / ONNX_FILE))
    assert graph.opset_import[0].version >= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    capsys.readouterr()
    assert export_main([str(native), str(tmp_path / "bad"), "--format", "onxx"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onnx" in err


@pytest.mark.parametrize("name", ["pit_tiny", "vit_3d_tiny"])  # a hierarchical family and a video family
def test_families_match_torch(name, tmp_path):
    torch.manual_seed(0)
    model = ssl_vit.create_backbone(name).eval()
    out = export_onnx(model, tmp_path / name, meta=onnx_meta(model))
    meta = json.loads((out / ONNX_META).read_text())
    assert meta["onnx"]["inputs"]["images"]["layout"] == ("BCTHW" if model.is_video else "BCHW")
    _check_features(model, out)


def test_a_family_that_cannot_export_is_one_line(tmp_path, monkeypatch):
    model = ssl_vit.create_backbone("vit_tiny")

    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::searchsorted' to ONNX opset version 18 is not supported.")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(LaunchError) as info:
        export_onnx(model, tmp_path / "out", meta=onnx_meta(model))
    message = str(info.value)
    assert "\n" not in message and "'vit_tiny'" in message and "aten::searchsorted" in message
    assert not (tmp_path / "out").exists()  # nothing half-written
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(LaunchError, match="not an export"):
        export_onnx(model, tmp_path / "busy", meta=onnx_meta(model))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_export_py_writes_onnx_from_a_run(tmp_path):
    from accelerate.state import AcceleratorState

    from launch.cli import main as pretrain_main

    AcceleratorState._reset_state(reset_partial_state=True)
    run = tmp_path / "run"
    assert pretrain_main(["--objective", "dino", "--backbone", "vit", "--steps", "2", "--out", str(run),
                          "--set", f"data.cache={tmp_path / 'cache'}", "--set", "data.batch_size=8",
                          "--set", "train.checkpoint_every=2", "--set", "train.val_every=100"]) == 0
    out = tmp_path / "onnx"
    assert export_main([str(run), str(out), "--format", "onnx"]) == 0
    meta = json.loads((out / ONNX_META).read_text())
    assert meta["objective"] == "dino" and meta["step"] == 2 and meta["exported"] == "default"
    assert meta["config"]["backbone"] == "vit_tiny"
    _check_features(ssl_vit.load_backbone(run / "export"), out, batches=(2,))  # the teacher, as the run exported it
