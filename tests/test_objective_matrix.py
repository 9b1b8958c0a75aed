"""One test swept over every registered `<name>_tiny` backbone x every registered objective.

Compatible pairs (the objective's `compatible(backbone)`) build with small settings and train one
step: a finite scalar loss, gradients reaching the backbone, an optimizer step that changes its
weights. Incompatible pairs must raise `IncompatibleBackbone` naming the missing capability.
Nothing here names a model or an objective: new ones are picked up from the registries.

Small settings: the demo profile's `objective_args` for each objective
(`configs/profiles/demo/<objective>.yaml`, read with `launch.config.profile_objective_args`), the
constructor overrides that make it cheap enough for this sweep (e.g. a small MAE decoder, a small
DINO head).
"""

from __future__ import annotations

import math

import pytest
import torch

import ssl_vit
from launch.config import profile_objective_args
from ssl_vit import IncompatibleBackbone, ViewSpec
from ssl_vit.registry import OBJECTIVES

from .conftest import make_input, tiny_backbones

BACKBONES = tiny_backbones()
OBJECTIVE_NAMES = ssl_vit.list_objectives()


def tiny_overrides(name: str) -> dict:
    """The demo profile's objective_args for `name`. Objectives whose small settings have not moved
    to configs/profiles/demo/ yet still carry them as a `tiny_overrides` class attribute; the
    profile wins where both exist."""
    legacy = getattr(OBJECTIVES.get(name), "tiny_overrides", {})
    return {**dict(legacy() if callable(legacy) else legacy), **profile_objective_args("demo", name)}


def test_registries_are_populated():
    assert BACKBONES and OBJECTIVE_NAMES


@pytest.mark.parametrize("objective", OBJECTIVE_NAMES)
@pytest.mark.parametrize("backbone_name", BACKBONES)
def test_objective_trains_one_step_or_refuses(backbone_name, objective):
    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone(backbone_name)
    factory = OBJECTIVES.get(objective)
    overrides = tiny_overrides(objective)
    if hasattr(factory, "compatible") and not factory.compatible(backbone):
        with pytest.raises(IncompatibleBackbone) as err:
            ssl_vit.create_objective(objective, backbone, **overrides)
        missing = set().union(*(set(req) - backbone.capabilities for req in getattr(factory, "requires", ())))
        message = str(err.value)
        if missing:
            assert any(cap in message for cap in missing), message
        return

    model = ssl_vit.create_objective(objective, backbone, **overrides).train()
    specs = list(model.view_specs())
    assert specs and all(isinstance(s, ViewSpec) for s in specs)

    x = make_input(backbone, batch=2)
    kwargs = {"labels": torch.zeros(2, dtype=torch.long)} if getattr(model, "needs_labels", False) else {}
    loss = model(x, **kwargs)
    assert loss.dim() == 0 and torch.isfinite(loss), loss
    assert isinstance(model.metrics, dict) and all(math.isfinite(float(v)) for v in model.metrics.values())

    loss.backward()
    trained = [p for p in backbone.parameters() if p.requires_grad]
    grads = [p.grad for p in trained if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "no gradient reached the backbone"

    before = [p.detach().clone() for p in trained]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.on_before_optimizer_step(0, 10)
    opt.step()
    model.on_step_end(0, 10)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trained)), "optimizer step left the backbone"
    assert isinstance(model.export_backbone(), torch.nn.Module)


# ---- reconstruction, declared: exactly the objectives with `can_reconstruct` give pictures ------------
def _simple_image(batch: int = 8) -> torch.Tensor:
    """A smooth 32 px picture (horizontal ramp in red, vertical in green, flat blue), (B, 3, 32, 32)."""
    ramp = torch.linspace(0.1, 0.9, 32)
    x = torch.stack([ramp.view(1, 32).expand(32, 32), ramp.view(32, 1).expand(32, 32), torch.full((32, 32), 0.5)])
    return x.unsqueeze(0).expand(batch, -1, -1, -1).contiguous()


def _hidden_error(pictures: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute error over the pixels of hidden cells; mask (B, h, w) on the mask grid."""
    factor = x.shape[-1] // mask.shape[-1]
    pix = mask.repeat_interleave(factor, 1).repeat_interleave(factor, 2).unsqueeze(1).expand_as(x)
    return float((pictures - x).abs()[pix].mean())


@pytest.mark.parametrize("objective", OBJECTIVE_NAMES)
def test_reconstruct_exactly_where_declared(objective):
    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone("vit_tiny")
    factory = OBJECTIVES.get(objective)
    if not factory.compatible(backbone):
        pytest.skip(f"{objective} does not train vit_tiny")
    model = ssl_vit.create_objective(objective, backbone, **tiny_overrides(objective)).eval()
    x = _simple_image(2)
    if not factory.can_reconstruct:
        with pytest.raises(NotImplementedError):
            model.reconstruct(x)
        return
    masked, recon, mask = model.reconstruct(x)
    assert masked.shape == recon.shape == x.shape
    assert mask.shape == (2, *backbone.mask_grid(x.shape[2:])) and mask.dtype == torch.bool
    assert mask.any() and not mask.all()


@pytest.mark.parametrize("objective", [n for n in OBJECTIVE_NAMES if OBJECTIVES.get(n).can_reconstruct])
def test_reconstruction_after_training_beats_the_masked_input(objective):
    """Content, not shapes: a few steps on one simple picture, then the hidden cells are much closer
    to the picture than the masked input (zeros) and than the untrained model's guess."""
    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone("vit_tiny")
    model = ssl_vit.create_objective(objective, backbone, **tiny_overrides(objective))
    x = _simple_image()
    model.eval()
    torch.manual_seed(1)
    masked, untrained, mask = model.reconstruct(x)
    before, blank = _hidden_error(untrained, x, mask), _hidden_error(masked, x, mask)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids oversubscription on a shared CPU
    try:
        for _ in range(40):
            loss = model([x])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    torch.manual_seed(1)  # the same masks as before training
    _, recon, again = model.reconstruct(x)
    assert torch.equal(again, mask)
    after = _hidden_error(recon, x, mask)
    assert after < 0.5 * blank and after < 0.5 * before, (after, blank, before)
    visible = ~mask.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1).expand_as(x)
    assert torch.equal(recon[visible], x[visible])  # visible cells are the input itself


