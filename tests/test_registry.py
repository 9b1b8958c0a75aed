"""Registries, errors and the core ViT behaviour the seed README promises."""

from __future__ import annotations

import pytest
import torch

import ssl_vit
from backbones import SimpleViT, ViT


def test_list_and_create():
    names = ssl_vit.list_backbones()
    assert {"vit", "simple_vit", "vit_small_patch16"} <= set(names)
    m = ssl_vit.create_backbone("vit_tiny", depth=1)
    assert len(m.transformer.blocks) == 1
    assert m.registry_name == "vit_tiny" and m.registry_overrides == {"depth": 1}


def test_unknown_name_lists_closest():
    with pytest.raises(ssl_vit.UnknownNameError, match="did you mean: vit"):
        ssl_vit.create_backbone("vti")
    with pytest.raises(KeyError):  # still a KeyError for callers that expect one
        ssl_vit.create_backbone("no_such_model")


def test_size_not_multiple_names_both_numbers():
    m = ssl_vit.create_backbone("vit_tiny")
    with pytest.raises(ValueError, match=r"36.*size_multiple=8|size_multiple=8.*36"):
        m(torch.randn(1, 3, 32, 36))


def test_init_config_records_constructor_arguments():
    v = ViT(image_size=32, patch_size=8, num_classes=3, dim=32, depth=1, heads=2, mlp_dim=64)
    assert v.init_config == dict(image_size=32, patch_size=8, num_classes=3, dim=32, depth=1, heads=2, mlp_dim=64)
    rebuilt = type(v)(**v.init_config)
    rebuilt.load_state_dict(v.state_dict())


def test_vit_pool_and_dropout_behaviour():
    kw = dict(image_size=32, patch_size=8, num_classes=4, dim=32, depth=1, heads=2, mlp_dim=64)
    with pytest.raises(ValueError, match="pool"):
        ViT(**kw, pool="max")
    v = ViT(**kw, pool="mean", dropout=0.5, emb_dropout=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(v(x), v(x)), "dropout is off in eval"
    out = v.forward_features(x)
    torch.testing.assert_close(out.pooled, out.patch_tokens.mean(1))


def test_pluggable_transformer():
    class Identityish(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(32, 32)

        def forward(self, x):
            return self.lin(x)

    v = ViT(image_size=32, patch_size=8, num_classes=5, dim=32, transformer=Identityish())
    assert v(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_simple_vit_has_no_class_token_and_fixed_positions():
    s = SimpleViT(image_size=32, patch_size=8, num_classes=0, dim=32, depth=1, heads=2, mlp_dim=64)
    assert s.num_prefix_tokens == 0
    assert not any("pos" in n for n, _ in s.named_parameters())
    assert s.forward_features(torch.randn(1, 3, 48, 32)).patch_tokens.shape == (1, 24, 32)


def test_no_weight_decay_names():
    m = ssl_vit.create_backbone("vit_tiny")
    nwd = m.no_weight_decay()
    assert {"cls_token", "mask_token", "prefix_pos", "pos_embed.weight"} <= nwd
    assert "transformer.blocks.0.attn.qkv.weight" not in nwd
    assert "transformer.blocks.0.norm1.weight" in nwd


# ---- constructor arguments are checked (issue #12) ------------------------------------------------

@pytest.mark.parametrize("overrides, named", [
    (dict(dim="abc"), "dim"),
    (dict(depth=2.5), "depth"),
    (dict(image_size="abc"), "image_size"),
    (dict(patch_size="8"), "patch_size"),
    (dict(qkv_bias="yes"), "qkv_bias"),
    (dict(pool=3), "pool"),
    (dict(dimm=3), "dimm"),
])
def test_bad_constructor_argument_is_one_clear_error(overrides, named):
    with pytest.raises(ssl_vit.BadArgument, match=named) as info:
        ssl_vit.create_backbone("vit_tiny", **overrides)
    msg = str(info.value)
    assert isinstance(info.value, ssl_vit.SslVitError) and isinstance(info.value, TypeError)
    assert "\n" not in msg and len(msg) < 300


def test_unknown_argument_suggests_the_closest():
    with pytest.raises(ssl_vit.BadArgument, match="did you mean: dim"):
        ssl_vit.create_backbone("vit_tiny", dimm=3)


def test_class_construction_is_checked_too():
    with pytest.raises(ssl_vit.BadArgument, match=r"heads='2'"):
        ViT(image_size=32, patch_size=8, num_classes=0, dim=32, depth=1, heads="2", mlp_dim=64)


def test_good_overrides_of_another_kind_still_work():
    m = ssl_vit.create_backbone("vit_tiny", image_size=(32, 48), layer_scale=None, drop_path=0)
    assert tuple(m.default_size) == (32, 48)


def test_every_registered_preset_passes_the_argument_check():
    from ssl_vit.backbone import check_arguments
    from ssl_vit.registry import BACKBONES

    checked = 0
    for name in ssl_vit.list_backbones():
        factory = BACKBONES.get(name)
        cls = vars(factory).get("backbone_class")  # preset factories; hand-written ones build when called
        if cls is None:
            continue
        init = cls.__dict__["__init__"].__wrapped__
        check_arguments(cls, init, {"num_classes": 0, **factory.preset})
        checked += 1
    assert checked >= len(ssl_vit.list_backbones("_tiny"))


def test_a_name_that_is_not_a_string_is_a_bad_argument():
    with pytest.raises(ssl_vit.BadArgument, match="must be a string"):
        ssl_vit.create_backbone(5)
