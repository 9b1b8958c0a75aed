"""Register tokens (Darcet et al. 2024, "Vision Transformers Need Registers") in the TokenBackbone
families: counted as prefix tokens, never pooled, masked or dropped, exported, and mapped to timm's
`reg_token` layout."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import ssl_vit
from ssl_vit.export import from_timm_state_dict, timm_counterpart, to_timm_state_dict

from .conftest import make_input

R = 3  # registers in these tests

# tiny preset -> class tokens it has without registers
FAMILIES = {
    "vit_tiny": 1, "simple_vit_tiny": 0, "deep_vit_tiny": 1, "parallel_vit_tiny": 1,
    "small_dataset_vit_tiny": 1, "ats_vit_tiny": 1, "t2t_vit_tiny": 1, "vit_3d_tiny": 1, "simple_vit_3d_tiny": 0,
}


def _perturb(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _reg(name: str, **kw) -> ssl_vit.Backbone:
    return ssl_vit.create_backbone(name, num_registers=R, **kw).eval()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_registers_are_counted_prefix_tokens_and_excluded_from_patches(name):
    base = ssl_vit.create_backbone(name).eval()
    model = _reg(name)
    cls = FAMILIES[name]
    assert base.num_prefix_tokens == cls and model.num_prefix_tokens == cls + R
    assert model.reg_token.shape == (1, R, model.embed_dim) and model.init_config["num_registers"] == R
    assert "reg_token" in model.no_weight_decay()
    x = make_input(model)
    with torch.no_grad():
        out, ref = model.forward_features(x), base.forward_features(x)
    assert out.prefix_tokens.shape == (2, cls + R, model.embed_dim)
    assert out.patch_tokens.shape == ref.patch_tokens.shape and out.grid == ref.grid
    if model.pool == "cls":
        assert torch.equal(out.pooled, out.prefix_tokens[:, 0])
    else:  # the mean of the patch tokens only, never of the registers
        torch.testing.assert_close(out.pooled, out.patch_tokens.mean(dim=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["vit_tiny", "simple_vit_tiny"])
def test_registers_change_the_features(name):
    torch.manual_seed(0)
    base = ssl_vit.create_backbone(name).eval()
    model = _reg(name)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["reg_token"] and unexpected == []
    with torch.no_grad():
        model.reg_token.normal_(std=1.0)
    x = make_input(model)
    with torch.no_grad():
        a, b = base.forward_features(x), model.forward_features(x)
    assert not torch.allclose(a.patch_tokens, b.patch_tokens, atol=1e-4)
    assert not torch.allclose(a.pooled, b.pooled, atol=1e-4)


def test_registers_follow_the_class_token_without_positions():
    model = _reg("vit_tiny")
    _perturb(model)
    for use_pos in (True, False):
        prefix = model.prefix(2, use_pos)
        cls = model.cls_token + (model.prefix_pos if use_pos else 0)
        assert torch.equal(prefix[:, :1], cls.expand(2, -1, -1))
        assert torch.equal(prefix[:, 1:], model.reg_token.expand(2, -1, -1))


def test_registers_are_initialised_like_timm():
    model = ssl_vit.create_backbone("vit_base_patch16", num_registers=16, depth=1)
    assert 0 < model.reg_token.std().item() < 1e-5


def test_bad_register_count_is_a_clear_error():
    for bad in (-1, 1.5, True):
        with pytest.raises(ssl_vit.SslVitError, match="num_registers"):
            ssl_vit.create_backbone("vit_tiny", num_registers=bad)


@pytest.mark.parametrize("name", ["vit_tiny", "simple_vit_tiny"])
def test_mask_keep_and_kv_mask_never_touch_registers(name):
    model = _reg(name)
    _perturb(model)
    x = make_input(model)
    b = x.shape[0]
    h, w = model.mask_grid(x.shape[-2:])
    g = torch.Generator().manual_seed(3)
    hidden = torch.rand(b, h, w, generator=g) < 0.5
    keep = torch.rand(b, h * w, generator=g).argsort(dim=1)[:, :4]  # 4 cells per image
    kv = torch.ones(b, h * w, dtype=torch.bool).scatter(1, keep, False).view(b, h, w)  # only kept cells are keys
    with torch.no_grad():
        masked = model.forward_features(x, mask=hidden)
        kept = model.forward_features(x, keep=keep)
        kvm = model.forward_features(x, kv_mask=kv)
    r = model.num_prefix_tokens
    assert masked.prefix_tokens.shape[1] == r and masked.patch_tokens.shape[1] == h * w
    assert kept.prefix_tokens.shape[1] == r and kept.patch_tokens.shape == (b, 4, model.embed_dim)
    # kept cells see the same keys either way (prefix + kept cells) only if the registers stay keys in both
    picked = torch.gather(kvm.patch_tokens, 1, keep[..., None].expand(-1, -1, model.embed_dim))
    torch.testing.assert_close(picked, kept.patch_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(kvm.prefix_tokens, kept.prefix_tokens, atol=1e-5, rtol=0)
    # hiding cells changes the registers' outputs: they attend over the image
    with torch.no_grad():
        full = model.forward_features(x)
    assert not torch.allclose(full.prefix_tokens[:, -R:], kept.prefix_tokens[:, -R:], atol=1e-4)


def test_extra_tokens_follow_the_registers():
    model = _reg("vit_tiny")
    x = make_input(model)
    extra = torch.randn(2, 1, model.embed_dim)
    with torch.no_grad():
        out = model.forward_features(x, extra_tokens=extra)
        ref = model.forward_features(x)
    assert out.prefix_tokens.shape[1] == 1 + R + 1 and out.patch_tokens.shape == ref.patch_tokens.shape
    assert torch.equal(out.pooled, out.prefix_tokens[:, 0])


def test_memory_vit_wraps_a_vit_with_registers():
    vit = dict(image_size=32, patch_size=8, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128, num_registers=R)
    model = ssl_vit.create_backbone("memory_vit_tiny", vit=vit).eval()
    assert model.num_prefix_tokens == 2 + R
    x = make_input(model)
    with torch.no_grad():
        out = model.forward_features(x)
        plain = model.vit.forward_features(x)
    assert out.prefix_tokens.shape[1] == 2 + R
    torch.testing.assert_close(out.patch_tokens, plain.patch_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.vit_output(out), plain.pooled, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("objective", ["dino", "mae", "mp3", "simmim"])
def test_objectives_train_the_registers(objective):
    model = ssl_vit.create_backbone("vit_tiny", num_registers=R)
    obj = ssl_vit.create_objective(objective, model)
    torch.manual_seed(0)
    loss = obj(torch.rand(4, 3, 32, 32))
    loss.backward()
    assert torch.isfinite(loss) and model.reg_token.grad is not None and model.reg_token.grad.abs().sum() > 0
    exported = obj.export_backbone()
    assert exported.num_registers == R and torch.equal(exported.reg_token, model.reg_token)


# ---- export ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit_tiny", "simple_vit_tiny", "deep_vit_tiny"])
def test_native_export_rebuilds_the_registers(name, tmp_path):
    model = _reg(name)
    _perturb(model)
    ssl_vit.save_backbone(model, tmp_path)
    assert json.loads((tmp_path / "backbone.json").read_text())["overrides"]["num_registers"] == R
    loaded = ssl_vit.load_backbone(tmp_path)
    assert loaded.num_prefix_tokens == model.num_prefix_tokens
    x = make_input(model)
    with torch.no_grad():
        a, b = model.forward_features(x), loaded.forward_features(x)
    assert torch.equal(a.patch_tokens, b.patch_tokens) and torch.equal(a.prefix_tokens, b.prefix_tokens)
    assert torch.equal(a.pooled, b.pooled)


def _timm_matches(model: ssl_vit.Backbone, x: torch.Tensor):
    timm = pytest.importorskip("timm")
    name, kwargs = timm_counterpart(model)
    assert kwargs["reg_tokens"] == model.num_registers
    ref = timm.create_model(name, num_classes=0, **kwargs).eval()
    ref.load_state_dict(to_timm_state_dict(model), strict=True)
    assert ref.num_prefix_tokens == model.num_prefix_tokens
    with torch.no_grad():
        out = model.forward_features(x)
        tokens = ref.forward_features(x)
        pooled = ref.forward_head(tokens, pre_logits=True)
    r = model.num_prefix_tokens
    torch.testing.assert_close(tokens[:, r:], out.patch_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens[:, :r], out.prefix_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, out.pooled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vit_tiny", "simple_vit_tiny"])
def test_timm_layout_with_registers_loads_strictly_with_equal_features(name, tmp_path):
    model = _reg(name)
    _perturb(model)
    x = make_input(model)
    _timm_matches(model, x)
    back = from_timm_state_dict(model, to_timm_state_dict(model))
    own = model.state_dict()
    assert back.keys() == own.keys() and all(torch.equal(back[k], own[k]) for k in own)
    ssl_vit.save_backbone(model, tmp_path, format="timm")
    loaded = ssl_vit.load_backbone(tmp_path)
    assert loaded.num_registers == R
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x).pooled, model.forward_features(x).pooled)


def test_vit_small_with_four_registers_is_timm_vit_small_reg4():
    model = ssl_vit.create_backbone("vit_small_patch16", num_registers=4).eval()
    _perturb(model)
    assert timm_counterpart(model) == ("vit_small_patch16_224", {"reg_tokens": 4})
    _timm_matches(model, make_input(model, batch=1))


def test_timm_register_positions_fold_into_the_tokens():
    """A timm table that gives the registers positions reads back as registers with those added."""
    model = _reg("vit_tiny")
    state = to_timm_state_dict(model)
    state["pos_embed"] = state["pos_embed"].clone()
    state["pos_embed"][:, 1:1 + R] = torch.randn(1, R, model.embed_dim)
    timm = pytest.importorskip("timm")
    name, kwargs = timm_counterpart(model)
    ref = timm.create_model(name, num_classes=0, **kwargs).eval()
    ref.load_state_dict(state, strict=True)
    model.load_state_dict(from_timm_state_dict(model, state), strict=True)
    x = make_input(model)
    with torch.no_grad():
        torch.testing.assert_close(ref.forward_head(ref.forward_features(x), pre_logits=True),
                                   model.forward_features(x).pooled, atol=1e-5, rtol=0)


def test_timm_table_with_the_wrong_prefix_rows_is_refused():
    model = _reg("vit_tiny")
    state = to_timm_state_dict(model)
    state["pos_embed"] = state["pos_embed"][:, 1:]  # the class row missing, registers left
    with pytest.raises(ssl_vit.WeightsMismatch, match="prefix rows"):
        from_timm_state_dict(model, state)


def test_timm_wrapper_registers():
    model = ssl_vit.create_backbone("timm_vit_tiny", reg_tokens=R, class_token=True).eval()
    assert model.num_prefix_tokens == 1 + R and model.num_registers == R
    assert "model.reg_token" in model.no_weight_decay()
    x = make_input(model)
    with torch.no_grad():
        out = model.forward_features(x)
        keep = torch.arange(4).expand(2, 4)
        kept = model.forward_features(x, keep=keep)
    assert out.prefix_tokens.shape[1] == 1 + R and kept.prefix_tokens.shape[1] == 1 + R
    torch.testing.assert_close(out.pooled, model.model.forward_head(model.model.forward_features(x),
                                                                    pre_logits=True), atol=1e-5, rtol=0)


# ---- the launcher ------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dino_pretrains_a_vit_with_registers(tmp_path):
    from accelerate.state import AcceleratorState

    from launch.cli import main

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path / "run"
    args = ["--objective", "dino", "--backbone", "vit", "--set", "backbone_args.num_registers=4", "--steps", "2",
            "--set", "data.batch_size=4", "--set", "data.num_workers=0", "--set", "train.val_batches=0",
            "--set", f"data.cache={tmp_path / 'cache'}", "--out", str(out)]
    assert main(args) == 0
    exported = ssl_vit.load_backbone(out / "export")
    assert exported.num_registers == 4 and exported.num_prefix_tokens == 5
    x = make_input(exported)
    with torch.no_grad():
        assert exported.forward_features(x).prefix_tokens.shape[1] == 5
