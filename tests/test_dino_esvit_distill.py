"""DINO, EsViT and distillation: loss parity against formulas written out here, schedules, teacher
handling and views.

The reference formulas below follow the papers' pseudo-code (DINO Alg. 1 with multi-crop, EsViT's
region matching, DeiT's soft/hard distillation) as explicit loops, independent of the vectorised
implementations they check.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssl_vit
from backbones import ViT
from launch.config import profile_objective_args
from objectives import Dino, DistillWrapper, EsViTTrainer
from objectives import esvit as esvit_module
from objectives.dino import dino_loss, dino_view_specs, effective_rank, teacher_collapse_stats, view_agreement
from objectives.ema import cosine_schedule, ema_update_, run_scaled_momentum
from objectives.views import make_views

# The demo profile's objective settings (configs/profiles/demo/<objective>.yaml).
DEMO_DINO = profile_objective_args("demo", "dino")
DEMO_ESVIT = profile_objective_args("demo", "esvit")
# The demo's small head with DINO's own recipe otherwise, and two local crops to keep the tests fast.
TINY = {k: DEMO_DINO[k] for k in ("image_size", "num_classes_K", "projection_hidden_size",
                                  "bottleneck_dim")} | {"num_local_crops": 2}


def tiny_vit(**kw) -> ViT:
    torch.manual_seed(0)
    return ssl_vit.create_backbone("vit_tiny", **kw)


def images(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- reference formulas --------------------------------------------------------------------------
def ref_dino(student: list[torch.Tensor], teacher: list[torch.Tensor], center, ts: float, tt: float) -> torch.Tensor:
    """student: V tensors (B, K); teacher: G tensors (B, K); pairs with the same view index skipped."""
    total, terms = 0.0, 0
    for i, t in enumerate(teacher):
        q = torch.softmax((t - center) / tt, dim=-1)
        for v, s in enumerate(student):
            if v == i:
                continue
            total = total + (-(q * torch.log_softmax(s / ts, dim=-1)).sum(-1)).mean()
            terms += 1
    return total / terms


def ref_region(s_logits, s_feats, t_logits, t_feats, center, ts: float, tt: float) -> torch.Tensor:
    """EsViT region loss: lists per view of (B, T, K) logits and (B, T, D) backbone tokens."""
    total, terms = 0.0, 0
    for i in range(len(t_logits)):
        q = torch.softmax((t_logits[i] - center) / tt, dim=-1)
        for v in range(len(s_logits)):
            if v == i:
                continue
            per_sample = []
            for b in range(s_logits[v].shape[0]):
                sim = F.normalize(s_feats[v][b], dim=-1) @ F.normalize(t_feats[i][b], dim=-1).T  # (Ts, Tt)
                j = sim.argmax(dim=1)
                ce = -(q[b][j] * torch.log_softmax(s_logits[v][b] / ts, dim=-1)).sum(-1)
                per_sample.append(ce.mean())
            total = total + torch.stack(per_sample).mean()
            terms += 1
    return total / terms


# ---- DINO --------------------------------------------------------------------------------------
def test_dino_loss_matches_pairwise_formula():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 3, 11, generator=g)
    t = torch.randn(2, 3, 11, generator=g)
    c = torch.randn(11, generator=g)
    got = dino_loss(s, t, c, 0.1, 0.04)
    want = ref_dino(list(s), list(t), c, 0.1, 0.04)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dino_objective_matches_formula_on_backbone_outputs():
    d = Dino(tiny_vit(), **TINY).eval()  # eval: the centre stays put
    d.center.normal_()
    x = images(3)
    views = make_views(x, d.view_specs(), generator=torch.Generator().manual_seed(0))
    loss = d(views)
    with torch.no_grad():
        s = [d.head(d.backbone.forward_features(v).pooled) for v in views]
        t = [d.teacher["head"](d.teacher_backbone.forward_features(v).pooled) for v in views[:2]]
    torch.testing.assert_close(loss, ref_dino(s, t, d.center, d.student_temp, d.teacher_temp), rtol=1e-4, atol=1e-5)


def test_dino_defaults_and_seed_arguments():
    d = Dino(tiny_vit(image_size=224, patch_size=16), num_classes_K=64, projection_hidden_size=32)
    assert d.global_size == (224, 224) and d.local_size == (96, 96)
    assert d.student_temp == 0.1 and d.teacher_temp == 0.04 and d.base_momentum == 0.996
    assert d.teacher_temp_final == 0.04 and d.center_momentum == 0.9 and d.ema_time_fraction == 0.1
    assert d.collapse_loss() == pytest.approx(math.log(64))
    specs = d.view_specs()
    assert [s.count for s in specs] == [1, 1, 10]
    assert specs[0].scale == (0.4, 1.0) and specs[2].scale == (0.05, 0.4)
    assert (specs[0].blur, specs[1].blur, specs[2].blur) == (1.0, 0.1, 0.5)
    assert (specs[0].solarize, specs[1].solarize, specs[2].solarize) == (0.0, 0.2, 0.0)
    # the seed's values are taken as given; projection_layers=4 is a 3-layer MLP + prototypes
    seed = Dino(tiny_vit(), image_size=32, num_classes_K=65336, student_temp=0.9, projection_hidden_size=16,
                projection_layers=4, global_lower_crop_scale=0.5)
    assert seed.student_temp == 0.9 and seed.head.last_layer.weight.shape == (65336, 256)
    assert sum(isinstance(m, nn.Linear) for m in seed.head.mlp) == 3
    assert seed.view_specs()[0].scale == (0.5, 1.0)


def test_local_size_rounds_to_backbone_multiple():
    # 256 * 96 / 224 = 109.7 px: 112 with 16 px patches, 96 with 32 px patches
    d16 = Dino(tiny_vit(image_size=64, patch_size=16), **{**TINY, "image_size": 256})
    d32 = Dino(tiny_vit(image_size=64, patch_size=32), **{**TINY, "image_size": 256})
    assert d16.local_size == (112, 112) and d32.local_size == (96, 96)
    with pytest.raises(ssl_vit.InputShapeError):
        Dino(tiny_vit(image_size=64, patch_size=32), **{**TINY, "image_size": 100})


def test_views_local_size_and_per_sample_parameters():
    d = Dino(tiny_vit(), **TINY)
    one = images(1, 48)
    same = one.expand(4, -1, -1, -1).contiguous()  # four copies of one image
    views = d.make_own_views(same)
    assert len(views) == 2 + d.num_local_crops
    assert all(v.shape == (4, 3, *d.global_size) for v in views[:2])
    assert all(v.shape == (4, 3, *d.local_size) for v in views[2:])
    for v in views:  # shared parameters would give four identical crops
        assert not torch.allclose(v[0], v[1]) or not torch.allclose(v[0], v[2])


def test_ema_schedule_is_cosine_from_0996_to_1():
    d = Dino(tiny_vit(), **TINY)
    total = 10001  # long enough for DINO's own 0.996
    assert d.momentum_at(0, total) == pytest.approx(0.996)
    assert d.momentum_at(total - 1, total) == pytest.approx(1.0)
    assert d.momentum_at(5000, total) == pytest.approx(0.998)
    t = 2000 / (total - 1)
    assert d.momentum_at(2000, total) == pytest.approx(1 - 0.004 * (math.cos(math.pi * t) + 1) / 2)
    assert cosine_schedule(5, 1, 0.996, 1.0) == 1.0


def test_short_runs_start_the_teacher_momentum_lower():
    # the EMA time constant 1 / (1 - m0) is at most a tenth of the run; DINO's 0.996 from 2500 steps on
    assert run_scaled_momentum(0.996, 2500, 0.1) == pytest.approx(0.996)
    assert run_scaled_momentum(0.996, 125_000, 0.1) == pytest.approx(0.996)
    assert run_scaled_momentum(0.996, 300, 0.1) == pytest.approx(1 - 1 / 30)
    assert run_scaled_momentum(0.996, 68, 0.1) == pytest.approx(1 - 1 / 6.8)
    assert run_scaled_momentum(0.996, 5, 0.1) == 0.0 and run_scaled_momentum(0.996, 68, None) == 0.996
    d = Dino(tiny_vit(), **TINY)
    assert d.momentum_at(0, 300) == pytest.approx(1 - 1 / 30) and d.momentum_at(299, 300) == pytest.approx(1.0)
    fixed = Dino(tiny_vit(), **TINY, ema_time_fraction=None)
    assert fixed.momentum_at(0, 300) == pytest.approx(0.996)


def test_teacher_temperature_warmup():
    assert Dino(tiny_vit(), **TINY).teacher_temp_at(50, 100) == pytest.approx(0.04)  # default: 0.04 throughout
    d = Dino(tiny_vit(), **TINY, teacher_temp_final=0.07, warmup_teacher_temp_steps=10)
    assert d.teacher_temp == pytest.approx(0.04)
    assert d.teacher_temp_at(5, 100) == pytest.approx(0.055)
    assert d.teacher_temp_at(10, 100) == pytest.approx(0.07)
    assert d.teacher_temp_at(50, 100) == pytest.approx(0.07)
    d.on_step_end(4, 100)
    assert d.teacher_temp == pytest.approx(0.055)  # the temperature of the next step
    default = Dino(tiny_vit(), **TINY, teacher_temp_final=0.07)  # default warm-up: 30% of training
    assert default.teacher_temp_at(15, 100) == pytest.approx(0.055)


def test_center_update_and_teacher_has_no_grads():
    d = Dino(tiny_vit(), **TINY).train()
    assert not d.teacher.training and all(not p.requires_grad for p in d.teacher.parameters())
    views = make_views(images(2), d.view_specs(), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        t = d.teacher["head"](d.teacher_backbone.forward_features(torch.cat(views[:2])).pooled)
    loss = d(views)
    # the first update starts the EMA at the batch mean (not DINO's zero), the next ones are the EMA
    torch.testing.assert_close(d.center, t.mean(0), rtol=1e-5, atol=1e-6)
    assert bool(d.center_started)
    first = d.center.clone()
    d(views).detach()
    torch.testing.assert_close(d.center, 0.9 * first + 0.1 * t.mean(0), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert any(p.grad is not None for p in d.backbone.parameters())
    assert all(p.grad is not None for p in d.head.parameters())


def test_last_layer_frozen_during_first_steps():
    d = Dino(tiny_vit(), **TINY, freeze_last_layer_steps=3)
    opt = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.1)
    before = d.head.last_layer.weight.detach().clone()
    d(images(2)).backward()
    d.on_before_optimizer_step(2, 100)
    assert d.head.last_layer.weight.grad is None
    assert d.head.mlp[0].weight.grad is not None
    opt.step()
    torch.testing.assert_close(d.head.last_layer.weight, before)
    d.zero_grad()
    d(images(2)).backward()
    d.on_before_optimizer_step(3, 100)
    assert d.head.last_layer.weight.grad is not None
    assert Dino(tiny_vit(), **TINY).frozen_last_layer_steps(1000) == 10  # default: 1 epoch of 100


@pytest.mark.parametrize("fixed_norm", [True, False])
def test_weight_norm_linear_matches_torch_weight_norm(fixed_norm):
    """Our output-scaled last layer against torch's weight_norm parametrisation (g = 1 and frozen for
    DINO's norm_last_layer): same outputs and same gradients for the input, v and g."""
    from torch.nn.utils.parametrizations import weight_norm

    from objectives.heads import WeightNormLinear

    torch.manual_seed(0)
    ours = WeightNormLinear(16, 40, fixed_norm=fixed_norm)
    if not fixed_norm:
        ours.gain.data.uniform_(0.5, 2.0)
    ref = weight_norm(nn.Linear(16, 40, bias=False), dim=0)
    ref.parametrizations.weight.original1.data.copy_(ours.weight.data)  # v
    ref.parametrizations.weight.original0.data.copy_(
        torch.ones(40, 1) if fixed_norm else ours.gain.data[:, None])  # g
    ref.parametrizations.weight.original0.requires_grad_(not fixed_norm)
    x = torch.randn(6, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    w = torch.randn(6, 40)
    (ours(x) * w).sum().backward()
    (ref(x_ref) * w).sum().backward()
    torch.testing.assert_close(ours(x), ref(x_ref))
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, ref.parametrizations.weight.original1.grad)
    if not fixed_norm:
        torch.testing.assert_close(ours.gain.grad, ref.parametrizations.weight.original0.grad[:, 0])


