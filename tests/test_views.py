"""objectives.views: crops inside the valid box, the batched antialiased resampling, photometric ops against
torchvision's formulas, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from objectives.views import _colour_jitter, make_views, resized_crops, sample_crops
from ssl_vit import InputShapeError, ViewSpec

PLAIN = dict(hflip=0.0, color_jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0)


def test_resampling_matches_interpolate_antialias_and_flips():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 30)
    crops = torch.tensor([[[3.0, 5.0, 27.0, 38.0], [0.0, 0.0, 30.0, 40.0]]])  # (K=1, B=2, 4)
    for size in [(16, 12), (64, 48), (33, 24)]:  # down (antialiased), up, odd
        out = resized_crops(x, crops, size)
        for b in range(2):
            x0, y0, x1, y1 = crops[0, b].int().tolist()
            want = F.interpolate(x[b:b + 1, :, y0:y1, x0:x1], size=size, mode="bicubic", antialias=True)
            torch.testing.assert_close(out[0, b], want[0], rtol=0, atol=1e-5)
    flipped = resized_crops(x, crops, (16, 12), torch.tensor([[True, False]]))
    torch.testing.assert_close(flipped[0, 0], resized_crops(x, crops, (16, 12))[0, 0].flip(-1))
    assert torch.equal(resized_crops(x, crops[:, 1:2].expand(1, 2, 4), (40, 30))[0], x)  # identity crop


def test_crops_cover_a_wide_image_and_never_touch_padding():
    """A 32 x 10 image top-left on a 32 x 32 canvas padded with 9.0: crops reach both ends of it, and no
    output pixel sees the padding."""
    b = 64
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(b, 3, 10, 32)
    canvas = torch.full((b, 3, 32, 32), 9.0)
    canvas[:, :, :10] = ramp
    boxes = torch.tensor([[0.0, 0.0, 32.0, 10.0]]).expand(b, 4)
    crops = sample_crops(boxes, 8, (0.05, 0.4), (3 / 4, 4 / 3), generator=torch.Generator().manual_seed(0))
    assert crops.shape == (8, b, 4)
    assert (crops[..., 0] >= 0).all() and (crops[..., 2] <= 32).all() and (crops[..., 3] <= 10).all()
    assert crops[..., 0].min() == 0 and crops[..., 2].max() == 32  # both ends are reached
    views = make_views(canvas, [ViewSpec("local", 8, (16, 16), scale=(0.05, 0.4), color_jitter=0.8, blur=0.5)],
                       boxes=boxes, generator=torch.Generator().manual_seed(1))
    stacked = torch.stack(views)
    assert stacked.max() <= 1.05 and stacked.min() >= -0.05  # bicubic over a ramp, never 9.0
    assert stacked[..., 0].min() < 0.05 and stacked[..., -1].max() > 0.95
    unboxed = torch.stack(make_views(canvas, [ViewSpec("g", 4, (16, 16), **PLAIN)]))
    assert unboxed.max() > 5  # without boxes the whole canvas is the image


def test_scale_and_ratio_are_relative_to_the_box():
    boxes = torch.tensor([[4.0, 2.0, 36.0, 18.0], [0.0, 0.0, 20.0, 20.0]])  # 32 x 16 and 20 x 20
    crops = sample_crops(boxes, 5, (0.25, 0.25), (1.0, 1.0))
    size = crops[..., 2:] - crops[..., :2]
    assert size[:, 0].eq(11).all() and size[:, 1].eq(10).all()  # sqrt(0.25 * area), rounded
    assert (crops[:, 0, 0] >= 4).all() and (crops[:, 0, 3] <= 18).all()
    whole = sample_crops(boxes, 3, (1.0, 1.0), (1.0, 1.0))  # does not fit: torchvision's fallback
    assert whole[:, 0].tolist() == [[12.0, 2.0, 28.0, 18.0]] * 3 and whole[:, 1].tolist() == [[0, 0, 20, 20]] * 3


def test_colour_jitter_matches_torchvision():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 8, 8)
    spec = ViewSpec("v", 1, (8, 8), color_jitter=0.8, jitter=(0.4, 0.4, 0.2, 0.1))
    u = torch.tensor([[0.0, 0.9, 0.1, 0.7, 0.2], [0.0, 0.3, 0.8, 0.1, 0.95], [0.99, 0.5, 0.5, 0.5, 0.5]])
    order = [2, 0, 3, 1]
    got = _colour_jitter(x, spec, u, order)
    for n in range(2):
        factors = [0.6 + 0.8 * u[n, 1], 0.6 + 0.8 * u[n, 2], 0.8 + 0.4 * u[n, 3], 0.1 * (2 * u[n, 4] - 1)]
        want = x[n]
        for op in order:
            fn = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op]
            want = fn(want, float(factors[op]))
        torch.testing.assert_close(got[n], want, rtol=0, atol=1e-5)
    assert torch.equal(got[2], x[2])  # not drawn (u >= p): untouched


def test_photometric_ops():
    x = torch.rand(4, 3, 24, 24)
    (grey,) = make_views(x, [ViewSpec("g", 1, (24, 24), **{**PLAIN, "grayscale": 1.0})])
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    (solar,) = make_views(torch.full((2, 3, 8, 8), 0.75), [ViewSpec("s", 1, (8, 8), **{**PLAIN, "solarize": 1.0})])
    torch.testing.assert_close(solar, torch.full_like(solar, 0.25))
    spec = ViewSpec("b", 1, (24, 24), scale=(1.0, 1.0), ratio=(1.0, 1.0), **PLAIN)
    g = torch.Generator()
    (sharp,) = make_views(x, [spec], generator=g.manual_seed(0))
    (blurred,) = make_views(x, [dataclass_replace(spec, blur=1.0)], generator=g.manual_seed(0))
    assert torch.allclose(sharp, x, atol=1e-6)  # the whole image at its size: unchanged
    assert blurred.diff(dim=-1).abs().mean() < 0.8 * sharp.diff(dim=-1).abs().mean()
    assert torch.allclose(blurred.mean((-2, -1)), sharp.mean((-2, -1)), atol=0.02)


def dataclass_replace(spec: ViewSpec, **changes) -> ViewSpec:
    import dataclasses

    return dataclasses.replace(spec, **changes)


def test_views_are_per_sample_reproducible_and_on_uint8():
    x = torch.rand(1, 3, 40, 40).expand(6, -1, -1, -1).contiguous()
    specs = [ViewSpec("g", 2, (24, 24), color_jitter=0.8, grayscale=0.2, blur=0.5, solarize=0.2),
             ViewSpec("l", 3, (12, 12), scale=(0.05, 0.4))]
    a = make_views(x, specs, generator=torch.Generator().manual_seed(3))
    b = make_views(x, specs, generator=torch.Generator().manual_seed(3))
    c = make_views(x, specs, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and not torch.equal(a[0], c[0])
    assert not torch.allclose(a[0][0], a[0][1]) and not torch.equal(a[2], a[3])  # per sample, per crop
    torch.manual_seed(5)
    d = make_views(x, specs)
    torch.manual_seed(5)
    assert all(torch.equal(p, q) for p, q in zip(d, make_views(x, specs)))  # the global RNG without one
    u8 = make_views((x * 255).to(torch.uint8), specs, normalize=((0.5,) * 3, (0.25,) * 3))
    assert all(v.dtype == torch.float32 and v.min() >= -2.0 - 1e-5 and v.max() <= 2.0 + 1e-5 for v in u8)


def test_video_boxes_and_bad_boxes():
    frame = torch.rand(2, 3, 1, 32, 32)
    clips = frame.expand(-1, -1, 6, -1, -1).contiguous()
    boxes = torch.tensor([[0.0, 0.0, 32.0, 12.0], [0.0, 0.0, 20.0, 32.0]])
    clips[0, :, :, 12:] = 9.0
    clips[1, :, :, :, 20:] = 9.0
    (view,) = make_views(clips, [ViewSpec("c", 1, (16, 16), color_jitter=1.0, frames=3)], boxes=boxes)
    assert view.shape == (2, 3, 3, 16, 16) and view.max() <= 1.05
    assert torch.allclose(view, view[:, :, :1].expand_as(view), atol=1e-5)
    with pytest.raises(InputShapeError, match="boxes"):
        make_views(clips, [ViewSpec("c", 1, (16, 16))], boxes=boxes[:1])
