"""PiT, LeViT, CvT, Twins-SVT, RegionViT, CrossFormer: what the conformance sweep does not cover.

Non-square inputs, channel counts, window and group sizes, the seed defects we do not reproduce
(CrossFormer's mis-indexed position table, LeViT/RegionViT ignoring `channels`, PiT's square-only
inputs), and the CvT sizes the DINO / EsViT demo runs at (32 px global, 16 px local crops).
"""

from __future__ import annotations

import math

import pytest
import torch

import ssl_vit
from backbones import CrossFormer, CvT, LeViT, PiT, RegionViT, TwinsSVT
from backbones.crossformer import DynamicPositionBias
from ssl_vit import masking
from ssl_vit.errors import InputShapeError

NAMES = ["pit", "levit", "cvt", "twins_svt", "regionvit", "crossformer"]


def tiny(name: str, **kw) -> ssl_vit.Backbone:
    torch.manual_seed(0)
    return ssl_vit.create_backbone(f"{name}_tiny", **kw).eval()


@pytest.mark.parametrize("name", NAMES)
def test_non_square_input(name):
    m = tiny(name)
    h, w = m.default_size
    size = (h, w + 2 * m.size_multiple)
    x = torch.randn(2, m.in_channels, *size)
    with torch.no_grad():
        out = m.forward_features(x)
    grid = m.mask_grid(size)
    assert grid[0] != grid[1]
    assert tuple(out.grid) == grid and out.patch_tokens.shape == (2, math.prod(grid), m.embed_dim)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [1, 4])
def test_channels_are_honoured(name, channels):
    m = tiny(name, channels=channels, num_classes=5)
    x = torch.randn(2, channels, *m.default_size)
    with torch.no_grad():
        assert m(x).shape == (2, 5)
    with pytest.raises(InputShapeError, match=f"expects {channels} input channels"):
        m(torch.randn(2, 3, *m.default_size))


@pytest.mark.parametrize("name", NAMES)
def test_pooled_ignores_hidden_pixels(name):
    """The head's input sees hidden cells only through the mask token (RegionViT's regional stream too)."""
    m = tiny(name)
    x = torch.randn(2, m.in_channels, *m.default_size)
    mask = masking.random_mask(2, m.mask_grid(x.shape[2:]), 0.5, generator=torch.Generator().manual_seed(0))
    noisy = torch.where(masking.upsample_mask(mask, m.mask_unit).unsqueeze(1), torch.randn_like(x) * 3, x)
    with torch.no_grad():
        a = m.forward_features(x, mask=mask).pooled
        b = m.forward_features(noisy, mask=mask).pooled
        plain = m.forward_features(x).pooled
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a, plain, atol=1e-5)


