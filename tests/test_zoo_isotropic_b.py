"""Paper details of ATS-ViT, Patch Merger, the small-dataset ViT (SPT, LSA), Parallel ViT, the
learnable-memory Adapter, NaViT packing and the timm wrapper."""

from __future__ import annotations

import pytest
import timm
import torch

import ssl_vit
from backbones import LSA, SPT, Adapter, ATSViT, MemoryViT, NaViT, ParallelViT, PatchMerger, SmallDatasetViT, ViT
from backbones.small_dataset_vit import diagonal_shifts
from ssl_vit import masking

TINY = dict(dim=64, heads=2, dim_head=32, mlp_dim=128)


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- ViT for small datasets -------------------------------------------------------------------
def test_spt_shifts_half_a_patch_diagonally():
    spt = SPT(dim=16, patch_size=8, channels=1)
    assert spt.shift == (4, 4)
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 12, 12] = 1.0
    stacked = diagonal_shifts(x, spt.shift)
    spots = {tuple(torch.nonzero(stacked[0, c]).flatten().tolist()) for c in range(1, 5)}
    assert spots == {(8, 8), (8, 16), (16, 8), (16, 16)}
    # A pixel in cell (1, 1) reaches exactly its diagonal neighbours' tokens (1 px shifts would not).
    y = x.clone()
    y[0, 0, 12, 12] = 5.0
    with torch.no_grad():
        changed = (spt(x) - spt(y)).abs().sum(-1).view(4, 4) > 1e-6
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:3, 1:3] = True
    assert torch.equal(changed, expected)


def test_lsa_masks_the_diagonal_and_learns_its_temperature():
    torch.manual_seed(0)
    lsa = LSA(32, heads=2, dim_head=16).eval()
    assert torch.allclose(lsa.temperature.exp(), torch.tensor(16 ** -0.5))
    x = images(2, 9, 32)
    fused = lsa(x)
    lsa.record = True
    explicit = lsa(x)
    weights = lsa.last_attention
    assert weights.shape == (2, 2, 9, 9)
    assert torch.all(weights.diagonal(dim1=-2, dim2=-1) == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 9))
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)
    lsa.record = False
    lsa(x).square().mean().backward()
    assert lsa.temperature.grad is not None and lsa.temperature.grad.abs() > 0


def test_small_dataset_vit_hidden_cells_do_not_leak_through_the_shifts():
    torch.manual_seed(0)
    m = SmallDatasetViT(image_size=32, patch_size=8, num_classes=0, depth=1, **TINY).eval()
    x = images(2, 3, 32, 32)
    mask = masking.random_mask(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(1))
    noisy = torch.where(masking.upsample_mask(mask, 8).unsqueeze(1), torch.randn_like(x), x)
    with torch.no_grad():
        a = m.forward_features(x, mask=mask).patch_tokens
        b = m.forward_features(noisy, mask=mask).patch_tokens
    torch.testing.assert_close(a, b)
    assert m(images(2, 3, 24, 40)).shape == (2, 64)  # non-square input


# ---- ATS ----------------------------------------------------------------------------------------
def test_ats_returns_token_ids_and_keeps_fewer_tokens_with_depth():
    torch.manual_seed(0)
    m = ATSViT(image_size=64, patch_size=8, num_classes=5, depth=3, max_tokens_per_depth=(32, 16, 8), **TINY).eval()
    x = images(3, 3, 64, 64)
    with torch.no_grad():
        logits, ids = m(x, return_sampled_token_ids=True)
        again, ids2 = m(x, return_sampled_token_ids=True)
    assert logits.shape == (3, 5)
    assert torch.equal(logits, again) and torch.equal(ids, ids2)  # deterministic sampling in eval
    counts = m.last_num_tokens
    assert counts[0] == 64 and counts[1] <= 32 and counts[2] <= 16
    assert counts[0] > counts[1] > counts[2]
    assert ids.shape[0] == 3 and ids.shape[1] <= 8
    assert bool(((ids >= -1) & (ids < 64)).all())
    for row in ids:  # kept ids are distinct and ascending; padding is -1 at the end
        valid = row[row >= 0]
        assert valid.numel() >= 1 and torch.equal(valid, valid.unique())
        assert torch.all(row[valid.numel():] == -1)
    # The interface still reports every patch token on the grid.
    assert m.forward_features(x).patch_tokens.shape == (3, 64, 64)


