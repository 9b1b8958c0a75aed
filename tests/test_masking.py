"""Mask utilities: exact counts, round trips, and gathers/scatters against index arithmetic."""

from __future__ import annotations

import pytest
import torch

import ssl_vit
from ssl_vit import masking


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.75])
def test_random_mask_hides_exactly_round_ratio(ratio):
    m = masking.random_mask(5, (6, 4), ratio, generator=torch.Generator().manual_seed(0))
    assert m.shape == (5, 6, 4) and m.dtype == torch.bool
    assert (m.flatten(1).sum(1) == round(24 * ratio)).all()


def test_random_mask_differs_per_sample_and_is_seeded():
    a = masking.random_mask(8, (8, 8), 0.5, generator=torch.Generator().manual_seed(1))
    b = masking.random_mask(8, (8, 8), 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert len({tuple(row.tolist()) for row in a.flatten(1)}) > 1


def test_block_mask_counts_and_contiguity():
    g = torch.Generator().manual_seed(0)
    m = masking.block_mask(16, (14, 14), 0.4, generator=g)
    assert (m.flatten(1).sum(1) == round(196 * 0.4)).all()
    # Blocks are contiguous: hidden cells have far more hidden neighbours than a uniform mask's.
    u = masking.random_mask(16, (14, 14), 0.4, generator=g)

    def neighbour_agreement(x):
        x = x.float()
        return ((x[:, 1:] * x[:, :-1]).mean() + (x[:, :, 1:] * x[:, :, :-1]).mean()).item()

    assert neighbour_agreement(m) > 1.3 * neighbour_agreement(u)


def test_tube_mask_repeats_over_time():
    m = masking.tube_mask(3, (4, 5, 5), 0.6)
    assert m.shape == (3, 4, 5, 5)
    assert (m == m[:, :1]).all()
    assert (m[:, 0].flatten(1).sum(1) == 15).all()


def test_mask_keep_round_trip():
    m = masking.random_mask(4, (5, 6), 0.5)
    keep = masking.mask_to_keep(m)
    assert keep.shape == (4, 15)
    assert (keep[:, 1:] > keep[:, :-1]).all(), "keep is ascending"
    assert not m.flatten(1).gather(1, keep).any(), "keep holds visible cells only"
    assert torch.equal(masking.keep_to_mask(keep, (5, 6)), m)


@pytest.mark.parametrize("grid, ratio, tube, rounding", [
    ((8, 8), 0.75, True, "nearest"), ((5, 6), 0.6, True, "ceil"), ((2, 4, 4), 0.9, True, "nearest"),
    ((2, 4, 4), 0.5, False, "nearest"), ((3, 1, 1), 0.5, True, "nearest")])
def test_drawn_hidden_is_what_draw_mask_hides(grid, ratio, tube, rounding):
    """The count is known without reading the mask; mask_to_keep given it gives what it finds itself."""
    m = masking.draw_mask(3, grid, ratio, tube=tube, rounding=rounding, generator=torch.Generator().manual_seed(0))
    hidden = masking.drawn_hidden(grid, ratio, tube, rounding)
    assert m.flatten(1).sum(1).tolist() == [hidden] * 3
    n = m[0].numel()
    assert torch.equal(masking.mask_to_keep(m, n - hidden), masking.mask_to_keep(m))
    assert torch.equal(masking.mask_to_keep(~m, hidden), masking.mask_to_keep(~m))


def test_mask_to_keep_refuses_ragged_masks():
    m = torch.zeros(2, 2, 2, dtype=torch.bool)
    m[0, 0, 0] = True
    with pytest.raises(ValueError, match="same number"):
        masking.mask_to_keep(m)


def test_gather_scatter_match_indexing():
    x = torch.randn(3, 10, 4)
    idx = torch.stack([torch.randperm(10)[:6] for _ in range(3)])
    got = masking.gather_tokens(x, idx)
    for b in range(3):
        assert torch.equal(got[b], x[b, idx[b]])
    fill = torch.full((4,), -7.0)
    back = masking.scatter_tokens(got, idx, 10, fill)
    for b in range(3):
        assert torch.equal(back[b, idx[b]], x[b, idx[b]])
        rest = torch.ones(10, dtype=torch.bool)
        rest[idx[b]] = False
        assert (back[b, rest] == -7.0).all()


def test_replace_masked_and_hide_pixels():
    x = torch.randn(2, 4, 3)
    m = torch.tensor([[True, False], [False, False], [True, True], [False, True]]).view(2, 2, 2)
    tok = torch.tensor([9.0, 9.0, 9.0])
    y = masking.replace_masked(x, m, tok)
    assert torch.equal(y[m.flatten(1)], tok.expand(int(m.sum()), 3))
    assert torch.equal(y[~m.flatten(1)], x[~m.flatten(1)])
    img = torch.ones(2, 3, 8, 8)
    hidden = masking.hide_pixels(img, m)
    assert hidden[0, :, :4, :4].abs().sum() == 0 and (hidden[0, :, :4, 4:] == 1).all()


@pytest.mark.parametrize("patch", [4, (4, 2)])
def test_patchify_round_trip_and_layout(patch):
    img = torch.randn(2, 3, 8, 8)
    p = masking.patchify(img, patch)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    assert p.shape == (2, (8 // ph) * (8 // pw), ph * pw * 3)
    # First patch holds the top-left block, channels last within a pixel.
    assert torch.equal(p[0, 0, :3], img[0, :, 0, 0])
    assert torch.equal(masking.unpatchify(p, patch, (8 // ph, 8 // pw), 3), img)


def test_patchify_video_round_trip():
    vid = torch.randn(2, 3, 4, 8, 8)
    p = masking.patchify(vid, (2, 4, 4))
    assert p.shape == (2, 2 * 2 * 2, 2 * 4 * 4 * 3)
    assert torch.equal(masking.unpatchify(p, (2, 4, 4), (2, 2, 2), 3), vid)


def test_upsample_mask():
    m = torch.tensor([[[True, False]]])
    up = masking.upsample_mask(m, 2)
    assert up.shape == (1, 2, 4)
    assert up[0, :, :2].all() and not up[0, :, 2:].any()


def test_draw_mask_counts_rounding_and_limits():
    g = torch.Generator().manual_seed(0)
    m = masking.draw_mask(6, (4, 4), 0.75, generator=g)
    assert m.shape == (6, 4, 4) and (m.flatten(1).sum(1) == 12).all()
    # at least one cell hidden and one visible, whatever the ratio
    assert (masking.draw_mask(3, (2, 2), 0.01).flatten(1).sum(1) == 1).all()
    assert (masking.draw_mask(3, (2, 2), 0.99).flatten(1).sum(1) == 3).all()
    # SimMIM rounds up: 0.5 of 5 cells is 2 with round() (to even), 3 with ceil
    assert (masking.draw_mask(4, (1, 5), 0.5).flatten(1).sum(1) == 2).all()
    assert (masking.draw_mask(4, (1, 5), 0.5, rounding="ceil").flatten(1).sum(1) == 3).all()
    with pytest.raises(ssl_vit.InputShapeError, match="at least 2 cells"):
        masking.draw_mask(2, (1, 1), 0.5)
    with pytest.raises(ValueError, match="rounding"):
        masking.draw_mask(2, (2, 2), 0.5, rounding="floor")
    with pytest.raises(ValueError, match="ratio"):
        masking.draw_mask(2, (2, 2), 1.0)


def test_draw_mask_draws_what_random_and_tube_masks_draw():
    # the same random numbers as random_mask / tube_mask for the same count: seeded runs reproduce
    a = masking.draw_mask(5, (6, 4), 0.25, generator=torch.Generator().manual_seed(3))
    b = masking.random_mask(5, (6, 4), 0.25, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    tube = masking.draw_mask(3, (4, 5, 5), 0.6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(tube, masking.tube_mask(3, (4, 5, 5), 0.6, generator=torch.Generator().manual_seed(4)))
    assert (tube == tube[:, :1]).all() and (tube[:, 0].flatten(1).sum(1) == 15).all()
    flat = masking.draw_mask(3, (4, 5, 5), 0.6, tube=False)
    assert (flat.flatten(1).sum(1) == 60).all() and not (flat == flat[:, :1]).all()
    # one spatial cell per frame: nothing to hide in a tube
    assert not masking.draw_mask(2, (4, 1, 1), 0.9).any()
