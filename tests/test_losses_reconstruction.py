"""Loss parity tests (formulas rewritten independently here) and view-pipeline checks."""

from __future__ import annotations

import logging

import pytest
import torch

import ssl_vit
from launch.config import profile_objective_args
from objectives import MAE, MP3, MPP, SimMIM, losses
from objectives.views import IMAGENET_MEAN, IMAGENET_STD, make_views
from ssl_vit import ViewSpec, masking
from ssl_vit.masking import draw_mask

TINY_MAE = profile_objective_args("demo", "mae")  # the demo profile's small decoder


# ---- views -----------------------------------------------------------------------------------------
def test_views_shapes_and_order():
    x = torch.rand(3, 3, 48, 48)
    specs = [ViewSpec("global", 2, (32, 32), color_jitter=0.8, grayscale=0.2, blur=0.5, solarize=0.2),
             ViewSpec("local", 3, (16, 16))]
    views = make_views(x, specs, normalize=(IMAGENET_MEAN, IMAGENET_STD))
    assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 3
    assert all(torch.isfinite(v).all() for v in views)


def test_views_per_sample_parameters_and_generator():
    # identical samples must come out different: the crop is drawn per sample
    x = torch.rand(1, 3, 40, 40).expand(4, -1, -1, -1).contiguous()
    spec = [ViewSpec("v", 1, (24, 24), scale=(0.1, 0.5))]
    (v,) = make_views(x, spec, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(v[0], v[1])
    (again,) = make_views(x, spec, generator=torch.Generator().manual_seed(1))
    assert torch.equal(v, again)


def test_video_views_same_crop_on_every_frame():
    frame = torch.rand(2, 3, 1, 32, 32)
    clips = frame.expand(-1, -1, 8, -1, -1).contiguous()  # every frame identical
    specs = [ViewSpec("clip", 2, (16, 16), scale=(0.2, 0.6), color_jitter=1.0, frames=4)]
    views = make_views(clips, specs)
    assert [tuple(v.shape) for v in views] == [(2, 3, 4, 16, 16)] * 2
    for v in views:
        assert torch.allclose(v, v[:, :, :1].expand_as(v), atol=1e-5)
    # and the frames picked follow a uniform stride
    ramp = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(2, 3, 8, 16, 16).contiguous()
    (picked,) = make_views(ramp, [ViewSpec("p", 1, (16, 16), scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                                           frames=4)])
    steps = picked[:, 0, :, 8, 8].diff(dim=1)
    assert torch.allclose(steps, torch.full_like(steps, 2.0), atol=1e-4)


# ---- helpers -------------------------------------------------------------------------------------
def tiny_vit(image_size: int = 32, patch_size: int = 8) -> ssl_vit.Backbone:
    torch.manual_seed(0)
    return ssl_vit.create_backbone("vit_tiny", image_size=image_size, patch_size=patch_size)


def patch_of(x: torch.Tensor, b: int, i: int, j: int, p: int) -> torch.Tensor:
    """Pixels of patch (i, j) of sample b in (row, column, channel) order, flattened."""
    return x[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)


# ---- MAE -------------------------------------------------------------------------------------------
def test_mae_loss_is_normalised_pixel_mse_on_hidden_patches():
    model = MAE(tiny_vit(), **TINY_MAE)
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(3)
    loss = model([x])
    torch.manual_seed(3)
    pred, mask, _ = model._predict(x)
    total, count = 0.0, 0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                if not mask[b, i, j]:
                    continue
                t = patch_of(x, b, i, j, 8)
                t = (t - t.mean()) / torch.sqrt(t.var(unbiased=True) + 1e-6)
                total += ((pred[b, i * 4 + j] - t) ** 2).mean()
                count += 1
    assert count == 2 * 12  # 75% of 16 cells per sample
    torch.testing.assert_close(loss, total / count)
    # predictions on visible cells do not matter
    noisy = torch.where(mask.flatten(1).unsqueeze(-1), pred, torch.randn_like(pred))
    torch.testing.assert_close(losses.mae_loss(noisy, x, mask, (8, 8)), loss)
    # without norm_pix the raw pixels are the target
    raw = losses.mae_loss(pred, x, mask, (8, 8), norm_pix=False)
    t = torch.stack([torch.stack([patch_of(x, b, i, j, 8) for i in range(4) for j in range(4)]) for b in range(2)])
    want = ((pred - t) ** 2).mean(-1)[mask.flatten(1)].mean()
    torch.testing.assert_close(raw, want)


def test_mae_reconstruct_keeps_visible_patches():
    model = MAE(tiny_vit(), **TINY_MAE).eval()
    x = torch.rand(2, 3, 32, 32)
    masked, recon, mask = model.reconstruct(x)
    pix = mask.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1).expand_as(x)
    torch.testing.assert_close(recon[~pix], x[~pix])
    assert (masked[pix] == 0).all() and torch.equal(masked[~pix], x[~pix])


