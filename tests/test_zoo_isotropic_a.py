"""DeepViT, CaiT, T2T-ViT, CCT, CrossViT, XCiT: paper details and the seed defects not reproduced.

The conformance suite covers the interface; here: stochastic depth off in eval (the seed's CaiT
and XCiT dropped layers at inference), non-square inputs (the seed's T2T assumed square), CCT's
tuple sizes and position modes, LayerScale init by total depth, CrossViT's multi-scale encoder,
XCA against its formula, and masked keys staying out of mixed-head attention.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ssl_vit
from backbones import CCT, CaiT, CrossViT, DeepViT, T2TViT, XCiT, cct_7
from backbones.deep_vit import HeadMix
from backbones.xcit import XCAttention
from ssl_vit import masking

TINY = dict(dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64)


def _x(*size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cls", [CaiT, XCiT])
def test_layer_dropout_is_stochastic_depth_off_in_eval(cls):
    torch.manual_seed(0)
    m = cls(image_size=32, patch_size=8, num_classes=5, cls_depth=1, layer_dropout=0.5, **TINY)
    x = _x(32, 32)
    m.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        b = m(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the seed skipped random layers here
    m.train()
    with torch.no_grad():
        outs = []
        for seed in range(4):
            torch.manual_seed(seed)
            outs.append(m(x))
    assert any(not torch.allclose(outs[0], o) for o in outs[1:]), "layer_dropout should act in training"


@pytest.mark.parametrize("cls", [CaiT, XCiT])
def test_layer_scale_init_by_total_depth(cls):
    for depth, eps in [(2, 0.1), (18, 0.1), (20, 1e-5), (24, 1e-5), (26, 1e-6)]:
        m = cls(image_size=16, patch_size=8, num_classes=0, dim=8, depth=depth, cls_depth=1, heads=1,
                dim_head=8, mlp_dim=8)
        gammas = [p for n, p in m.named_parameters() if n.endswith("gamma")]
        assert len(gammas) == (depth * (3 if cls is XCiT else 2) + 2)  # every residual branch, both stages
        for g in gammas:
            assert torch.all(g == torch.tensor(eps)), f"depth {depth}: expected {eps}"
    m = cls(image_size=16, patch_size=8, num_classes=0, dim=8, depth=2, cls_depth=1, heads=1, dim_head=8,
            mlp_dim=8, layer_scale=0.5)
    assert all(torch.all(p == 0.5) for n, p in m.named_parameters() if n.endswith("gamma"))


def test_t2t_non_square_and_readme_layers():
    torch.manual_seed(0)
    m = T2TViT(image_size=32, num_classes=4, t2t_layers=((7, 4), (3, 2), (3, 2)), **TINY).eval()
    assert m.mask_unit == (16, 16) and m.size_multiple == 16
    x = _x(48, 32)
    with torch.no_grad():
        out = m.forward_features(x)
        logits = m(x)
    assert out.grid == (3, 2) and out.patch_tokens.shape == (2, 6, 32)
    assert logits.shape == (2, 4)
    with torch.no_grad():
        assert m.forward_features(_x(32, 64)).grid == (2, 4)
    # The stem keeps the image layout (the seed reshaped every stage as if square). Without its
    # global re-structurization layers the stem is local: a poke at the bottom-left corner reaches
    # the bottom-left tokens only (a stage reshaped with h and w swapped would spread it to the right).
    stem = copy.deepcopy(m.patch_embed)
    stem.blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in stem.blocks)
    base = torch.zeros(1, 3, 96, 64)
    poke = base.clone()
    poke[..., 92:, :4] = 1.0
    with torch.no_grad():
        diff = (stem(poke)[0] - stem(base)[0]).abs().sum(-1).view(6, 4)
    assert diff[5, 0] > 0 and torch.all(diff[:5] == 0) and torch.all(diff[:, 2:] == 0)


def test_t2t_rejects_windows_that_miss_the_grid():
    with pytest.raises(ValueError, match="2\\*padding < kernel"):
        T2TViT(image_size=32, num_classes=0, t2t_layers=((3, 4),), **TINY)


def test_t2t_is_refused_token_drop():
    m = ssl_vit.create_backbone("t2t_vit_tiny").eval()
    assert ssl_vit.TOKEN_DROP not in m.capabilities and ssl_vit.MASK_TOKEN in m.capabilities
    with pytest.raises(ssl_vit.IncompatibleBackbone):
        m.forward_features(_x(32, 32), keep=torch.zeros(2, 3, dtype=torch.long))


def _cct(**kw) -> CCT:
    base = dict(img_size=(32, 64), embedding_dim=32, n_conv_layers=1, kernel_size=3, stride=1, padding=1,
                num_layers=2, num_heads=2, mlp_ratio=2.0, num_classes=3)
    return CCT(**{**base, **kw})


@pytest.mark.parametrize("mode", ["learnable", "sine", "none"])
def test_cct_tuple_size_and_position_modes(mode):
    torch.manual_seed(0)
    m = _cct(positional_embedding=mode).eval()
    assert m.default_size == (32, 64) and m.mask_unit == 2
    pos_params = [n for n, _ in m.named_parameters() if n.startswith("pos_embed")]
    if mode == "learnable":
        assert pos_params == ["pos_embed.weight"] and m.pos_embed.weight.shape == (1, 16 * 32, 32)
    else:
        assert pos_params == []
    if mode == "none":
        assert m.pos_embed is None
    with torch.no_grad():
        out = m.forward_features(_x(32, 64))
        assert out.grid == (16, 32) and out.patch_tokens.shape == (2, 512, 32)
        assert m(_x(48, 32)).shape == (2, 3)  # another size: positions follow the grid
    if mode != "none":  # positions matter: the same weights without them give other features
        saved, m.pos_embed = m.pos_embed, None
        with torch.no_grad():
            assert not torch.allclose(m.forward_features(_x(32, 64)).pooled, out.pooled, atol=1e-5)
        m.pos_embed = saved


def test_cct_bad_position_mode_and_class_token_variant():
    with pytest.raises(ValueError, match="positional_embedding"):
        _cct(positional_embedding="rotary")
    m = _cct(seq_pool=False).eval()
    assert m.num_prefix_tokens == 1
    with torch.no_grad():
        out = m.forward_features(_x(32, 64))
    torch.testing.assert_close(out.pooled, out.prefix_tokens[:, 0])


def test_cross_vit_multi_scale_encoder_returns_both_branches():
    torch.manual_seed(0)
    m = ssl_vit.create_backbone("cross_vit_tiny", num_classes=6).eval()
    seen = {}
    handle = m.multi_scale_encoder.register_forward_hook(lambda mod, inp, out: seen.update(out=out))
    x = _x(32, 48)
    with torch.no_grad():
        logits = m(x)
    handle.remove()
    sm, lg = seen["out"]
    assert sm.shape == (2, 1 + 8 * 12, 32) and lg.shape == (2, 1 + 4 * 6, 64)
    assert logits.shape == (2, 6)
    # The same through the library's Extractor, as in the seed README.
    ext = ssl_vit.Extractor(m, layer_name="multi_scale_encoder")
    with torch.no_grad():
        logits2, (sm2, lg2) = ext(x)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(sm2, sm)
    torch.testing.assert_close(lg2, lg)


def test_cross_vit_patch_tokens_join_both_scales():
    torch.manual_seed(0)
    m = ssl_vit.create_backbone("cross_vit_tiny").eval()
    with torch.no_grad():
        out = m.forward_features(_x(32, 32))
        _, lg = m.multi_scale_encoder(*[
            m._branch(e, _x(32, 32), None, None, True)[0] for e in (m.sm_image_embedder, m.lg_image_embedder)
        ])
    assert out.patch_tokens.shape == (2, 16, 96)
    torch.testing.assert_close(out.patch_tokens[..., 32:], lg[:, 1:])


def test_cross_vit_unaligned_patches_offer_only_pos_free():
    m = CrossViT(image_size=48, num_classes=0, sm_dim=16, lg_dim=32, sm_patch_size=12, lg_patch_size=16,
                 sm_enc_heads=2, sm_enc_mlp_dim=32, sm_enc_dim_head=8, lg_enc_depth=1, lg_enc_heads=2,
                 lg_enc_mlp_dim=32, lg_enc_dim_head=8, depth=1, cross_attn_depth=1, cross_attn_heads=2,
                 cross_attn_dim_head=8).eval()
    assert m.capabilities == frozenset({ssl_vit.POS_FREE}) and m.size_multiple == 48
    with torch.no_grad():
        out = m.forward_features(_x(48, 96))
    assert out.grid == (3, 6) and out.patch_tokens.shape == (2, 18, 48)
    with pytest.raises(ssl_vit.IncompatibleBackbone):
        m.forward_features(_x(48, 48), mask=torch.zeros(2, 3, 3, dtype=torch.bool))


def _scramble_head_mixing(model: torch.nn.Module) -> None:
    """Give every head mix off-diagonal weights and a non-zero norm bias, so a leak would show."""
    g = torch.Generator().manual_seed(5)
    for mod in model.modules():
        if isinstance(mod, HeadMix):
            with torch.no_grad():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g))
                if mod.norm_bias is not None:
                    mod.norm_bias.copy_(torch.randn(mod.norm_bias.shape, generator=g))


@pytest.mark.parametrize("name", ["deep_vit_tiny", "cait_tiny", "cross_vit_tiny"])
def test_kv_mask_keeps_hidden_cells_out_of_keys(name):
    torch.manual_seed(0)
    m = ssl_vit.create_backbone(name).eval()
    _scramble_head_mixing(m)
    x = _x(32, 32)
    grid = m.mask_grid((32, 32))
    kv = masking.random_mask(2, grid, 0.5, generator=torch.Generator().manual_seed(3))
    pix = masking.upsample_mask(kv, m.mask_unit if isinstance(m.mask_unit, int) else m.mask_unit[0]).unsqueeze(1)
    y = torch.where(pix, torch.randn_like(x) * 3, x)
    with torch.no_grad():
        a = m.forward_features(x, use_pos=False, kv_mask=kv)
        b = m.forward_features(y, use_pos=False, kv_mask=kv)
        full = m.forward_features(x, use_pos=False)
    visible = ~kv.flatten(1)
    assert torch.isfinite(a.patch_tokens).all()
    torch.testing.assert_close(a.patch_tokens[visible], b.patch_tokens[visible], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a.pooled, full.pooled, atol=1e-5)


def test_xca_matches_its_formula():
    torch.manual_seed(0)
    attn = XCAttention(16, heads=2, dim_head=8).eval()
    with torch.no_grad():
        attn.temperature.copy_(torch.tensor([0.7, 1.9]).view(2, 1, 1))
        x = torch.randn(2, 10, 16)
        got = attn(x)
        q, k, v = attn.qkv(x).chunk(3, dim=-1)
        outs = []
        for h in range(2):
            sl = slice(8 * h, 8 * (h + 1))
            qh, kh, vh = q[..., sl], k[..., sl], v[..., sl]  # (B, N, d)
            qh = qh / qh.norm(dim=1, keepdim=True)  # normalised over tokens
            kh = kh / kh.norm(dim=1, keepdim=True)
            a = (qh.transpose(1, 2) @ kh * attn.temperature[h]).softmax(-1)  # (B, d, d)
            outs.append((a @ vh.transpose(1, 2)).transpose(1, 2))
        want = attn.proj(torch.cat(outs, dim=-1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_re_attention_mixes_heads_after_softmax():
    torch.manual_seed(0)
    m = DeepViT(image_size=16, patch_size=8, num_classes=0, **TINY).eval()
    _scramble_head_mixing(m)
    attn = m.transformer.blocks[0].attn
    attn.record = True
    with torch.no_grad():
        m(_x(16, 16))
    w = attn.last_attention  # (B, H, N, N) after mixing and the norm over heads
    assert w.shape == (2, 2, 5, 5)
    # Layer-normalised over heads: each (query, key) pair has mean beta-mean and is not a softmax row.
    bias = attn.post_softmax.norm_bias
    torch.testing.assert_close(w.mean(1), bias.mean().expand(2, 5, 5), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(w.sum(-1), torch.ones(2, 2, 5))


@pytest.mark.parametrize("name", ["deep_vit_tiny", "cait_tiny", "xcit_tiny", "cross_vit_tiny"])
def test_non_square_build_size(name):
    overrides = {"image_size": (32, 48)}
    m = ssl_vit.create_backbone(name, **overrides).eval()
    assert tuple(m.default_size) == (32, 48)
    with torch.no_grad():
        out = m.forward_features(_x(32, 48))
    assert out.grid == m.mask_grid((32, 48)) and out.patch_tokens.shape[1] == out.grid[0] * out.grid[1]


@pytest.mark.parametrize("build", [
    lambda: ssl_vit.create_backbone("cait_tiny", layer_dropout=0.1),
    lambda: ssl_vit.create_backbone("cross_vit_tiny"),
    lambda: T2TViT(image_size=(32, 48), num_classes=3, t2t_layers=((7, 4), (3, 2)), **TINY),
    lambda: cct_7(img_size=(32, 16), num_classes=3, positional_embedding="sine"),
], ids=["cait_registry", "cross_vit_registry", "t2t_class", "cct_7_function"])
def test_export_round_trip(build, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    ssl_vit.save_backbone(model, tmp_path)
    loaded = ssl_vit.load_backbone(tmp_path)
    x = _x(*model.default_size)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