@pytest.mark.parametrize("size", [32, 16, 48])
def test_cvt_tiny_demo_sizes(size):
    """The DINO / EsViT demo: 32 px digits and 16 px local crops, with masks on the stride-8 grid."""
    m = tiny("cvt")
    assert m.mask_unit == 8 and m.size_multiple == 8
    x = torch.randn(3, 3, size, size)
    mask = masking.random_mask(3, m.mask_grid((size, size)), 0.25)
    out = m.train().forward_features(x, mask=mask)
    assert out.grid == (size // 8, size // 8) and out.pooled.shape == (3, 128)
    out.pooled.sum().backward()
    assert m.mask_token.grad is not None


def test_cvt_even_embedding_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        CvT(num_classes=0, s1_emb_kernel=4)


def test_pit_stem_grid_is_exact_and_pooled_is_cls():
    m = tiny("pit")
    x = torch.randn(2, 3, 32, 48)
    assert m.stem(x).shape[-2:] == (16, 24)  # stride patch // 2, padded
    with torch.no_grad():
        out = m.forward_features(x)
    assert out.prefix_tokens.shape == (2, 1, m.embed_dim)
    torch.testing.assert_close(out.pooled, out.prefix_tokens[:, 0])
    # the seed's README config (patch 14, stride 7) on a non-square input
    seed = PiT(image_size=(224, 168), patch_size=14, dim=32, num_classes=3, depth=(1, 1, 1), heads=2, mlp_dim=32)
    assert seed.size_multiple == 28 and seed.mask_grid((224, 168)) == (8, 6)
    with torch.no_grad():
        assert seed(torch.randn(1, 3, 224, 168)).shape == (1, 3)


def test_levit_bias_extends_beyond_its_table():
    m = tiny("levit")
    attn = m.blocks[0].attn
    table = attn.relative_position_bias  # built for 64 px: a 4x4 stem grid
    assert table.shape[1:] == (4, 4)
    with torch.no_grad():
        table.copy_(torch.randn_like(table))
    small = attn.position_bias((2, 3))  # exact entries of the table
    assert small.shape == (table.shape[0], 6, 6)
    assert small[0, 0, 5] == table[0, 1, 2]  # query (0, 0), key (1, 2)
    big = attn.position_bias((6, 10))  # farther offsets reuse the farthest entry
    assert big.shape == (table.shape[0], 60, 60) and big[0, 0, 59] == table[0, 3, 3]
    with torch.no_grad():
        assert m(torch.randn(1, 3, 96, 160)).shape == (1, m.embed_dim)
    # the shrink attention's queries sit at stride 2 on the key grid
    shrink = m.blocks[1].attn
    assert shrink.stride == 2 and shrink.position_bias((4, 6)).shape[1:] == (6, 24)


def test_levit_readme_sizes_round_up_and_distill_head():
    m = LeViT(image_size=224, num_classes=4, stages=3, dim=(32, 48, 64), depth=1, heads=(1, 2, 2), mlp_mult=2,
              num_distill_classes=6).eval()
    assert m.size_multiple == 16 and m.mask_grid((224, 224)) == (4, 4)  # 14 -> 7 -> 4
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out, distill = m(x)
        feats = m.forward_features(x, mask=torch.zeros(1, 4, 4, dtype=torch.bool))
    assert out.shape == (1, 4) and distill.shape == (1, 6) and feats.grid == (4, 4)


@pytest.mark.parametrize("cls,kwargs,multiple", [
    (TwinsSVT, {}, 224),
    (CrossFormer, {}, 224),
    (RegionViT, {}, 224),
])
def test_seed_configs_declare_honest_size_multiples(cls, kwargs, multiple):
    m = cls(num_classes=0, **kwargs)
    assert m.size_multiple == multiple
    with pytest.raises(InputShapeError, match=f"size_multiple={multiple}"):
        m(torch.randn(1, 3, 224, 192))


@pytest.mark.parametrize("windows", [(4, 4, 2, 2), (2, 2, 2, 2), (8, 4, 2, 1)])
def test_crossformer_window_sizes(windows):
    m = CrossFormer(num_classes=0, dim=(16, 32, 32, 32), depth=1, global_window_size=windows,
                    local_window_size=(2, 4, 2, 2), cross_embed_kernel_sizes=((2, 4), (2, 4), (2, 4), (1, 3)),
                    cross_embed_strides=(2, 2, 2, 1), image_size=64).eval()
    expected = math.lcm(*(s * math.lcm(lw, gw) for s, lw, gw in zip((2, 4, 8, 8), (2, 4, 2, 2), windows)))
    assert m.size_multiple == expected
    size = (m.size_multiple * 2, m.size_multiple * 3)
    with torch.no_grad():
        out = m.forward_features(torch.randn(1, 3, *size))
    assert out.grid == (size[0] // 8, size[1] // 8)


@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_crossformer_dynamic_bias_matches_the_window(window):
    """Per head, for the window at hand, and a function of the offset only (the seed mis-indexes its table)."""
    dpb = DynamicPositionBias(8, heads=3)
    bias = dpb(window)
    n = window * window
    assert bias.shape == (3, n, n)
    pos = [(i // window, i % window) for i in range(n)]
    with torch.no_grad():
        for i in range(n):
            for j in range(n):
                dy, dx = pos[i][0] - pos[j][0], pos[i][1] - pos[j][1]
                expect = dpb.mlp(torch.tensor([[float(dy), float(dx)]]))[0]
                torch.testing.assert_close(bias[:, i, j], expect)


def test_crossformer_long_distance_groups_are_strided():
    """LDA groups tokens `interval` apart: changing one token moves only its group's outputs."""
    from backbones.crossformer import CrossAttention

    attn = CrossAttention(16, "long", 2, 8, 0.0).eval()
    x = torch.randn(1, 4, 6, 16)  # groups of 2x2 at interval (2, 3)
    y = x.clone()
    y[0, 0, 0] += 1.0
    with torch.no_grad():
        changed = (attn(x) - attn(y)).abs().sum(-1)[0] > 1e-6
    expect = torch.zeros(4, 6, dtype=torch.bool)
    expect[::2, ::3] = True  # the members of token (0, 0)'s group
    assert torch.equal(changed, expect)


def test_twins_local_windows_are_local():
    """LSA mixes tokens only inside their window."""
    from backbones.twins_svt import LocalAttention

    attn = LocalAttention(16, 2, 8, 2, 0.0).eval()
    x = torch.randn(1, 4, 4, 16)
    y = x.clone()
    y[0, 0, 0] += 1.0
    with torch.no_grad():
        changed = (attn(x) - attn(y)).abs().sum(-1)[0] > 1e-6
    expect = torch.zeros(4, 4, dtype=torch.bool)
    expect[:2, :2] = True
    assert torch.equal(changed, expect)


def test_regionvit_local_patch_and_stem_options():
    m = RegionViT(num_classes=0, dim=(16, 32), depth=(1, 1), window_size=2, local_patch_size=2, image_size=16,
                  channels=1).eval()
    assert m.mask_unit == 4 and m.size_multiple == 8
    with torch.no_grad():
        out = m.forward_features(torch.randn(2, 1, 16, 24))
    assert out.grid == (4, 6)
    with pytest.raises(ValueError, match="local_patch_size=4"):
        RegionViT(num_classes=0, tokenize_local_3_conv=True, local_patch_size=2)
    three = RegionViT(num_classes=0, dim=(16, 32), depth=1, window_size=2, tokenize_local_3_conv=True,
                      image_size=16).eval()
    with torch.no_grad():
        assert three(torch.randn(1, 3, 16, 32)).shape == (1, 32)


def test_registered_names():
    names = set(ssl_vit.list_backbones())
    assert {f"{n}{s}" for n in NAMES for s in ("", "_tiny")} <= names


# ---- the one hierarchical base (backbones._hierarchy), shared with test_zoo_hierarchical_b's families ----
ALL_HIERARCHICAL = NAMES + ["scalable_vit", "sep_vit", "max_vit", "nest", "mobile_vit"]


def test_window_partition_layout_and_inverse():
    """One layout: (B, H, W, C) -> (B, nh, nw, wh*ww, C), windows and the tokens inside them row-major."""
    from backbones._hierarchy import window_merge, window_partition

    x = torch.arange(2 * 4 * 6).float().view(2, 4, 6, 1).expand(-1, -1, -1, 3)  # value: b * 24 + y * 6 + x
    w = window_partition(x, (2, 3))
    assert w.shape == (2, 2, 2, 6, 3)
    assert w[0, 0, 1, :, 0].tolist() == [3, 4, 5, 9, 10, 11]  # top-right 2x3 window
    assert w[1, 1, 0, :, 2].tolist() == [24 + t for t in (12, 13, 14, 18, 19, 20)]  # bottom-left, second image
    assert torch.equal(window_merge(w, (2, 3)), x)
    assert torch.equal(window_partition(x, 2), window_partition(x, (2, 2)))  # an int is a square window
    # a channels-last view of a channels-first map splits the same way
    cf = x.permute(0, 3, 1, 2).contiguous()
    assert torch.equal(window_partition(cf.permute(0, 2, 3, 1), (2, 3)), w)


def test_channel_norm_is_layer_norm_over_channels():
    from backbones._hierarchy import ChannelNorm

    torch.manual_seed(0)
    norm = ChannelNorm(5)
    assert isinstance(norm, torch.nn.LayerNorm) and set(norm.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 5, 3, 4)
    expect = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (5,), norm.weight, norm.bias).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), expect)


def test_peg_adds_a_depthwise_convolution_on_channels_last_maps():
    from backbones._hierarchy import PEG

    peg = PEG(4)
    x = torch.randn(1, 5, 6, 4)
    with torch.no_grad():
        expect = x + peg.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        torch.testing.assert_close(peg(x), expect)


@pytest.mark.parametrize("name", ALL_HIERARCHICAL)
def test_every_hierarchical_family_runs_the_one_base(name):
    from backbones._hierarchy import HierarchicalBackbone

    m = tiny(name)
    assert isinstance(m, HierarchicalBackbone)
    assert type(m).forward_features is HierarchicalBackbone.forward_features
    x = torch.randn(2, m.in_channels, *m.default_size)
    mask = masking.random_mask(2, m.mask_grid(m.default_size), 0.5, generator=torch.Generator().manual_seed(0))
    # the mask token replaces exactly the hidden cells of the channels-first stem map
    with torch.no_grad():
        stem = m.stem(x)
        filled = m.apply_mask(stem, mask)
    hidden = m.stem_mask(mask, stem.shape[-2:]).unsqueeze(1).expand_as(stem)
    token = m.mask_token.view(1, -1, 1, 1).expand_as(stem)
    assert hidden.any() and torch.equal(filled[hidden], token[hidden]) and torch.equal(filled[~hidden], stem[~hidden])
    # patch tokens are the final map row-major; pooled defaults to its mean
    captured = {}
    run = m.run_stages

    def spy(feat, image):
        captured["out"] = run(feat, image)
        return captured["out"]

    m.run_stages = spy
    with torch.no_grad():
        out = m.forward_features(x)
    final, prefix, pooled = captured["out"]
    b, d, h, w = final.shape
    assert out.grid == (h, w) and out.patch_tokens.shape == (b, h * w, d)
    for i, j in ((0, 0), (h - 1, 0), (0, w - 1), (h - 1, w - 1)):  # row-major: token i * w + j is cell (i, j)
        assert torch.equal(out.patch_tokens[:, i * w + j], final[:, :, i, j])
    if pooled is None:
        assert torch.equal(out.pooled, final.mean(dim=(2, 3)))