def test_mae_mask_token_mode_logs(caplog):
    candidates = [n for n in ssl_vit.list_backbones() if n.endswith("_tiny")]
    fallback = None
    for name in candidates:
        b = ssl_vit.create_backbone(name)
        if "mask_token" in b.capabilities and "token_drop" not in b.capabilities and not b.is_video:
            fallback = b
            break
    if fallback is None:
        pytest.skip("no registered backbone with mask_token but without token_drop")
    with caplog.at_level(logging.WARNING, logger="objectives.mae"):
        model = MAE(fallback, **TINY_MAE)
    assert not model.token_drop
    assert any("mask-token mode" in r.getMessage() for r in caplog.records)
    loss = model(torch.rand(2, fallback.in_channels, *fallback.default_size))
    assert torch.isfinite(loss)


def test_mae_decoder_defaults_are_the_papers_and_seed_keywords_win():
    dec = MAE(tiny_vit()).decoder  # He et al. 2021 / official dec512d8b: 8 blocks, 512 wide, 16 heads of 32
    attn = [b.attn for b in dec.blocks.blocks]
    assert len(attn) == 8 and dec.embed.out_features == 512
    assert all((a.heads, a.dim_head, a.inner) == (16, 32, 512) for a in attn)
    seed = MAE(tiny_vit(), masking_ratio=0.75, decoder_dim=64, decoder_depth=2).decoder
    assert len(seed.blocks.blocks) == 2 and seed.embed.out_features == 64
    assert (seed.blocks.blocks[0].attn.heads, seed.blocks.blocks[0].attn.dim_head) == (16, 32)


def test_mae_reconstruct_unnormalises_with_each_patch_statistics():
    model = MAE(tiny_vit(), **TINY_MAE).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(4)
    _, recon, mask = model.reconstruct(x)
    torch.manual_seed(4)
    pred, again, _ = model._predict(x)
    assert torch.equal(mask, again)
    b, i, j = (int(v) for v in mask.nonzero()[0])
    t = patch_of(x, b, i, j, 8)
    want = pred[b, i * 4 + j] * torch.sqrt(t.var(unbiased=True) + 1e-6) + t.mean()
    torch.testing.assert_close(patch_of(recon, b, i, j, 8), want)


# ---- SimMIM ----------------------------------------------------------------------------------------
def test_simmim_l1_normalised_exactly_once():
    x, pred = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = mask[1, 2, 3] = mask[1, 3, 3] = True
    pix = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(x)
    want = (pred[pix] - x[pix]).abs().sum() / pix.sum()  # mean over hidden pixel values
    got = losses.simmim_l1(pred, x, mask)
    torch.testing.assert_close(got, want)
    num_masked = int(mask.sum())
    assert not torch.isclose(got, want / num_masked)  # the seed's second division


