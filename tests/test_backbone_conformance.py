"""The conformance suite, written once and swept over every registered `<name>_tiny` backbone.

A new family is picked up by registering a tiny preset; nothing here names a model.
"""

from __future__ import annotations

import math

import pytest
import torch

import ssl_vit
from ssl_vit import masking
from ssl_vit.errors import InputShapeError

from .conftest import make_input, second_size, tiny_backbones

NAMES = tiny_backbones()
_cache: dict[str, ssl_vit.Backbone] = {}


def build(name: str, **overrides) -> ssl_vit.Backbone:
    torch.manual_seed(0)
    return ssl_vit.create_backbone(name, **overrides).eval()


def model_for(name: str) -> ssl_vit.Backbone:
    if name not in _cache:
        _cache[name] = build(name)
    return _cache[name]


def hidden_cell_noise(x: torch.Tensor, model: ssl_vit.Backbone, mask: torch.Tensor) -> torch.Tensor:
    """x with fresh noise in the pixels of hidden cells only."""
    pix = masking.upsample_mask(mask, [s // g for s, g in zip(x.shape[2:], mask.shape[1:])]).unsqueeze(1)
    return torch.where(pix, torch.randn_like(x) * 3, x)


def test_registry_has_tiny_presets():
    assert {"vit_tiny", "simple_vit_tiny"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_interface_attributes(name):
    m = model_for(name)
    assert isinstance(m, ssl_vit.Backbone)
    assert m.embed_dim > 0 and m.in_channels > 0 and m.size_multiple > 0
    assert m.capabilities <= ssl_vit.CAPABILITIES
    assert isinstance(m.no_weight_decay(), set)
    names = dict(m.named_parameters())
    assert m.no_weight_decay() <= set(names)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("which", ["default", "second"])
def test_forward_features_shapes(name, which):
    m = model_for(name)
    size = tuple(m.default_size) if which == "default" else second_size(m)
    x = make_input(m, size)
    with torch.no_grad():
        out = m.forward_features(x)
    grid = m.mask_grid(size)
    d = m.embed_dim
    assert tuple(out.grid) == grid
    assert out.patch_tokens.shape == (2, math.prod(grid), d)
    assert out.prefix_tokens.shape == (2, m.num_prefix_tokens, d)
    assert out.pooled.shape == (2, d)
    assert torch.isfinite(out.patch_tokens).all() and torch.isfinite(out.pooled).all()
    with torch.no_grad():
        assert m(x).shape == (2, d)  # num_classes=0: pooled features


@pytest.mark.parametrize("name", NAMES)
def test_logits(name):
    m = build(name, num_classes=7)
    with torch.no_grad():
        logits = m(make_input(m))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_mask_acts_only_through_hidden_cells(name):
    m = model_for(name)
    if ssl_vit.MASK_TOKEN not in m.capabilities:
        pytest.skip("no mask_token capability")
    x = make_input(m)
    grid = m.mask_grid(x.shape[2:])
    mask = masking.random_mask(2, grid, 0.5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = m.forward_features(x).patch_tokens
        masked = m.forward_features(x, mask=mask).patch_tokens
        other = m.forward_features(hidden_cell_noise(x, m, mask), mask=mask).patch_tokens
    assert not torch.allclose(plain, masked, atol=1e-5), "a mask must change the output"
    torch.testing.assert_close(masked, other, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_keep_matches_gathered_subset(name):
    m = model_for(name)
    if ssl_vit.TOKEN_DROP not in m.capabilities:
        pytest.skip("no token_drop capability")
    x = make_input(m)
    grid = m.mask_grid(x.shape[2:])
    n = math.prod(grid)
    mask = masking.random_mask(2, grid, 0.5, generator=torch.Generator().manual_seed(2))
    keep = masking.mask_to_keep(mask)
    with torch.no_grad():
        full = m.forward_features(x)
        every = m.forward_features(x, keep=torch.arange(n).expand(2, n))
        kept = m.forward_features(x, keep=keep)
        other = m.forward_features(hidden_cell_noise(x, m, mask), keep=keep)
        perm = torch.randperm(keep.shape[1], generator=torch.Generator().manual_seed(3))
        shuffled = m.forward_features(x, keep=keep[:, perm])
    torch.testing.assert_close(every.patch_tokens, full.patch_tokens, atol=1e-5, rtol=1e-4)
    assert kept.patch_tokens.shape == (2, keep.shape[1], m.embed_dim)
    assert kept.keep is not None and torch.equal(kept.keep, keep)
    # Dropped cells have no influence, and token order follows `keep`.
    torch.testing.assert_close(other.patch_tokens, kept.patch_tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shuffled.patch_tokens, kept.patch_tokens[:, perm], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_extra_tokens_and_positions(name):
    m = model_for(name)
    x = make_input(m)
    with torch.no_grad():
        base = m.forward_features(x)
        if ssl_vit.EXTRA_TOKENS in m.capabilities:
            extra = torch.randn(2, 1, m.embed_dim)
            out = m.forward_features(x, extra_tokens=extra)
            assert out.prefix_tokens.shape == (2, m.num_prefix_tokens + 1, m.embed_dim)
        if ssl_vit.POS_FREE in m.capabilities:
            nopos = m.forward_features(x, use_pos=False)
            assert not torch.allclose(nopos.patch_tokens, base.patch_tokens, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_missing_capability_is_refused(name):
    m = model_for(name)
    x = make_input(m)
    grid = m.mask_grid(x.shape[2:])
    if ssl_vit.TOKEN_DROP not in m.capabilities:
        with pytest.raises(ssl_vit.IncompatibleBackbone):
            m.forward_features(x, keep=torch.zeros(2, 1, dtype=torch.long))
    if ssl_vit.MASK_TOKEN not in m.capabilities:
        with pytest.raises(ssl_vit.IncompatibleBackbone):
            m.forward_features(x, mask=torch.zeros(2, *grid, dtype=torch.bool))


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name):
    m = build(name, num_classes=3).train()
    x = make_input(m)
    kwargs = {}
    if ssl_vit.MASK_TOKEN in m.capabilities:
        kwargs["mask"] = masking.random_mask(2, m.mask_grid(x.shape[2:]), 0.5)
    out = m.forward_features(x, **kwargs)
    loss = sum(t.float().square().mean() for t in (out.patch_tokens, out.pooled, m.forward_head(out.pooled)))
    if out.prefix_tokens.numel():
        loss = loss + out.prefix_tokens.square().mean()
    loss.backward()
    missing = [n for n, p in m.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"parameters without a (finite) gradient: {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_determinism(name):
    a = build(name)
    b = build(name)  # same seed: identical weights
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), f"seeded construction differs at {ka}"
    torch.manual_seed(123)
    c = ssl_vit.create_backbone(name).eval()
    c.load_state_dict(a.state_dict())
    x = make_input(a)
    with torch.no_grad():
        ya, yc = a(x), c(x)
    assert torch.equal(ya, yc)
    assert not torch.isnan(ya).any()


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_clear_errors(name):
    m = model_for(name)
    x = make_input(m)
    wrong_channels = torch.randn(2, m.in_channels + 1, *x.shape[2:])
    with pytest.raises(InputShapeError, match=f"expects {m.in_channels} input channels"):
        m(wrong_channels)
    size = list(x.shape[2:])
    size[-1] += 1
    with pytest.raises(InputShapeError, match=f"{size[-1]}"):
        m(torch.randn(2, m.in_channels, *size))


@pytest.mark.parametrize("name", NAMES)
def test_input_dtype_rank_and_type_are_checked(name):
    m = model_for(name)
    x = make_input(m)
    pixels = (x.clamp(-1, 1) * 127 + 128).to(torch.uint8)
    for call in (m, m.forward_features):
        with pytest.raises(ssl_vit.InputDtypeError, match=r"uint8.*x\.float\(\) / 255") as info:
            call(pixels)
        assert isinstance(info.value, ssl_vit.SslVitError) and "\n" not in str(info.value)
        with pytest.raises(ssl_vit.InputDtypeError, match="int64"):
            call(pixels.long())
        with pytest.raises(InputShapeError, match="expects a"):
            call(x[0])  # no batch axis
    with pytest.raises(ssl_vit.InputDtypeError, match="torch.Tensor"):
        m.forward_features(x.numpy())


@pytest.mark.parametrize("name", NAMES)
def test_kv_mask_is_declared_not_sniffed(name):
    m = model_for(name)
    x = make_input(m)
    grid = m.mask_grid(x.shape[2:])
    kv = masking.random_mask(2, grid, 0.5, generator=torch.Generator().manual_seed(4))
    use_pos = ssl_vit.POS_FREE not in m.capabilities
    if ssl_vit.KV_MASK not in m.capabilities:
        with pytest.raises((ssl_vit.IncompatibleBackbone, TypeError)):
            m.forward_features(x, kv_mask=kv)
        return
    with torch.no_grad():
        out = m.forward_features(x, use_pos=use_pos, kv_mask=kv)
        full = m.forward_features(x, use_pos=use_pos)
    assert out.patch_tokens.shape == full.patch_tokens.shape and torch.isfinite(out.patch_tokens).all()
    assert not torch.allclose(out.patch_tokens, full.patch_tokens, atol=1e-5), "kv_mask must change the output"
    with pytest.raises(InputShapeError, match="kv_mask must be bool"):
        m.forward_features(x, use_pos=use_pos, kv_mask=kv.float())


@pytest.mark.parametrize("name", NAMES)
def test_forward_sets_no_attributes(name, monkeypatch):
    """No module keeps per-call state: nothing is assigned to a module while it runs."""
    m = model_for(name)
    x = make_input(m)
    kwargs = {}
    if ssl_vit.KV_MASK in m.capabilities:
        kwargs = dict(kv_mask=masking.random_mask(2, m.mask_grid(x.shape[2:]), 0.5),
                      use_pos=ssl_vit.POS_FREE not in m.capabilities)
    elif ssl_vit.MASK_TOKEN in m.capabilities:
        kwargs = dict(mask=masking.random_mask(2, m.mask_grid(x.shape[2:]), 0.5))
    assigned: list[str] = []
    original = torch.nn.Module.__setattr__

    def spy(self, key, value):
        if not (self is m and key in m.inspection_attributes):
            assigned.append(f"{type(self).__name__}.{key}")
        original(self, key, value)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", spy)
    with torch.no_grad():
        m.forward_features(x, **kwargs)
        m(x)
    monkeypatch.undo()
    assert not assigned, f"forward assigned module attributes: {sorted(set(assigned))}"
