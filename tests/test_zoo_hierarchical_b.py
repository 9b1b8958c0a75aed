"""ScalableViT, SepViT, MaxViT, NesT, MobileViT: geometry, channels, windows, paper details, and the
vit-pytorch seed defects these implementations must not reproduce."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath

import ssl_vit
from backbones import MaxViT, MobileViT, NesT, ScalableViT, SepViT
from backbones._hierarchy import PEG, to_channels_last, window_merge, window_partition
from backbones.max_vit import AxisAttention, RelPosBias, grid_merge, grid_partition
from backbones.mobile_vit import MobileViTBlock
from backbones.scalable_vit import InteractiveWindowAttention, Residual, ScalableSelfAttention
from backbones.sep_vit import DSSA
from ssl_vit import masking
from ssl_vit.errors import InputShapeError

TINY = ["scalable_vit_tiny", "sep_vit_tiny", "max_vit_tiny", "nest_tiny", "mobile_vit_tiny"]


def build(name: str, **overrides) -> ssl_vit.Backbone:
    torch.manual_seed(0)
    return ssl_vit.create_backbone(name, **overrides).eval()


# ---- geometry -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_non_square_inputs_give_row_major_final_grid(name):
    m = build(name)
    k = m.size_multiple
    x = torch.randn(1, 3, 2 * k, 3 * k)
    with torch.no_grad():
        out = m.forward_features(x)
    gh, gw = 2 * k // m.mask_unit, 3 * k // m.mask_unit
    assert out.grid == (gh, gw) == m.mask_grid((2 * k, 3 * k))
    assert out.patch_tokens.shape == (1, gh * gw, m.embed_dim)
    assert out.prefix_tokens.shape == (1, 0, m.embed_dim)


@pytest.mark.parametrize("name,unit,multiple", [
    ("scalable_vit_tiny", 8, 16), ("sep_vit_tiny", 8, 16), ("max_vit_tiny", 8, 16),
    ("nest_tiny", 4, 4), ("mobile_vit_tiny", 32, 64),
])
def test_mask_unit_is_final_stride_and_size_multiple_honest(name, unit, multiple):
    m = build(name)
    assert (m.mask_unit, m.size_multiple) == (unit, multiple)
    if multiple > unit:  # a multiple of the final stride that breaks a window must be refused up front
        with pytest.raises(InputShapeError, match=f"size_multiple={multiple}"):
            m(torch.randn(1, 3, multiple, multiple + unit))


def test_seed_presets_geometry():
    # Seed configs: windows times strides decide the multiple, the default size is a valid one.
    sc = ssl_vit.registry.BACKBONES.get("scalable_vit").preset
    assert ScalableViT(num_classes=0, **{**sc, "depth": (1, 1, 1, 1)}).size_multiple == 256
    maxvit = MaxViT(num_classes=0, dim=32, depth=(1, 1, 1, 1), window_size=7)
    assert (maxvit.mask_unit, maxvit.size_multiple, maxvit.default_size) == (32, 224, (224, 224))
    nest = NesT(image_size=224, patch_size=4, dim=32, heads=1, num_hierarchies=3, block_repeats=1, num_classes=0)
    assert (nest.mask_unit, nest.size_multiple) == (16, 16)  # 96 px DINO local crops work


@pytest.mark.parametrize("cls,kwargs", [
    (ScalableViT, dict(dim=16, heads=1, depth=(1, 1), reduction_factor=1, window_size=(4, None))),
    (SepViT, dict(dim=16, heads=1, depth=(1, 1), window_size=2)),
    (MaxViT, dict(dim=16, dim_head=8, depth=(1, 1), window_size=2)),
])
def test_bad_configuration_raises_value_error(cls, kwargs):
    with pytest.raises(ValueError, match="multiple of"):
        cls(num_classes=0, image_size=40, **kwargs)
    with pytest.raises(ValueError, match="one entry per stage"):
        cls(num_classes=0, **{**kwargs, "depth": 2})


@pytest.mark.parametrize("cls,extra", [(ScalableViT, dict(reduction_factor=1)), (SepViT, {})])
def test_per_stage_arguments_must_match_stage_count(cls, extra):
    with pytest.raises(ValueError, match="heads has 2 entries but there are 3 stages"):
        cls(num_classes=0, dim=16, heads=(1, 2), depth=(1, 1, 1), **extra)


# ---- channels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_any_input_channel_count(name):
    key = "in_channels" if name.startswith("mobile") else "channels"
    m = build(name, **{key: 1}, num_classes=4)
    assert m.in_channels == 1
    with torch.no_grad():
        assert m(torch.randn(2, 1, *m.default_size)).shape == (2, 4)
    with pytest.raises(InputShapeError, match="expects 1 input channels"):
        m(torch.randn(2, 3, *m.default_size))


# ---- ScalableViT ----------------------------------------------------------------------------------
def test_scalable_vit_block_order_follows_paper():
    """SSA, FF, PEG (first pair only), IWSA, FF: the seed ran SSA, FF, PEG, FF, IWSA."""
    m = build("scalable_vit_tiny", depth=(2, 1))
    stage = m.layers[0].blocks
    kinds = []
    for mod in stage:
        if isinstance(mod, PEG):
            kinds.append("peg")
        elif isinstance(mod.fn, ScalableSelfAttention):
            kinds.append("ssa")
        elif isinstance(mod.fn, InteractiveWindowAttention):
            kinds.append("iwsa")
        else:
            kinds.append("ff")
    assert kinds == ["ssa", "ff", "peg", "iwsa", "ff", "ssa", "ff", "iwsa", "ff"]
    calls = []
    for mod in stage:
        mod.register_forward_hook(lambda mod, i, o: calls.append(type(mod.fn).__name__ if isinstance(mod, Residual)
                                                               else "PEG"))
    with torch.no_grad():
        m(torch.randn(1, 3, 32, 32))
    assert calls == ["ScalableSelfAttention", "Mlp", "PEG", "InteractiveWindowAttention", "Mlp",
                     "ScalableSelfAttention", "Mlp", "InteractiveWindowAttention", "Mlp"]


def test_ssa_reduces_keys_and_iwsa_windows_interact_only_through_lim():
    torch.manual_seed(0)
    ssa = ScalableSelfAttention(8, heads=2, dim_key=6, dim_value=4, reduction=2)
    ssa.record = True
    ssa(torch.randn(1, 8, 8, 8))
    assert ssa.last_attention.shape == (1, 2, 64, 16)  # 8x8 queries, (8/2)^2 keys
    iwsa = InteractiveWindowAttention(8, heads=2, dim_key=4, dim_value=4, window=4).eval()
    x = torch.randn(1, 8, 8, 8)
    y = x.clone()
    y[0, 0, 4] += 1.0  # a pixel of the top-right window, on its border with the top-left one
    diff = (iwsa(x) - iwsa(y)).abs().sum(-1)[0] > 1e-6
    assert diff[:4, 4:].any()  # its own window
    assert diff[1, 3] and not diff[3, 0]  # LIM reaches the pixel next door in the next window, attention does not
    assert not diff[4:, :4].any()  # a far window never sees it
    iwsa.lim.weight.data.zero_()
    iwsa.lim.bias.data.zero_()
    diff = (iwsa(x) - iwsa(y)).abs().sum(-1)[0] > 1e-6
    assert not diff[:4, :4].any()  # without the LIM the windows are independent


# ---- SepViT -----------------------------------------------------------------------------------------
def test_sep_vit_honours_window_size_and_dim_head():
    m = SepViT(num_classes=0, dim=16, dim_head=12, heads=(1, 2), depth=(1, 1), window_size=(4, 2), image_size=32)
    attns = [mod for mod in m.modules() if isinstance(mod, DSSA)]
    assert [a.window for a in attns] == [4, 2]
    assert [a.qkv.weight.shape[0] for a in attns] == [3 * 1 * 12, 3 * 2 * 12]
    assert m.size_multiple == 16
    m2 = SepViT(num_classes=0, dim=16, heads=1, depth=(1, 1), window_size=(2, 2), image_size=32)
    assert m2.size_multiple == 16 and [a.window for a in m2.modules() if isinstance(a, DSSA)] == [2, 2]


def test_sep_vit_pointwise_attention_mixes_windows():
    torch.manual_seed(0)
    dssa = DSSA(8, heads=2, dim_head=4, window=2).eval()
    dssa.record = True
    x = torch.randn(1, 4, 4, 8)
    out = dssa(x)
    assert dssa.last_attention.shape == (1, 2, 4, 4)  # the last call is the window-to-window attention
    y = x.clone()
    y[0, 0, 0] += 1.0  # a pixel of the top-left window
    diff = (dssa(y) - out).abs().sum(-1)[0] > 1e-6
    assert diff[2:, 2:].any()  # reaches the far window through the window tokens (pointwise step)


# ---- MaxViT ------------------------------------------------------------------------------------------
def test_max_vit_drop_path_is_real_and_off_in_eval():
    a = build("max_vit_tiny", drop_path=0.5)
    b = build("max_vit_tiny")
    assert any(isinstance(mod, DropPath) for mod in a.modules())
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))  # eval: stochastic depth off
        a.train()
        for mod in a.modules():  # batch statistics differ per call otherwise: freeze BN, keep DropPath live
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eval()
        torch.manual_seed(1)
        first = a(x)
        torch.manual_seed(2)
        second = a(x)
    assert not torch.allclose(first, second)  # paths are dropped at random in training


def test_max_vit_block_and_grid_partitions():
    x = torch.arange(4 * 6).float().view(1, 4, 6, 1)
    blocks = window_partition(x, (2, 3))
    assert blocks[0, 0, 0, :, 0].tolist() == [0, 1, 2, 6, 7, 8]  # a contiguous 2x3 window
    grid_blocks = grid_partition(x, (2, 3))
    assert grid_blocks[0, 0, 0, :, 0].tolist() == [0, 2, 4, 12, 14, 16]  # a 2x3 grid spread over the map
    torch.testing.assert_close(window_merge(blocks, (2, 3)), x)
    torch.testing.assert_close(grid_merge(grid_blocks, (2, 3)), x)


def test_relative_position_bias_depends_on_offset_only():
    torch.manual_seed(0)
    bias = RelPosBias((3, 3), heads=2)()[0]  # (2, 9, 9)
    assert bias.shape == (2, 9, 9)
    # token 0 -> 4 and token 4 -> 8 both step (+1, +1)
    torch.testing.assert_close(bias[:, 0, 4], bias[:, 4, 8])
    assert not torch.allclose(bias[:, 0, 4], bias[:, 4, 0])


def test_max_vit_relative_bias_reaches_attention():
    m = build("max_vit_tiny")
    attn = [mod for mod in m.modules() if isinstance(mod, AxisAttention)]
    assert len(attn) == 4 and [a.grid for a in attn] == [False, True, False, True]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = m(x)
        attn[0].rel_pos.table.add_(1.0 * torch.randn_like(attn[0].rel_pos.table))
        assert not torch.allclose(before, m(x))


# ---- NesT -------------------------------------------------------------------------------------------
def test_nest_honours_dim_head():
    m = NesT(image_size=32, patch_size=2, dim=16, heads=2, dim_head=24, num_hierarchies=2, block_repeats=1,
             num_classes=0)
    qkv = [blk.attn.qkv.weight.shape[0] for lvl in m.levels for blk in lvl.transformer.blocks]
    assert qkv == [3 * 2 * 24, 3 * 4 * 24]  # heads double per level; dim_head as given
    paper = NesT(image_size=32, patch_size=2, dim=16, heads=2, num_hierarchies=2, block_repeats=1, num_classes=0)
    assert [blk.attn.dim_head for lvl in paper.levels for blk in lvl.transformer.blocks] == [8, 8]


def test_nest_blocks_are_independent_at_the_first_level():
    m = build("nest_tiny")
    level = m.levels[0]  # 2 x 2 blocks of 8 x 8 tokens
    x = torch.randn(1, 16, 16, 16)
    y = x.clone()
    y[0, 0, 0] += 1.0
    with torch.no_grad():
        diff = (level(x) - level(y)).abs().sum(-1)[0] > 1e-6
    assert diff[:8, :8].any() and not diff[8:].any() and not diff[:, 8:].any()
    # other sizes: the blocks' position table is resampled
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 48, 40)).grid == (12, 10)


# ---- MobileViT ------------------------------------------------------------------------------------------
def test_mobile_vit_heads_argument_and_any_channel_list():
    chans = [8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 64]  # no two entries equal (the seed needed pairs)
    m = MobileViT(image_size=64, dims=[16, 16, 24], channels=chans, depths=(1, 1, 1), heads=3, dim_head=4,
                  expansion=2, num_classes=5).eval()
    blocks = [mod for mod in m.modules() if isinstance(mod, MobileViTBlock)]
    assert all(blk.transformer[0].attn.heads == 3 and blk.transformer[0].attn.dim_head == 4 for blk in blocks)
    with torch.no_grad():
        assert m(torch.randn(2, 3, 64, 64)).shape == (2, 5)
        assert m.forward_features(torch.randn(1, 3, 64, 128)).patch_tokens.shape == (1, 2 * 4, 64)
    with pytest.raises(ValueError, match="11 channel widths"):
        MobileViT(image_size=64, dims=[16, 16, 24], channels=chans[:-1], num_classes=0)


def test_mobile_vit_unfold_groups_same_intra_patch_pixels():
    torch.manual_seed(0)
    blk = MobileViTBlock(8, 1, 4, 4, 3, (2, 2), 16, 2, 4, 0.0, 0.0).eval()
    seqs = []
    blk.transformer.register_forward_hook(lambda mod, i, o: seqs.append(i[0].shape))
    with torch.no_grad():
        blk(torch.randn(2, 4, 8, 12))
    assert seqs == [torch.Size([2 * 4, 4 * 6, 8])]  # (B * ph * pw) sequences of (H/ph * W/pw) tokens


# ---- mask token --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_mask_token_fills_hidden_stem_cells(name):
    m = build(name)
    x = torch.randn(2, 3, *m.default_size)
    mask = masking.random_mask(2, m.mask_grid(m.default_size), 0.5, generator=torch.Generator().manual_seed(0))
    stem = to_channels_last(m.apply_mask(m.stem(x), mask))  # (B, h0, w0, C0)
    factor = stem.shape[1] // mask.shape[1]
    hidden = masking.upsample_mask(mask, factor)
    assert torch.equal(stem[hidden], m.mask_token.expand(int(hidden.sum()), -1))
    assert not torch.equal(stem[~hidden], m.mask_token.expand(int((~hidden).sum()), -1))
