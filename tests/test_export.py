"""The export format: native round trip, timm layout, clear errors (ssl_vit.export, export.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import ssl_vit
from ssl_vit.export import from_timm_state_dict, timm_counterpart, to_timm_state_dict
from ssl_vit.files import write_manifest

from .conftest import make_input

ROOT = Path(__file__).resolve().parents[1]


def _perturb(model: nn.Module) -> None:
    """Move every tensor off its initial value, so a round trip that drops one would show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", ["vit_tiny", "simple_vit_tiny"])
def test_registry_round_trip_matches_exactly(name, tmp_path):
    model = ssl_vit.create_backbone(name, drop_path=0.1).eval()
    _perturb(model)
    ssl_vit.save_backbone(model, tmp_path, objective="mae", step=7, config={"lr": 1e-3})
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["registry_name"] == name and meta["overrides"] == {"drop_path": 0.1}
    assert meta["objective"] == "mae" and meta["step"] == 7 and (tmp_path / "config.yaml").is_file()
    loaded = ssl_vit.load_backbone(tmp_path)
    assert not loaded.training
    x = make_input(model)
    with torch.no_grad():
        a, b = model.forward_features(x), loaded.forward_features(x)
    assert torch.equal(a.patch_tokens, b.patch_tokens) and torch.equal(a.pooled, b.pooled)


def test_class_built_backbone_round_trip(tmp_path):
    from backbones import ViT
    model = ViT(image_size=(32, 48), patch_size=8, num_classes=5, dim=32, depth=1, heads=2, dim_head=16,
                mlp_dim=64).eval()
    _perturb(model)
    ssl_vit.save_backbone(model, tmp_path)
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["class_name"] == "ViT" and meta["init_config"]["image_size"] == [32, 48]
    loaded = ssl_vit.load_backbone(tmp_path)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_unexportable_and_missing(tmp_path):
    with pytest.raises(ValueError, match="cannot export a Linear"):
        ssl_vit.save_backbone(nn.Linear(2, 2), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="not a backbone export"):
        ssl_vit.load_backbone(tmp_path / "nowhere")
    model = ssl_vit.create_backbone("vit_tiny")
    ssl_vit.save_backbone(model, tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "backbone.json").read_text())
    meta["overrides"] = {"dim": 32, "dim_head": 16}  # weights no longer fit
    (tmp_path / "b" / "backbone.json").write_text(json.dumps(meta))
    write_manifest(tmp_path / "b")  # a consistent folder whose parts disagree
    with pytest.raises(ValueError, match="do not fit"):
        ssl_vit.load_backbone(tmp_path / "b")


def test_timm_layout_loads_strictly_and_matches_timm():
    timm = pytest.importorskip("timm")
    model = ssl_vit.create_backbone("vit_tiny_patch16").eval()
    _perturb(model)
    name, kwargs = timm_counterpart(model)
    assert (name, kwargs) == ("vit_tiny_patch16_224", {})
    ref = timm.create_model(name, num_classes=0, **kwargs).eval()
    ref.load_state_dict(to_timm_state_dict(model), strict=True)
    # timm's LayerNorm eps is 1e-6; compare the mapping itself with equal eps, then timm as built
    (ours_eps,) = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model.forward_features(x)
        plain = ref.forward_head(ref.forward_features(x), pre_logits=True)
        for m in ref.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = ours_eps
        tokens = ref.forward_features(x)
        pooled = ref.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(tokens[:, 1:], out.patch_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, out.pooled, atol=1e-5, rtol=0)
    if ours_eps == 1e-6:  # timm exactly as built (holds once the core uses timm's LayerNorm eps)
        torch.testing.assert_close(plain, out.pooled, atol=1e-5, rtol=0)