def test_simmim_masks_on_32px_cells_and_loss_matches():
    model = SimMIM(tiny_vit(image_size=64, patch_size=8), masking_ratio=0.5)
    mask = model.make_mask(4, (8, 8), torch.device("cpu"))
    blocks = mask.view(4, 2, 4, 2, 4)  # 2x2 masking cells of 4x4 mask cells
    assert (blocks == blocks[:, :, :1, :, :1]).all()
    assert (mask.flatten(1).sum(1) == 32).all()
    # a mask unit that does not divide 32 px: masking at the mask unit
    odd = SimMIM(tiny_vit(image_size=48, patch_size=12))
    assert odd.coarse_factor((4, 4)) == (1, 1)
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(5)
    loss = model([x])
    torch.manual_seed(5)
    mask = model.make_mask(2, (8, 8), x.device)
    out = model.encoder.forward_features(x, mask=mask)
    pred = masking.unpatchify(model.head(out.patch_tokens), (8, 8), (8, 8), 3)
    pix = mask.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1).expand_as(x)
    torch.testing.assert_close(loss, (pred - x).abs()[pix].mean())


def test_simmim_defaults_hide_ceil_of_60_percent_of_32px_cells():
    model = SimMIM(tiny_vit(image_size=64, patch_size=8))
    assert model.masking_ratio == 0.6 and model.mask_patch_size == 32
    mask = model.make_mask(3, (8, 8), torch.device("cpu"))
    # 2x2 masking cells of 32 px: ceil(0.6 * 4) = 3 hidden (the official MaskGenerator), not round() = 2
    assert (mask.view(3, 2, 4, 2, 4).flatten(1).sum(1) == 3 * 16).all()
    assert masking.num_hidden(36, 0.6, "ceil") == 22 and masking.num_hidden(49, 0.6, "ceil") == 30
    assert masking.num_hidden(10, 0.7, "ceil") == 7  # float noise (7.000000000000001) is not rounded up
    assert SimMIM(tiny_vit(), masking_ratio=0.5).masking_ratio == 0.5  # the seed's keyword


# ---- MPP -------------------------------------------------------------------------------------------
def test_mpp_mean_colour_quantisation():
    x = torch.zeros(1, 3, 8, 16)
    x[0, :, :, :8] = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1)  # bins (0, 4, 7)
    x[0, :, :, 8:] = torch.tensor([1.5, -0.2, 0.3]).view(3, 1, 1)  # clamped: (7, 0, 2)
    labels = losses.mean_colour_labels(x, (8, 8), bits=3)
    assert labels.tolist() == [[0 + 4 * 8 + 7 * 64, 7 + 0 * 8 + 2 * 64]]
    assert int(losses.mean_colour_labels(torch.ones(1, 3, 8, 8), (8, 8)).max()) == 511
    # the mean is over the patch: half 0.2, half 0.4 -> 0.3 -> bin 2
    y = torch.full((1, 1, 8, 8), 0.2)
    y[..., 4:] = 0.4
    assert losses.mean_colour_labels(y, (8, 8), bits=3).item() == 2


def test_mpp_corruption_proportions():
    model = MPP(tiny_vit(image_size=64, patch_size=4), patch_size=4, dim=64, mask_prob=0.15,
                random_patch_prob=0.3, replace_prob=0.5)
    torch.manual_seed(0)
    x = torch.rand(64, 3, 64, 64)
    out, replace, corrupted = model.corrupt(x, (16, 16))
    assert (corrupted.flatten(1).sum(1) == round(0.15 * 256)).all()
    assert not (replace & ~corrupted).any()
    changed = (out != x).view(64, 3, 16, 4, 16, 4).any(dim=(1, 3, 5))
    assert not (changed & ~corrupted).any()  # only corrupted cells change
    assert not (changed & replace).any()  # mask-token cells keep their pixels (the backbone swaps them)
    n = corrupted.sum().item()
    assert abs(replace.sum().item() / n - 0.5) < 0.05
    assert abs(changed.sum().item() / n - 0.3) < 0.05
    assert abs((corrupted & ~replace & ~changed).sum().item() / n - 0.2) < 0.05


