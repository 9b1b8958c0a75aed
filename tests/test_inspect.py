"""Recorder (attention maps) and Extractor (intermediate embeddings) over the shared attention."""

from __future__ import annotations

import pytest
import torch

import ssl_vit
from ssl_vit import Extractor, Recorder
from ssl_vit.layers import AttentionBase

from .conftest import make_input


def test_recorder_isotropic_shapes_and_outputs_unchanged():
    model = ssl_vit.create_backbone("vit_tiny").eval()  # 32 px, patch 8: 16 patches + class token
    x = make_input(model)
    with torch.no_grad():
        plain = model(x)
        rec = Recorder(model)
        pred, attns = rec(x)
    assert attns.shape == (2, 2, 2, 17, 17)
    torch.testing.assert_close(attns.sum(-1), torch.ones(2, 2, 2, 17))
    torch.testing.assert_close(pred, plain)  # the explicit-softmax path gives the fused result
    assert all(not m.record for m in model.modules() if isinstance(m, AttentionBase))  # fused again
    assert rec.eject() is model
    with pytest.raises(RuntimeError, match="ejected"):
        rec(x)


def test_recorder_first_layer_is_softmax_of_scores():
    model = ssl_vit.create_backbone("vit_tiny").eval()
    x = make_input(model, batch=1)
    extractor = Extractor(model, layer_name="transformer.blocks.0.norm1")
    with torch.no_grad():
        _, h = extractor(x)
        _, attns = Recorder(model)(x)
    attn = model.transformer.blocks[0].attn
    q, k, _ = attn.qkv(h).reshape(1, 17, 3, attn.heads, attn.dim_head).permute(2, 0, 3, 1, 4)
    expected = (q @ k.transpose(-1, -2) * attn.dim_head ** -0.5).softmax(-1)
    torch.testing.assert_close(attns[:, 0], expected)


def test_recorder_hierarchical_gives_a_list_per_stage():
    model = ssl_vit.create_backbone("cvt_tiny").eval()
    with torch.no_grad():
        _, attns = Recorder(model)(make_input(model))
    assert isinstance(attns, list) and len(attns) >= 2
    assert all(a.dim() == 5 and a.shape[0] == 2 for a in attns)
    assert attns[0].shape[-1] > attns[-1].shape[-1]  # later stages have fewer tokens


def test_extractor_names_and_errors():
    model = ssl_vit.create_backbone("vit_tiny").eval()
    x = make_input(model)
    ext = Extractor(model, layer_name=["transformer.blocks.0", "norm"])
    with torch.no_grad():
        _, emb = ext(x)
        out = model.forward_features(x)
    assert set(emb) == {"transformer.blocks.0", "norm"} and emb["transformer.blocks.0"].shape == (2, 17, 64)
    torch.testing.assert_close(emb["norm"][:, 1:], out.patch_tokens)
    ext.eject()
    only = Extractor(model, return_embeddings_only=True)
    assert only(x).shape == (2, 17, 64)
    with pytest.raises(ssl_vit.UnknownNameError, match="no layer 'transformr'.*transformer"):
        Extractor(model, layer_name="transformr")