def test_ats_rejects_bad_budgets():
    with pytest.raises(ValueError, match="one entry per layer"):
        ATSViT(image_size=32, patch_size=8, num_classes=0, depth=2, max_tokens_per_depth=(8,), **TINY)
    with pytest.raises(ValueError, match="non-increasing"):
        ATSViT(image_size=32, patch_size=8, num_classes=0, depth=2, max_tokens_per_depth=(4, 8), **TINY)


# ---- Patch Merger --------------------------------------------------------------------------------
def test_patch_merger_pools_only_unmasked_tokens():
    torch.manual_seed(0)
    merger = PatchMerger(dim=16, num_tokens_out=3)
    x = images(2, 10, 16)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[:, 6:] = False
    a = merger(x, key_mask=keep)
    b = merger(torch.cat([x[:, :6], torch.randn(2, 4, 16)], dim=1), key_mask=keep)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, merger(x[:, :6]))
    assert a.shape == (2, 3, 16)


# ---- Parallel ViT ---------------------------------------------------------------------------------
def test_parallel_vit_branch_count():
    for branches in (1, 3):
        m = ParallelViT(image_size=32, patch_size=8, num_classes=2, depth=1, num_parallel_branches=branches, **TINY)
        assert len(m.transformer.blocks[0].attns) == branches == len(m.transformer.blocks[0].mlps)
        assert m(images(1, 3, 32, 32)).shape == (1, 2)
    with pytest.raises(ValueError, match="num_parallel_branches"):
        ParallelViT(image_size=32, patch_size=8, num_classes=2, depth=1, num_parallel_branches=0, **TINY)