def test_ema_foreach_matches_per_parameter_formula():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    teacher = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    student[1].running_mean.normal_()
    expected = [0.9 * t.detach() + 0.1 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update_(teacher, student, 0.9)
    for got, want in zip(teacher.parameters(), expected):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(teacher[1].running_mean, student[1].running_mean)


def test_on_step_end_moves_teacher_towards_student():
    d = Dino(tiny_vit(), **TINY)
    with torch.no_grad():
        for p in d.head.parameters():
            p.add_(1.0)
    t_before = [p.clone() for p in d.teacher["head"].parameters()]
    d.on_step_end(0, 10_000)
    m = 0.996
    for t0, t1, s in zip(t_before, d.teacher["head"].parameters(), d.head.parameters()):
        torch.testing.assert_close(t1, m * t0 + (1 - m) * s)
    assert int(d.next_step) == 1
    # the schedule position survives a state-dict round trip
    other = Dino(tiny_vit(), **TINY)
    other.load_state_dict(d.state_dict())
    assert other._next_step == 1


def test_dino_exports_teacher_and_registers():
    d = ssl_vit.create_objective("dino", "vit_tiny", **TINY)
    assert d.export_backbone() is d.teacher_backbone and d.export_backbone() is not d.backbone
    assert {"dino", "esvit", "distill"} <= set(ssl_vit.list_objectives())
    with pytest.raises(ValueError, match="expects 4 views"):
        d([images(2)])


# ---- EsViT -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_tiny", "cvt_tiny"])
@pytest.mark.parametrize("chunk", [None, 64])
def test_esvit_matches_reference(name, chunk, monkeypatch):
    if name not in ssl_vit.list_backbones():
        pytest.skip(f"{name} not registered")
    if chunk is not None:  # forces the chunked, checkpointed path
        monkeypatch.setattr(esvit_module, "_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    e = EsViTTrainer(ssl_vit.create_backbone(name), **DEMO_ESVIT).eval()
    e.center.normal_()
    e.region_center.normal_()
    views = make_views(images(2, 64), e.view_specs(), generator=torch.Generator().manual_seed(1))
    loss = e(views)
    loss.backward()
    with torch.no_grad():
        s_out = [e.backbone.forward_features(v) for v in views]
        t_out = [e.teacher_backbone.forward_features(v) for v in views[:2]]
        view = ref_dino([e.head(o.pooled) for o in s_out], [e.teacher["head"](o.pooled) for o in t_out],
                        e.center, e.student_temp, e.teacher_temp)
        region = ref_region([e.region_head(o.patch_tokens) for o in s_out], [o.patch_tokens for o in s_out],
                            [e.teacher["region_head"](o.patch_tokens) for o in t_out], [o.patch_tokens for o in t_out],
                            e.region_center, e.student_temp, e.teacher_temp)
    torch.testing.assert_close(loss.detach(), 0.5 * view + 0.5 * region, rtol=1e-4, atol=1e-5)
    assert e.region_head.last_layer.weight.grad is not None
    assert all(p.grad is None for p in e.teacher.parameters())


def test_esvit_region_center_update():
    e = EsViTTrainer(tiny_vit(), **DEMO_ESVIT).train()
    views = make_views(images(2), e.view_specs(), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t = e.teacher["region_head"](e.teacher_backbone.forward_features(torch.cat(views[:2])).patch_tokens)
    e(views)
    # the first update sets the centre to the mean
    torch.testing.assert_close(e.region_center, t.flatten(0, 1).mean(0), rtol=1e-4, atol=1e-6)
    assert set(e.metrics) >= {"loss", "view_loss", "region_loss"}


# ---- distillation ------------------------------------------------------------------------------
class TinyTeacher(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, classes))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("hard", [False, True])
def test_distillation_matches_formula(hard):
    torch.manual_seed(0)
    student = tiny_vit(num_classes=10)
    w = DistillWrapper(student=student, teacher=TinyTeacher(), temperature=3.0, alpha=0.3, hard=hard).eval()
    x, labels = images(4), torch.randint(0, 10, (4,))
    loss = w([x], labels)
    with torch.no_grad():
        token = w.distill_token.expand(4, -1, -1)
        out = student.forward_features(x, extra_tokens=token)
        cls_logits = student.forward_head(out.pooled)
        dist_logits = w.distill_head(out.prefix_tokens[:, -1])
        t = w.teacher(x)
    ce = F.cross_entropy(cls_logits, labels)
    if hard:
        dist = F.cross_entropy(dist_logits, t.argmax(-1))
    else:
        p_t = torch.softmax(t / 3.0, -1)
        dist = (p_t * (p_t.log() - torch.log_softmax(dist_logits / 3.0, -1))).sum(-1).mean() * 9.0
    torch.testing.assert_close(loss, 0.7 * ce + 0.3 * dist, rtol=1e-4, atol=1e-5)
    assert w.head is None and w.uses_token  # the ViT's own 10-way head is the classifier


def test_distillation_grads_labels_and_fallback():
    torch.manual_seed(0)
    w = DistillWrapper(tiny_vit(), teacher=TinyTeacher(), num_classes=10).train()
    assert w.needs_labels and w.head is not None and not w.teacher.training
    loss = w(images(2), torch.tensor([1, 2]))
    loss.backward()
    assert w.distill_token.grad is not None and w.head.weight.grad is not None
    assert all(p.grad is None for p in w.teacher.parameters())
    with pytest.raises(ValueError, match="labels"):
        w(images(2))
    with pytest.raises(ValueError, match="num_classes"):
        DistillWrapper(tiny_vit(), teacher=TinyTeacher())
    with pytest.raises(ValueError, match="teacher must return logits"):
        DistillWrapper(tiny_vit(), teacher=TinyTeacher(7), num_classes=10)(images(2), torch.tensor([1, 2]))
    no_tokens = [n for n in ("cvt_tiny", "levit_tiny", "pit_tiny") if n in ssl_vit.list_backbones()
                 and ssl_vit.EXTRA_TOKENS not in ssl_vit.create_backbone(n).capabilities]
    if no_tokens:
        b = ssl_vit.create_backbone(no_tokens[0])
        f = DistillWrapper(b, teacher="student_copy", num_classes=5)
        assert not f.uses_token
        size = b.default_size
        f(torch.rand(2, 3, *size), torch.tensor([0, 4])).backward()
        assert f.distill_head[1].weight.grad is not None


def test_on_resume_resyncs_schedules():
    d = Dino(tiny_vit(), **TINY, teacher_temp_final=0.07)
    d.on_resume(50, 100)  # the launcher's call after loading a step-50 checkpoint of a 100-step run
    assert d._next_step == 50 and int(d.next_step) == 50
    assert d.teacher_temp == pytest.approx(d.teacher_temp_at(50, 100)) and d.teacher_temp > d.teacher_temp_start
    assert d.momentum == pytest.approx(d.momentum_at(49, 100))


def test_demo_profile_keeps_esvits_crops_and_augmentations():
    """The demo profile only shrinks EsViT (head, prototypes, local crop count): its views keep the local
    crops and the photometric recipe, and the schedules are DINO's defaults. (DINO's demo profile keeps the
    milder views that learn on the tiny digits: configs/profiles/demo/dino.yaml; tests/test_probe.py checks
    that its run beats random init without collapsing.)"""
    assert not {"photometric_augment", "global_lower_crop_scale", "moving_average_decay", "teacher_temp_final",
                "head_init_std"} & set(DEMO_ESVIT)
    for cls, args in ((EsViTTrainer, DEMO_ESVIT),):
        d = cls(tiny_vit(), **args)
        specs = d.view_specs()
        assert [s.name for s in specs] == ["global_1", "global_2", "local"] and specs[2].count >= 2
        assert specs[0].scale == (0.4, 1.0) and specs[2].scale == (0.05, 0.4)
        assert specs[0].blur == 1.0 and specs[1].solarize == 0.2 and specs[0].color_jitter == 0.8
        assert specs[2].grayscale == 0.2 and all(s.hflip == 0.5 for s in specs)
        assert d.num_prototypes < 65536 and d.global_size == (32, 32)


def test_collapse_monitor_separates_uniform_and_one_prototype_collapse():
    k = 50
    ln_k = math.log(k)
    uniform = teacher_collapse_stats(torch.zeros(2, 8, k), torch.zeros(k), 0.04)
    torch.testing.assert_close(uniform, torch.tensor([ln_k, 0.0]), atol=1e-5, rtol=0)
    one = torch.zeros(2, 8, k)
    one[..., 3] = 10.0  # every target on prototype 3
    entropy, kl = teacher_collapse_stats(one, torch.zeros(k), 0.04).tolist()
    assert entropy < 1e-3 and kl == pytest.approx(ln_k, abs=1e-3)
    spread = torch.full((1, k, k), -10.0)
    spread[0, torch.arange(k), torch.arange(k)] = 10.0  # sharp targets, one prototype each
    entropy, kl = teacher_collapse_stats(spread, torch.zeros(k), 0.04).tolist()
    assert entropy < 1e-3 and kl < 1e-3
    q = torch.softmax((spread - 1.0) / 0.5, -1)  # the centre and temperature enter as in the loss
    want = -(q * q.log()).sum(-1).mean()
    torch.testing.assert_close(teacher_collapse_stats(spread, torch.ones(k), 0.5)[0], want)


def test_metrics_hold_the_collapse_monitor_every_step():
    for cls in (Dino, EsViTTrainer):
        d = cls(tiny_vit(), **TINY).train()
        views = make_views(images(2), d.view_specs(), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            pooled = d.teacher_backbone.forward_features(torch.cat(views[:2])).pooled
            t = d.teacher["head"](pooled)
        center = d.center.clone()
        d(views)
        assert {"loss", "teacher_entropy", "kl_to_uniform", "teacher_temp", "momentum"} <= set(d.metrics)
        assert all(isinstance(v, float) for v in d.metrics.values())
        want = teacher_collapse_stats(t, center, d.teacher_temp).tolist()
        assert [d.metrics["teacher_entropy"], d.metrics["kl_to_uniform"]] == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert d.collapse_loss() == pytest.approx(math.log(d.num_prototypes))
        assert d.metrics["feature_rank"] == pytest.approx(float(effective_rank(pooled)), rel=1e-4)


def test_view_agreement_follows_its_formula():
    """The slope of the teacher's centred logits on the student's over the loss's pairs, against a loop over
    the pairs; 1 when every view gives the same output, 0 for unrelated views, -1 for opposite ones."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 6, 7, generator=g).double(), torch.randn(2, 6, 7, generator=g).double()

    def centred(x):
        x = x - x.mean(0, keepdim=True)
        return x - x.mean(-1, keepdim=True)

    cross = power = 0.0
    for i in range(2):
        for v in range(5):
            if v != i:
                cross += float((centred(t[i]) * centred(s[v])).sum())
                power += float(centred(s[v]).square().sum())
    assert float(view_agreement(s, t)) == pytest.approx(cross / power, rel=1e-5)
    same = torch.randn(1, 64, 32, generator=g).repeat(4, 1, 1) + torch.randn(4, 1, 32, generator=g)  # + per-view offset
    assert float(view_agreement(same, same[:2])) == pytest.approx(1.0, rel=1e-5)
    assert float(view_agreement(-same, same[:2])) == pytest.approx(-1.0, rel=1e-5)
    unrelated = torch.randn(4, 4096, 32, generator=g)
    assert abs(float(view_agreement(unrelated, unrelated[:2].flip(1)))) < 0.05


def test_view_agreement_is_in_the_metrics_with_its_need():
    for cls in (Dino, EsViTTrainer):
        d = cls(tiny_vit(), **TINY).train()
        views = make_views(images(4), d.view_specs(), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            t = d.teacher["head"](d.teacher_backbone.forward_features(torch.cat(views[:2])).pooled).view(2, 4, -1)
            s = torch.cat([d.head(d.backbone.forward_features(v).pooled).view(1, 4, -1) for v in views])
        d(views)
        assert d.metrics["view_agreement"] == pytest.approx(float(view_agreement(s, t)), rel=1e-3, abs=1e-4)
        assert d.metrics["agreement_needed"] == pytest.approx(d.teacher_temp / d.student_temp)


def test_effective_rank_follows_its_formula():
    """exp(entropy of sigma / ||sigma||_1) of the centred features: r equal directions give r, a common offset
    changes nothing."""
    basis = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))[0]
    for r in (1, 3, 8):
        feats = torch.randn(64, r, generator=torch.Generator().manual_seed(r)) @ basis[:r]
        feats = feats - feats.mean(0)
        u, _, vh = torch.linalg.svd(feats, full_matrices=False)
        equal = u[:, :r] @ vh[:r] * 5.0  # the same centred span with r equal singular values
        assert float(effective_rank(equal)) == pytest.approx(r, rel=1e-4)
        assert float(effective_rank(equal + 100.0 * basis[15])) == pytest.approx(r, rel=1e-3)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)).double()
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum()
    assert float(effective_rank(x)) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)
    assert float(effective_rank(x)) < 8 and float(effective_rank(x[:, :2].repeat(1, 4))) < 2.01


def test_weight_decay_groups_follow_dino():
    """Only biases and 1-d parameters are exempt (DINO's get_params_groups): positions and the class
    token are decayed."""
    d = Dino(tiny_vit(), **TINY)
    skip = d.no_weight_decay()
    names = dict(d.named_parameters())
    assert skip == {n for n, p in names.items() if p.ndim <= 1 or n.endswith(".bias")}
    decayed = set(names) - skip
    assert any("pos" in n for n in decayed) and any("cls" in n or "token" in n for n in decayed)
    assert "head.mlp.0.bias" in skip and "head.mlp.0.weight" in decayed and "head.last_layer.weight" in decayed
    assert all(n.endswith(".bias") or names[n].ndim <= 1 for n in skip)
    e = EsViTTrainer(tiny_vit(), **TINY)
    assert e.no_weight_decay() == {n for n, p in e.named_parameters() if p.ndim <= 1 or n.endswith(".bias")}


def test_center_keeps_dinos_speed_relative_to_a_run_scaled_teacher():
    """DINO's centre is 25x faster than its teacher (time constants 10 and 250 steps); a short run that
    speeds the teacher up speeds the centre up alike, down to 0 (the batch mean), never slower than it."""
    d = Dino(tiny_vit(), **TINY)
    assert d.center_momentum_at(125_000) == pytest.approx(0.9)      # DINO's own run: its own values
    assert d.center_momentum_at(2_500) == pytest.approx(0.9)
    assert d.center_momentum_at(1_000) == pytest.approx(0.75)       # teacher 0.99: 100 steps; centre 4
    assert d.center_momentum_at(68) == 0.0
    for steps in (68, 300, 1_000, 2_500, 10_000):
        teacher = 1 / (1 - d.momentum_at(0, steps))
        centre = 1 / (1 - d.center_momentum_at(steps))
        assert centre <= teacher / 25 + 1e-6 or d.center_momentum_at(steps) == 0.0
    fixed = Dino(tiny_vit(), **TINY, ema_time_fraction=None)
    assert fixed.center_momentum_at(68) == pytest.approx(0.9)
    d.on_step_end(0, 68)
    assert d.center_momentum == 0.0
    d.on_resume(10, 1_000)
    assert d.center_momentum == pytest.approx(0.75)


def test_state_dict_without_center_flags_loads_as_started():
    d = Dino(tiny_vit(), **TINY)
    state = {k: v for k, v in d.state_dict().items() if not k.endswith("center_started")}
    d.load_state_dict(state)
    assert bool(d.center_started)


def test_bn_head_uses_batch_statistics_in_student_and_teacher():
    """use_bn_in_head (DINO's --use_bn_in_head): batch norm after each hidden linear layer; the teacher's batch
    norms use the batch's statistics while training, as DINO's teacher does, and running ones in eval."""
    from torch import nn

    d = Dino(tiny_vit(), **TINY, use_bn_in_head=True).train()
    bns = [m for m in d.head.mlp if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 2
    teacher_bns = [m for m in d.teacher.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(teacher_bns) == 2 and all(m.training for m in teacher_bns) and not d.teacher.training
    x = torch.randn(6, d.backbone.embed_dim)
    with torch.no_grad():
        h = d.teacher["head"].mlp[0](x)
        normed = d.teacher["head"].mlp[1](h)
    torch.testing.assert_close(normed.mean(0), torch.zeros(h.shape[1]), atol=1e-5, rtol=0)
    loss = d(make_views(images(4), d.view_specs(), generator=torch.Generator().manual_seed(0)))
    loss.backward()
    assert torch.isfinite(loss) and bns[0].weight.grad is not None
    d.eval()
    assert all(not m.training for m in teacher_bns)


def test_dino_blur_sigma_is_the_references_at_224_px_and_scales_with_the_global_crop():
    for spec in dino_view_specs((224, 224), (96, 96), 2):
        assert spec.blur_sigma == pytest.approx((0.1, 2.0))  # DINO's GaussianBlur(radius_min=0.1, radius_max=2.)
    blurs = {spec.name: (spec.blur, spec.blur_sigma) for spec in dino_view_specs((32, 32), (12, 12), 2)}
    assert blurs["global_1"] == (1.0, pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224)))
    assert blurs["local"][1] == blurs["global_1"][1]  # as in DINO: one sigma range for every crop


def ref_koleo(x: torch.Tensor) -> torch.Tensor:
    """KoLeo of one set (B, D), written out: -(1/B) sum_i log min_j!=i ||x_i/|x_i| - x_j/|x_j|||."""
    z = [v / v.norm() for v in x.double()]
    return -sum(math.log(min((z[i] - z[j]).norm() for j in range(len(z)) if j != i)) for i in range(len(z))) / len(z)


@pytest.mark.parametrize("cls, args", [(Dino, TINY), (EsViTTrainer, TINY)])
def test_koleo_weight_adds_koleo_of_the_students_global_crops(cls, args):
    # DINOv2's regulariser as a DINO / EsViT option: the loss grows by weight x KoLeo of the student's pooled
    # features of each global crop (one set per crop, summed), and a weight of 0 leaves DINO's loss alone.
    x = images(4)
    torch.manual_seed(3)
    views = make_views(x, cls(tiny_vit(), **args).view_specs())
    out = {}
    for w in (0.0, 0.5):
        model = cls(tiny_vit(), **args, koleo_weight=w).train()
        out[w] = (model(views), dict(model.metrics))
    assert "koleo_loss" not in out[0.0][1]
    with torch.no_grad():
        pooled = tiny_vit().forward_features(torch.cat(views[:2])).pooled.view(2, 4, -1)
    want = sum(ref_koleo(p) for p in pooled)
    assert out[0.5][1]["koleo_loss"] == pytest.approx(want, rel=1e-4)
    assert (out[0.5][0] - out[0.0][0]).item() == pytest.approx(0.5 * want, rel=1e-4)
