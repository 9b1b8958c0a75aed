"""Feature distillation from a frozen teacher (objectives/distill_features.py; lightly-train's "distillation")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

import ssl_vit
from objectives.distill_features import FeatureDistillation, feature_loss, resize_grid
from ssl_vit import BadArgument, IncompatibleBackbone

from .conftest import make_input


def _export(tmp_path, name: str, seed: int = 0, **overrides) -> str:
    torch.manual_seed(seed)
    backbone = ssl_vit.create_backbone(name, **overrides)
    return str(ssl_vit.save_backbone(backbone, tmp_path / f"teacher_{name}", objective="test", step=0))


def _smooth_images(batch: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Fixed images with structure at several scales: upsampled noise, (B, 3, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(batch, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")
    fine = F.interpolate(torch.rand(batch, 3, 16, 16, generator=g), size=(size, size), mode="bilinear")
    return (0.7 * coarse + 0.3 * fine).clamp(0, 1)


# ---- the loss is its formula ------------------------------------------------------------------------------
def test_cosine_loss_is_its_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    want = 0.0
    for b in range(2):
        for n in range(5):
            want += 1 - float(s[b, n] @ t[b, n]) / float(s[b, n].norm() * t[b, n].norm())
    torch.testing.assert_close(feature_loss(s, t, "cosine"), torch.tensor(want / 10))
    assert float(feature_loss(t * 3.0, t, "cosine")) == pytest.approx(0.0, abs=1e-6)  # scale-free


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_smooth_l1_loss_is_its_formula(beta):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    d = (s - t).abs()
    want = torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).mean()
    torch.testing.assert_close(feature_loss(s, t, "smooth_l1", beta), want)


def test_loss_refuses_unknown_kinds_and_shapes():
    with pytest.raises(BadArgument, match="unknown feature loss"):
        feature_loss(torch.zeros(1, 2), torch.zeros(1, 2), "mse")
    with pytest.raises(BadArgument, match="differ"):
        feature_loss(torch.zeros(1, 2), torch.zeros(1, 3))


def test_resize_grid_is_bilinear_interpolation_of_the_map():
    tokens = torch.randn(2, 4 * 4, 3)
    out = resize_grid(tokens, (4, 4), (8, 8))
    fmap = tokens.transpose(1, 2).reshape(2, 3, 4, 4)
    want = F.interpolate(fmap, size=(8, 8), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, want)
    assert resize_grid(tokens, (4, 4), (4, 4)) is tokens
    assert resize_grid(torch.randn(1, 2 * 4 * 4, 3), (2, 4, 4), (2, 2, 2)).shape == (1, 8, 3)


# ---- teachers of another architecture ---------------------------------------------------------------------
@pytest.mark.parametrize("student_name, teacher_name, teacher_overrides", [
    ("cvt_tiny", "vit_tiny", {"patch_size": 4}),  # hierarchical 4x4 x 128, no prefix <- isotropic 8x8 x 64, cls
    ("vit_tiny", "levit_tiny", {}),  # the teacher wants 64 px views: the 32 px view is resized for it
])
def test_pair_with_other_grid_and_width_trains_one_step(tmp_path, student_name, teacher_name, teacher_overrides):
    torch.manual_seed(0)
    student = ssl_vit.create_backbone(student_name)
    model = ssl_vit.create_objective("distill_features", student,
                                     teacher=_export(tmp_path, teacher_name, **teacher_overrides)).train()
    teacher = model.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.embed_dim != student.embed_dim
    x = make_input(student, batch=2)
    _, _, grid = model.teacher_features(x)
    assert grid != tuple(student.forward_features(x).grid)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss = model(x)
    assert loss.dim() == 0 and torch.isfinite(loss) and set(model.metrics) >= {"patch_loss", "pooled_loss"}
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert not ({id(p) for p in teacher.parameters()} & {id(p) for g in opt.param_groups for p in g["params"]})
    opt.step()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert model.export_backbone() is student


def test_teacher_from_a_timm_layout_file(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2)
    torch.manual_seed(3)
    source = ssl_vit.create_backbone("timm:vit_tiny_patch16_224", **kwargs).eval()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.timm_state_dict().items()}, str(path))
    student = ssl_vit.create_backbone("simple_vit_tiny")
    model = ssl_vit.create_objective("distill_features", student, teacher="timm:vit_tiny_patch16_224",
                                     teacher_weights=str(path), teacher_kwargs=kwargs, loss="smooth_l1")
    x = make_input(student, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(model.teacher.forward_features(x).pooled, source.forward_features(x).pooled)
    loss = model(x)
    assert torch.isfinite(loss)
    with pytest.raises(BadArgument, match="needs teacher_weights"):
        FeatureDistillation(student, teacher="timm:vit_tiny_patch16_224", teacher_kwargs=kwargs)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(BadArgument, match="do not fit"):
        FeatureDistillation(student, teacher="timm:vit_tiny_patch16_224", teacher_weights=str(wrong),
                            teacher_kwargs=kwargs)


def test_bad_teachers_are_one_clear_error(tmp_path):
    student = ssl_vit.create_backbone("vit_tiny")
    with pytest.raises(BadArgument, match="is not an export folder") as err:
        FeatureDistillation(student, teacher=str(tmp_path / "missing"))
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(BadArgument, match="needs objective_args.teacher"):
        FeatureDistillation(student)
    with pytest.raises(IncompatibleBackbone, match="video"):
        FeatureDistillation(student, teacher=ssl_vit.create_backbone("vit_3d_tiny"))


def test_checkpoint_holds_and_restores_the_frozen_teacher():
    torch.manual_seed(0)
    model = ssl_vit.create_objective("distill_features", ssl_vit.create_backbone("vit_tiny"), teacher="student_copy")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.startswith("teacher.") for k in state)
    torch.manual_seed(1)
    fresh = ssl_vit.create_objective("distill_features", ssl_vit.create_backbone("vit_tiny"), teacher="student_copy")
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(v, state[f"teacher.{k}"]) for k, v in fresh.teacher.state_dict().items())
    assert not any(p.requires_grad for p in fresh.teacher.parameters())


# ---- distillation moves the student towards the teacher -----------------------------------------------------
def _distill(teacher_path: str, images: torch.Tensor, *, heads_only: bool, steps: int = 20):
    """Student simple_vit_tiny (4x4 grid, no class token, width 64) distilled for `steps` AdamW steps on views of
    `images` from the teacher export (8x8 grid); returns (model, (patch cosine, loss) at init, the same after)."""
    torch.manual_seed(0)
    student = ssl_vit.create_backbone("simple_vit_tiny")
    model = ssl_vit.create_objective("distill_features", student, teacher=teacher_path)

    def agreement() -> tuple[float, float]:
        """Mean cosine of the projected student and the teacher patch tokens, and the loss, on the plain images."""
        model.eval()
        with torch.no_grad():
            t_patch, t_pooled, grid = model.teacher_features(images)
            s_patch, s_pooled = model.student_features(images, grid)
            cos = float(F.cosine_similarity(s_patch, t_patch, dim=-1).mean())
            loss = float(feature_loss(s_patch, t_patch) + feature_loss(s_pooled, t_pooled))
        model.train()
        return cos, loss

    before = agreement()
    trained = [p for n, p in model.named_parameters()
               if p.requires_grad and not (heads_only and n.startswith("backbone."))]
    opt = torch.optim.AdamW(trained, lr=2e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids oversubscription on a shared CPU
    try:
        torch.manual_seed(2)
        for _ in range(steps):
            loss = model([images])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model, before, agreement()


def test_distilling_raises_the_students_agreement_with_the_teacher(tmp_path):
    """Content, not shapes: after 20 steps the student's projected patch tokens agree with the teacher's far more
    than at init, and the trained backbone (not the projection alone) carries part of it: training only the
    heads from the same init leaves a clearly higher loss."""
    images = _smooth_images(16)
    teacher_path = _export(tmp_path, "vit_tiny", seed=5, patch_size=4)  # a fixed teacher: 8x8 grid, class token
    model, (cos0, loss0), (cos1, loss1) = _distill(teacher_path, images, heads_only=False)
    _, _, (_, loss_heads) = _distill(teacher_path, images, heads_only=True)
    assert cos1 > cos0 + 0.2 and loss1 < 0.5 * loss0, (cos0, cos1, loss0, loss1)
    assert loss1 < 0.5 * loss_heads, (loss1, loss_heads)
    assert model.metrics["patch_cosine"] > cos0


# ---- the launcher ------------------------------------------------------------------------------------------
def test_launcher_runs_two_steps(tmp_path):
    from accelerate.state import AcceleratorState

    from launch.cli import main

    teacher = _export(tmp_path, "vit_tiny", seed=7)
    AcceleratorState._reset_state(reset_partial_state=True)
    rc = main(["--objective", "distill_features", "--backbone", "vit", "--set", f"objective_args.teacher={teacher}",
               "--steps", "2", "--set", "data.batch_size=4", "--set", "data.num_workers=0",
               "--set", "train.val_batches=0", "--set", f"data.cache={tmp_path / 'cache'}",
               "--out", str(tmp_path / "run")])
    assert rc == 0
    run = tmp_path / "run"
    meta = ssl_vit.load_backbone(run / "export").export_meta
    assert meta["objective"] == "distill_features" and meta["registry_name"] == "vit_tiny"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["optim"]["clip_grad"] == 1.0 and cfg["objective_args"]["teacher"] == teacher
    saved = load_file(run / "checkpoints" / "step_0000002" / "objective.safetensors")
    own = ssl_vit.load_backbone(teacher).state_dict()  # the frozen teacher is in the checkpoint, unchanged
    assert all(torch.equal(saved[f"teacher.{k}"], v) for k, v in own.items())
