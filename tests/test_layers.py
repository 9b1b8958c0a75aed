"""Shared layers against their formulas: attention, hooks, positional embeddings, patch embedding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_vit import embed, layers


def reference_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(-1) @ v


def test_attend_matches_formula_fused_and_explicit():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    ref = reference_attention(q, k, v, mask)
    fused, none = layers.attend(q, k, v, attn_mask=mask)
    explicit, w = layers.attend(q, k, v, attn_mask=mask, return_weights=True)
    assert none is None
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5))


def test_attend_hooks_are_applied():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    swap = lambda t: t.flip(1)  # mix heads: swap them
    out, _ = layers.attend(q, k, v, post_softmax=swap)
    w = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1).flip(1)
    torch.testing.assert_close(out, w @ v, atol=1e-5, rtol=1e-5)


def test_attention_module_self_and_cross_share_weights():
    torch.manual_seed(0)
    attn = layers.Attention(16, heads=2, dim_head=8, qkv_bias=True).eval()
    x = torch.randn(2, 5, 16)
    # Cross-attention with context == x is self-attention.
    torch.testing.assert_close(attn(x), attn(x, context=x), atol=1e-5, rtol=1e-5)
    w = attn.qkv.weight
    q, k, v = (torch.nn.functional.linear(x, w[i * 16:(i + 1) * 16], attn.qkv.bias[i * 16:(i + 1) * 16])
               .view(2, 5, 2, 8).transpose(1, 2) for i in range(3))
    ref = reference_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16)
    torch.testing.assert_close(attn(x), attn.proj(ref), atol=1e-5, rtol=1e-5)


def test_attention_records_weights_only_when_asked():
    attn = layers.Attention(16, heads=2, dim_head=8)
    x = torch.randn(1, 4, 16)
    attn(x)
    assert attn.last_attention is None
    attn.record = True
    attn(x)
    assert attn.last_attention.shape == (1, 2, 4, 4)


def test_attention_dropout_off_in_eval():
    attn = layers.Attention(16, heads=2, dim_head=8, attn_drop=0.9).eval()
    x = torch.randn(1, 4, 16)
    assert torch.equal(attn(x), attn(x))


def test_transformer_drop_path_rises_and_block_names_follow_timm():
    t = layers.Transformer(16, 3, 2, 8, 32, drop_path=0.2)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in t.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    names = {n for n, _ in t.blocks[0].named_parameters()}
    assert {"norm1.weight", "attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"} <= names


def test_sincos_2d_formula():
    pe = embed.sincos_2d(3, 4, 8)
    assert pe.shape == (12, 8)
    # Cell (row 1, col 2): x = 2 in the first half, y = 1 in the second; frequencies 1/10000^(i/2).
    omega = 1.0 / 10000 ** (torch.arange(2) / 2)
    x, y = 2.0, 1.0
    want = torch.cat([(x * omega).sin(), (x * omega).cos(), (y * omega).sin(), (y * omega).cos()])
    torch.testing.assert_close(pe[1 * 4 + 2], want)


def test_sincos_3d_shape_and_distinct_positions():
    pe = embed.sincos_3d(2, 3, 3, 32)
    assert pe.shape == (18, 32)
    assert torch.cdist(pe, pe).add(torch.eye(18)).min() > 0


def test_learned_pos_embed_resamples():
    pe = embed.LearnedPosEmbed((4, 4), 8)
    assert pe((4, 4)).data_ptr() == pe.weight.data_ptr()
    up = pe((8, 6))
    assert up.shape == (1, 48, 8)
    # A constant embedding stays constant under interpolation.
    with torch.no_grad():
        pe.weight.fill_(0.5)
    torch.testing.assert_close(pe((8, 6)), torch.full((1, 48, 8), 0.5))


def test_vit_pos_init_std_sets_the_positions_spread_and_is_checked():
    import ssl_vit

    default = ssl_vit.create_backbone("vit_tiny").pos_embed.weight
    wide = ssl_vit.create_backbone("vit_tiny", pos_init_std=1.0).pos_embed.weight
    assert abs(default.std().item() - 0.02) < 0.004
    assert 0.8 < wide.std().item() < 1.0 and wide.abs().max().item() <= 2.0  # cut at +-2, as timm's trunc_normal_
    for bad in (0, -1.0, "1", True):
        with pytest.raises(ssl_vit.SslVitError, match="pos_init_std"):
            ssl_vit.create_backbone("vit_tiny", pos_init_std=bad)


def test_patch_embed_equals_linear_on_patches():
    pe = embed.PatchEmbed((4, 2), 3, 5)
    x = torch.randn(2, 3, 8, 6)
    tokens, grid = pe(x)
    assert grid == (2, 3) and tokens.shape == (2, 6, 5)
    patches = x.unfold(2, 4, 4).unfold(3, 2, 2)  # (B, C, h, w, 4, 2)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 6, -1)
    ref = patches @ pe.proj.weight.reshape(5, -1).T + pe.proj.bias
    torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=1e-5)


def test_mlp_shapes():
    assert layers.Mlp(8, 32)(torch.randn(2, 3, 8)).shape == (2, 3, 8)
    assert isinstance(layers.Mlp(8, 32).act, nn.GELU)
