"""The export format: native round trip, timm layout, clear errors (ssl_vit.export, export.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import ssl_vit
from ssl_vit.export import from_timm_state_dict, timm_counterpart, to_timm_state_dict

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
