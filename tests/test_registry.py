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