# ---- Learnable memory -------------------------------------------------------------------------------
def test_adapter_freezes_the_vit_and_leaves_its_outputs_unchanged():
    torch.manual_seed(0)
    v = ViT(image_size=32, patch_size=8, num_classes=10, depth=2, **TINY).eval()
    x = images(2, 3, 32, 32)
    with torch.no_grad():
        base = v.forward_features(x)
        base_logits = v(x)
    adapter = Adapter(vit=v, num_classes=3, num_memories_per_layer=4).eval()
    assert not any(p.requires_grad for p in v.parameters())
    trainable = {n for n, p in adapter.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("vit.") for n in trainable)
    out = adapter.forward_features(x)
    torch.testing.assert_close(out.patch_tokens, base.patch_tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.prefix_tokens[:, 1:], base.prefix_tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v.forward_head(adapter.vit_output(out)), base_logits, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(v(x), base_logits)  # the ViT itself is untouched
    # The memories do reach the task token.
    logits = adapter(x)
    assert logits.shape == (2, 3)
    logits.square().sum().backward()
    assert adapter.memories.grad is not None and adapter.memories.grad.abs().sum() > 0
    assert all(p.grad is None for p in v.parameters())
    # Rebuildable from its recorded arguments (the ViT is recorded by its own arguments).
    assert isinstance(adapter.init_config["vit"], dict)
    rebuilt = MemoryViT(adapter.init_config["vit"], num_memories_per_layer=4, num_classes=3)
    rebuilt.load_state_dict(adapter.state_dict())


# ---- NaViT ------------------------------------------------------------------------------------------
def _navit(**kw):
    torch.manual_seed(0)
    return NaViT(image_size=64, patch_size=8, num_classes=4, depth=2, **{**TINY, **kw}).eval()


def test_navit_packing_equals_one_image_at_a_time():
    v = _navit()
    imgs = [images(3, 64, 64, seed=1), images(3, 32, 32, seed=2), images(3, 32, 64, seed=3),
            images(3, 64, 32, seed=4), images(3, 16, 64, seed=5), images(3, 32, 32, seed=6)]
    with torch.no_grad():
        single = torch.cat([v([img]) for img in imgs])
        one_sequence = v(imgs)
        grouped = v(imgs, group_images=True, group_max_seq_len=80)
        nested = v([imgs[:2], imgs[2:5], imgs[5:]])
    for out in (one_sequence, grouped, nested):
        torch.testing.assert_close(out, single, atol=1e-5, rtol=1e-5)
    # A batch tensor of same-size images gives the same as the packed path.
    same = [images(3, 32, 32, seed=s) for s in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(v(torch.stack(same)), v(same), atol=1e-5, rtol=1e-5)


def test_navit_token_dropout_in_training():
    imgs = [images(3, 32, 32, seed=1), images(3, 16, 24, seed=2)]
    for prob in (None, 0.0, 0.5, lambda h, w: 0.25):
        v = _navit(token_dropout_prob=prob).train()
        out = v(imgs)
        assert out.shape == (2, 4) and torch.isfinite(out).all()
        out.sum().backward()
        assert v(torch.stack([imgs[0], imgs[0]])).shape == (2, 4)
    v = _navit(token_dropout_prob=0.5).train()
    torch.manual_seed(1)
    a = v(imgs)
    torch.manual_seed(2)
    assert not torch.allclose(a, v(imgs))  # dropping is random in training
    v.eval()
    torch.testing.assert_close(v(imgs), v(imgs))  # and off in eval
    with pytest.raises(ValueError, match="token_dropout_prob"):
        _navit(token_dropout_prob=1.5)


def test_navit_input_errors():
    v = _navit()
    with pytest.raises(ssl_vit.InputShapeError, match="3 input channels"):
        v([torch.randn(1, 32, 32)])
    with pytest.raises(ssl_vit.InputShapeError, match="size_multiple=8"):
        v([torch.randn(3, 30, 32)])
    with pytest.raises(ValueError, match="group_max_seq_len"):
        v([torch.randn(3, 64, 64)], group_images=True, group_max_seq_len=10)


# ---- timm wrapper --------------------------------------------------------------------------------------
def _check_against_timm(wrapper, reference, x):
    wrapper.eval()
    reference.eval()
    with torch.no_grad():
        out = wrapper.forward_features(x)
        feats = reference.forward_features(x)
        r = reference.num_prefix_tokens
        torch.testing.assert_close(out.prefix_tokens, feats[:, :r], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.patch_tokens, feats[:, r:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.pooled, reference.forward_head(feats, pre_logits=True), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(wrapper(x), reference(x), atol=1e-5, rtol=1e-4)


def test_timm_wrapper_state_dict_loads_into_timm_and_features_match():
    torch.manual_seed(0)
    wrapper = ssl_vit.create_backbone("timm:vit_tiny_patch16_224", img_size=64, depth=2, num_classes=7)
    assert {ssl_vit.TOKEN_DROP, ssl_vit.MASK_TOKEN} <= wrapper.capabilities
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=7)
    reference.load_state_dict(wrapper.model.state_dict(), strict=True)
    _check_against_timm(wrapper, reference, images(2, 3, 64, 64))
    # At another size the wrapper resamples positions exactly as timm's dynamic_img_size does.
    dynamic = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=7,
                                dynamic_img_size=True)
    dynamic.load_state_dict(wrapper.model.state_dict(), strict=True)
    _check_against_timm(wrapper, dynamic, images(2, 3, 48, 80))


def test_timm_wrapper_registers_and_avg_pool_variants():
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, reg_tokens=2,
                  no_embed_class=True, global_pool="avg", class_token=False)
    wrapper = ssl_vit.create_backbone("timm_vit_tiny", **kwargs)
    assert wrapper.num_prefix_tokens == 2
    reference = timm.models.vision_transformer.VisionTransformer(num_classes=0, mlp_ratio=2.0, **kwargs)
    reference.load_state_dict(wrapper.model.state_dict(), strict=True)
    _check_against_timm(wrapper, reference, images(2, 3, 32, 32))
    with pytest.raises(ValueError, match="only timm VisionTransformer"):
        ssl_vit.create_backbone("timm:resnet18")
    with pytest.raises(ValueError, match="pretrained=False"):
        ssl_vit.create_backbone("timm:vit_tiny_patch16_224", pretrained=True)
