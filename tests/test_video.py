"""Video backbones: tubelet grids, ViViT's frame mask and variants, dropout off in eval."""

from __future__ import annotations

import pytest
import torch

import ssl_vit
from backbones import SimpleViT3D, ViT3D, ViViT
from ssl_vit import masking

TINY = dict(image_size=32, frames=4, image_patch_size=8, frame_patch_size=2, num_classes=5, dim=32, heads=2,
            dim_head=16, mlp_dim=64)


def test_tubelet_grid_and_capability():
    for cls in (ViT3D, SimpleViT3D):
        m = cls(**TINY, depth=1)
        assert ssl_vit.VIDEO in m.capabilities
        out = m.forward_features(torch.randn(2, 3, 4, 32, 48))
        assert out.grid == (2, 4, 6) and out.patch_tokens.shape == (2, 48, 32)


def test_image_input_to_video_model_is_refused():
    m = ViT3D(**TINY, depth=1)
    with pytest.raises(ssl_vit.InputShapeError, match=r"5-D batch \(B, C, T, H, W\)"):
        m(torch.randn(2, 3, 32, 32))
    with pytest.raises(ssl_vit.InputShapeError, match="frames"):
        m(torch.randn(2, 3, 3, 32, 32))


def test_tube_mask_runs_through_keep():
    m = ViT3D(**TINY, depth=1).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    mask = masking.tube_mask(2, m.mask_grid(x.shape[2:]), 0.75)
    keep = masking.mask_to_keep(mask)
    out = m.forward_features(x, keep=keep)
    assert out.patch_tokens.shape == (2, 2 * 4, 32)


@pytest.mark.parametrize("variant", ["factorized_encoder", "factorized_self_attention"])
def test_vivit_frame_mask_removes_missing_frames(variant):
    torch.manual_seed(0)
    m = ViViT(**TINY, spatial_depth=1, temporal_depth=1, variant=variant).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    present = torch.tensor([[True, True, False, False], [True, True, True, True]])
    with torch.no_grad():
        full = m(x)
        masked = m(x, mask=present)
        y = x.clone()
        y[0, :, 2:] = torch.randn_like(y[0, :, 2:])  # change only the missing frames of sample 0
        masked_changed = m(y, mask=present)
    assert torch.allclose(full[1], masked[1], atol=1e-5), "a fully present clip is unaffected"
    assert not torch.allclose(full[0], masked[0], atol=1e-4)
    if variant == "factorized_encoder":  # missing frames then cannot reach the class token at all
        torch.testing.assert_close(masked_changed[0], masked[0], atol=1e-5, rtol=1e-4)


def test_vivit_dropout_off_in_eval_and_variant_checks():
    m = ViViT(**TINY, spatial_depth=1, temporal_depth=1, dropout=0.5, emb_dropout=0.5).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    assert torch.equal(m(x), m(x))
    with pytest.raises(ValueError, match="variant"):
        ViViT(**TINY, spatial_depth=1, temporal_depth=1, variant="joint")
    with pytest.raises(ValueError, match="spatial_depth == temporal_depth"):
        ViViT(**TINY, spatial_depth=1, temporal_depth=2, variant="factorized_self_attention")