def test_timm_simple_vit_mean_pool(tmp_path):
    timm = pytest.importorskip("timm")
    model = ssl_vit.create_backbone("simple_vit_tiny").eval()
    _perturb(model)
    name, kwargs = timm_counterpart(model)
    assert kwargs["class_token"] is False and kwargs["global_pool"] == "avg" and kwargs["fc_norm"] is False
    ref = timm.create_model(name, num_classes=0, **kwargs).eval()
    ref.load_state_dict(to_timm_state_dict(model), strict=True)
    for m in ref.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = model.norm.eps
    x = make_input(model)
    with torch.no_grad():
        torch.testing.assert_close(ref.forward_head(ref.forward_features(x), pre_logits=True),
                                   model.forward_features(x).pooled, atol=1e-5, rtol=0)
    # the timm layout also reads back into our model
    ssl_vit.save_backbone(model, tmp_path, format="timm")
    loaded = ssl_vit.load_backbone(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_timm_state_dict_inverts():
    model = ssl_vit.create_backbone("vit_tiny")
    back = from_timm_state_dict(model, to_timm_state_dict(model))
    own = model.state_dict()
    assert back.keys() == own.keys() and all(torch.equal(back[k], own[k]) for k in own)


def test_no_timm_counterpart():
    from backbones import ViT
    wide = ViT(image_size=32, patch_size=8, num_classes=0, dim=64, depth=1, heads=2, dim_head=16, mlp_dim=64)
    with pytest.raises(ssl_vit.IncompatibleBackbone, match="dim_head"):
        timm_counterpart(wide)
    with pytest.raises(ssl_vit.IncompatibleBackbone, match="no timm counterpart"):
        timm_counterpart(ssl_vit.create_backbone("cvt_tiny"))


# ---- integrity and trust ---------------------------------------------------------------------------

def _export(tmp_path: Path, name: str = "e") -> Path:
    model = ssl_vit.create_backbone("vit_tiny")
    return ssl_vit.save_backbone(model, tmp_path / name, objective="mae", step=3)


def test_export_has_manifest_and_is_readable_by_others(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = _export(tmp_path)
    finally:
        os.umask(old)
    files = json.loads((out / "checksums.json").read_text())["files"]
    assert sorted(files) == ["backbone.json", "backbone.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temporary folder left behind
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]}
    assert modes == {"e": 0o755, "backbone.json": 0o644, "backbone.safetensors": 0o644, "checksums.json": 0o644}


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_weights_are_corrupt_checkpoint_naming_the_file(tmp_path, damage):
    out = _export(tmp_path)
    weights = out / "backbone.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        weights.unlink()
    err = ssl_vit.CorruptCheckpoint if damage != "delete" else FileNotFoundError
    with pytest.raises(err, match="backbone.safetensors"):
        ssl_vit.load_backbone(out)


def test_edited_backbone_json_fails_its_checksum(tmp_path):
    out = _export(tmp_path)
    meta = json.loads((out / "backbone.json").read_text())
    meta["step"] = 99
    (out / "backbone.json").write_text(json.dumps(meta))
    with pytest.raises(ssl_vit.CorruptCheckpoint, match="backbone.json"):
        ssl_vit.load_backbone(out)
    (out / "checksums.json").unlink()
    with pytest.raises(ssl_vit.CorruptCheckpoint, match="checksums.json"):
        ssl_vit.load_backbone(out)


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"registry_name": 5}', "registry_name"),
    ('{"registry_name": "vit_tiny", "overrides": [1]}', "overrides"),
    ('{"class_name": "ViT", "init_config": "dim=3"}', "init_config"),
    ('{"objective": "mae"}', "neither"),
    ('{"registry_name": "vit_tiny", "format": "onnx"}', "format"),
])
def test_malformed_backbone_json_is_a_clear_error(tmp_path, text, match):
    out = _export(tmp_path)
    (out / "backbone.json").write_text(text)
    write_manifest(out)
    with pytest.raises(ssl_vit.MalformedExport, match=match) as info:
        ssl_vit.load_backbone(out)
    assert isinstance(info.value, ssl_vit.SslVitError) and "\n" not in str(info.value)


def test_class_names_resolve_through_the_registry_only(tmp_path):
    out = _export(tmp_path)
    for name in ["os.system", "collections.OrderedDict", "torch.nn.Linear"]:
        (out / "backbone.json").write_text(json.dumps({"class_name": name, "init_config": {}}))
        write_manifest(out)
        with pytest.raises(ssl_vit.UnknownNameError, match="not defined"):
            ssl_vit.load_backbone(out)
    (out / "backbone.json").write_text(json.dumps({"registry_name": "os:system"}))
    write_manifest(out)
    with pytest.raises(ssl_vit.UnknownNameError):
        ssl_vit.load_backbone(out)


def test_timm_kwargs_cannot_load_files(tmp_path):
    out = _export(tmp_path)
    (out / "backbone.json").write_text(json.dumps({
        "registry_name": "timm:vit_tiny_patch16_224", "overrides": {"checkpoint_path": str(out / "x.pth")}}))
    write_manifest(out)
    with pytest.raises(ssl_vit.SslVitError, match="checkpoint_path"):
        ssl_vit.load_backbone(out)
    for source in ["hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", f"local-dir:{out}"]:
        (out / "backbone.json").write_text(json.dumps({"registry_name": f"timm:{source}"}))
        write_manifest(out)
        with pytest.raises(ssl_vit.SslVitError, match="registry"):
            ssl_vit.load_backbone(out)


def test_failed_save_keeps_the_previous_export(tmp_path, monkeypatch):
    out = _export(tmp_path)
    before = (out / "backbone.safetensors").read_bytes()
    import ssl_vit.export as export

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_manifest", broken)
    with pytest.raises(OSError, match="disk full"):
        ssl_vit.save_backbone(ssl_vit.create_backbone("vit_tiny"), out)
    assert (out / "backbone.safetensors").read_bytes() == before
    ssl_vit.load_backbone(out)
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def test_save_refuses_to_replace_a_folder_that_is_not_an_export(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a backbone export"):
        ssl_vit.save_backbone(ssl_vit.create_backbone("vit_tiny"), tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"


def test_timm_wrapper_round_trips_in_timm_layout(tmp_path):
    model = ssl_vit.create_backbone("timm_vit_tiny").eval()
    _perturb(model)
    timm = pytest.importorskip("timm")
    name, kwargs = timm_counterpart(model)
    timm.create_model(name, num_classes=0, **kwargs).load_state_dict(to_timm_state_dict(model), strict=True)
    ssl_vit.save_backbone(model, tmp_path / "t", format="timm")
    loaded = ssl_vit.load_backbone(tmp_path / "t")
    x = make_input(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