def test_mpp_default_corruption_is_the_papers(monkeypatch):
    # ViT paper App. B.1.2: 50 % of the patches; of those 80 % mask token, 10 % another patch, 10 % kept
    model = MPP(tiny_vit(image_size=64, patch_size=4))
    assert (model.mask_prob, model.replace_prob, model.random_patch_prob) == (0.5, 0.8, 0.1)
    torch.manual_seed(1)
    x = torch.rand(32, 3, 64, 64)
    out, replace, corrupted = model.corrupt(x, (16, 16))
    assert (corrupted.flatten(1).sum(1) == 128).all()
    changed = (out != x).view(32, 3, 16, 4, 16, 4).any(dim=(1, 3, 5))
    assert not (changed & ~corrupted).any() and not (changed & replace).any()
    n = corrupted.sum().item()
    assert abs(replace.sum().item() / n - 0.8) < 0.03
    assert abs(changed.sum().item() / n - 0.1) < 0.02
    assert abs((corrupted & ~replace & ~changed).sum().item() / n - 0.1) < 0.02
    # the loss covers every corrupted cell, swapped and kept ones included
    captured = {}
    real = losses.masked_cross_entropy

    def spy(logits, labels, mask):
        captured["mask"] = mask
        return real(logits, labels, mask)

    monkeypatch.setattr("objectives.mpp.masked_cross_entropy", spy)
    torch.manual_seed(2)
    model([x[:4]])
    torch.manual_seed(2)
    _, _, want = model.corrupt(x[:4], (16, 16))
    assert torch.equal(captured["mask"], want)


def test_mpp_labels_undo_the_launchers_normalisation():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model = MPP(tiny_vit())
    model.set_input_normalization(mean, std)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    whole = ViewSpec("v", 1, (32, 32), scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    (view,) = make_views(images, [whole], normalize=(mean, std))  # what the launcher hands over
    assert view.min() < 0  # really normalised
    raw = images.float() / 255
    want = losses.mean_colour_labels(raw, (8, 8), bits=3)
    assert torch.equal(model.labels(view), want)
    # without the normalisation the labels would be wrong, so this test can fail
    assert not torch.equal(MPP(tiny_vit()).labels(view), want)
    # the seed's mean/std keywords say the same thing for standalone calls
    seeded = MPP(tiny_vit(), mean=mean, std=std)
    assert torch.equal(seeded.labels(view), want)
    with pytest.raises(ssl_vit.BadArgument, match="input channels"):
        model.set_input_normalization((0.5,), (0.5,))


def test_mpp_cross_entropy_on_corrupted_only():
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    want = sum(-logits[b, i].log_softmax(-1)[labels[b, i]] for b in range(2) for i in range(5) if mask[b, i]) / 3
    torch.testing.assert_close(losses.masked_cross_entropy(logits, labels, mask), want)


def test_mpp_rejects_mismatched_arguments():
    with pytest.raises(ValueError, match="patch_size"):
        MPP(tiny_vit(), patch_size=16, dim=64)
    with pytest.raises(ValueError, match="sum to at most 1"):
        MPP(tiny_vit(), replace_prob=0.8, random_patch_prob=0.5)


# ---- MP3 -------------------------------------------------------------------------------------------
def test_mp3_position_labels_and_loss():
    assert losses.position_labels(2, 4).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    model = MP3(tiny_vit(), masking_ratio=0.75)
    assert model.num_positions == 16
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(7)
    loss = model([x])
    torch.manual_seed(7)
    mask = draw_mask(2, (4, 4), 0.75, x.device, tube=False)
    out = model.vit.forward_features(x, use_pos=False, kv_mask=mask)
    logits = model.mlp_head(out.patch_tokens)
    want = sum(-logits[b, i].log_softmax(-1)[i] for b in range(2) for i in range(16)) / 32
    torch.testing.assert_close(loss, want)


def test_mp3_needs_pos_free():
    names = [n for n in ssl_vit.list_backbones() if n.endswith("_tiny")]
    for name in names:
        b = ssl_vit.create_backbone(name)
        if "pos_free" not in b.capabilities:
            with pytest.raises(ssl_vit.IncompatibleBackbone, match="pos_free"):
                MP3(b)
            return
    pytest.skip("every registered backbone is pos_free")
