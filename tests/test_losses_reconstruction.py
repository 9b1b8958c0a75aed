"""Loss parity tests (formulas rewritten independently here) and view-pipeline checks."""

from __future__ import annotations

import torch

from objectives.views import IMAGENET_MEAN, IMAGENET_STD, make_views
from ssl_vit import ViewSpec


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