# ---- the exported feature is the one the objective trains --------------------------------------------
MEAN_POOL_OBJECTIVES = [n for n in OBJECTIVE_NAMES if getattr(OBJECTIVES.get(n), "trained_pool", None) == "mean"]


@pytest.mark.parametrize("objective", MEAN_POOL_OBJECTIVES)
def test_export_pools_the_trained_patch_tokens(objective, tmp_path):
    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone("vit_tiny")  # pools by its class token
    assert backbone.pool == "cls"
    model = ssl_vit.create_objective(objective, backbone, **tiny_overrides(objective)).eval()
    rng = torch.get_rng_state()
    exported = model.export_backbone()
    assert torch.equal(torch.get_rng_state(), rng), "building the export must not move the training RNG"
    x = make_input(backbone, batch=2)
    with torch.no_grad():
        out, ref = exported.forward_features(x), backbone.forward_features(x, use_pos=model.trained_positions)
        torch.testing.assert_close(out.pooled, out.patch_tokens.mean(dim=1))
        torch.testing.assert_close(out.patch_tokens, ref.patch_tokens)  # same weights, read as trained
        assert not torch.allclose(ref.pooled, out.pooled)
    assert backbone.pool == "cls", "the training backbone keeps its own pooling"
    assert exported.registry_overrides["pool"] == "mean"
    ssl_vit.save_backbone(exported, tmp_path / "export", objective=objective, step=0)
    with torch.no_grad():
        assert torch.equal(ssl_vit.load_backbone(tmp_path / "export")(x), exported(x))


@pytest.mark.parametrize("pool", ["cls", "mean"])  # "mean": with_pool returns the backbone itself, not a copy
def test_mp3_exports_its_encoder_without_positions(tmp_path, pool):
    # MP3 trains with use_pos=False: its export must give those features from a plain forward, not add back
    # the untrained positions (which shift every token), and the training backbone keeps its own.
    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone("vit_tiny", pool=pool)
    assert backbone.pos_embed.weight.abs().sum() > 0 and backbone.prefix_pos is not None
    with torch.no_grad():
        backbone.prefix_pos.normal_()  # nonzero class-token positions too, as after a load
    model = ssl_vit.create_objective("mp3", backbone, **tiny_overrides("mp3")).eval()
    assert model.trained_positions is False
    exported = model.export_backbone()
    x = make_input(backbone, batch=2)
    with torch.no_grad():
        trained = backbone.forward_features(x, use_pos=False)
        out = exported.forward_features(x)
        torch.testing.assert_close(out.patch_tokens, trained.patch_tokens)
        torch.testing.assert_close(out.pooled, trained.patch_tokens.mean(dim=1))
        assert not torch.allclose(backbone.forward_features(x).patch_tokens, trained.patch_tokens)
    assert backbone.pos_embed.weight.abs().sum() > 0 and backbone.prefix_pos.abs().sum() > 0
    ssl_vit.save_backbone(exported, tmp_path / "export", objective="mp3", step=0)
    with torch.no_grad():
        loaded = ssl_vit.load_backbone(tmp_path / "export").forward_features(x)
    torch.testing.assert_close(loaded.pooled, trained.patch_tokens.mean(dim=1))


def test_mp3_warns_where_positions_are_computed(caplog, monkeypatch):
    import objectives.pooling

    # it warns once per process, and earlier tests may have used up that warning
    monkeypatch.setattr(objectives.pooling, "_warned", set())
    backbone = ssl_vit.create_backbone("simple_vit_tiny")  # sin-cos positions: no weights to zero
    model = ssl_vit.create_objective("mp3", backbone, **tiny_overrides("mp3"))
    with caplog.at_level("WARNING", logger="objectives.pooling"):
        assert model.export_backbone() is backbone
    assert any("use_pos=False" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["simple_vit_tiny", "ats_vit_tiny", "cvt_tiny"])
def test_export_keeps_backbones_that_pool_otherwise(name):
    # already mean-pooled, no pool option (ATS-ViT samples tokens by class attention), hierarchical
    if not MEAN_POOL_OBJECTIVES:
        pytest.skip("no objective trains a mean pool")
    backbone = ssl_vit.create_backbone(name)
    objective = next(n for n in MEAN_POOL_OBJECTIVES if OBJECTIVES.get(n).compatible(backbone))
    model = ssl_vit.create_objective(objective, backbone, **tiny_overrides(objective))
    assert model.export_backbone() is backbone
