"""Feature distillation from a frozen teacher (objectives/distill_features.py; lightly-train's "distillation")."""

from __future__ import annotations

from pathlib import Path

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


# ---- a trained teacher makes a better student (issue #18) ---------------------------------------------------
def _digits(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of the digits shards `spec` through the launcher's own decoding: uint8 (N, 3, 32, 32) and
    labels (N,) long, in shard order."""
    from launch.data import ShardStream, expand_shards, make_loader

    stream = ShardStream(expand_shards(spec), batch_size=512, image_size=32, rank=0, world=1, seed=0,
                         infinite=False, need_labels=True)
    batches = list(make_loader(stream, 0))
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


def _linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of features a (N, D1) and b (N, D2) of the same N inputs:
    ||A^T B||_F^2 / (||A^T A||_F ||B^T B||_F) on the centred A, B; 1 when one is an orthogonal map and
    scaling of the other, near 0 for unrelated features. In float64."""
    a, b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    return float((a.T @ b).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm()))


def _supervised_teacher(images: torch.Tensor, labels: torch.Tensor, steps: int) -> ssl_vit.Backbone:
    """vit_tiny (4x4 grid at 32 px, width 64) trained with cross-entropy through a linear head on its pooled
    (class-token) features: `steps` AdamW steps of 64 random images (N, 3, 32, 32) normalised as the run's views."""
    torch.manual_seed(11)
    teacher = ssl_vit.create_backbone("vit_tiny")
    head = torch.nn.Linear(teacher.embed_dim, 10)
    opt = torch.optim.AdamW([*teacher.parameters(), *head.parameters()], lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (64,), generator=g)
        loss = F.cross_entropy(head(teacher(images[idx])), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.eval()


def _probe_top1(weights: Path, out: Path, cache: Path, *extra: str) -> float:
    """Best linear-probe top-1 of launch.probe (linear_probe.py) on the digits, pooled features; results in `out`."""
    import json

    from accelerate.state import AcceleratorState

    from launch.probe import main as probe

    AcceleratorState._reset_state(reset_partial_state=True)
    assert probe(["--weights", str(weights), "--workers", "0", "--epochs", "30", "--no-knn", "--cache", str(cache),
                  "--out", str(out), *extra]) == 0
    return float(json.loads((out / "results.json").read_text())["best"]["top1"])


def test_distilling_a_trained_teacher_beats_the_students_random_init(tmp_path):
    """Issue #18, end to end on the embedded digits: a supervised vit_tiny teacher (a few seconds of training,
    exported as ours), distilled by the launcher (`--objective distill_features`, objective_args.teacher=<export>)
    into a fresh vit_tiny student for 500 steps of the demo recipe. Then (a) linear_probe.py on the student's
    pooled features beats the same probe on the student's random init (the weights the run started from: the
    probe's --random-init seeds as the launcher does), and (b) the linear CKA of the student's and the teacher's
    pooled features on the validation images rises well above its value at init.

    Measured (CPU, deterministic): teacher probe 96.3 %, init 83.0 %, student 92.6 %; CKA 0.17 at init, 0.80
    after; ~24 s. The student gets worse before it gets better: probing checkpoints of a 600-step run (a
    400-step teacher) gave 76 % at step 50, 79 % at 100, 87 % at 200 and teacher level (95 %) from step 450
    (CKA 0.13, 0.28, 0.65, 0.85; 0.16 at init); 100-, 150- and 200-step runs ended at 76-83 %: the
    first steps rotate the random features (pooled directions nearly shared by every image at init, spread
    out in the teacher) before the teacher's structure is learnt, so a run of ~150 steps scores below random
    init. Hence 500 steps here."""
    from accelerate.state import AcceleratorState

    from launch.cli import main
    from launch.digits import digits_shards
    from launch.knn import normalizer
    from ssl_vit.export import build_from_meta, read_meta

    cache = tmp_path / "cache"
    train_spec, val_spec = digits_shards(str(cache))
    data_cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/profiles/demo.yaml").read_text())["data"]
    prepare = normalizer(data_cfg["mean"], data_cfg["std"])  # the demo profile's views: what the teacher sees
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids oversubscription on a shared CPU
    try:
        images, labels = _digits(train_spec)
        teacher = _supervised_teacher(prepare(images), labels, steps=300)
        teacher_dir = ssl_vit.save_backbone(teacher, tmp_path / "teacher", objective="supervised", step=300,
                                            config={"data": {"mean": data_cfg["mean"], "std": data_cfg["std"]}})
        AcceleratorState._reset_state(reset_partial_state=True)
        rc = main(["--objective", "distill_features", "--backbone", "vit", "--steps", "500",
                   "--set", f"objective_args.teacher={teacher_dir}", "--set", "data.num_workers=0",
                   "--set", "train.val_batches=0", "--set", "train.checkpoint_every=500",
                   "--set", f"data.cache={cache}", "--out", str(tmp_path / "run")])
        assert rc == 0
        run = tmp_path / "run"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["backbone_size"] == "tiny" and cfg["data"]["mean"] == data_cfg["mean"], cfg["data"]
        student_dir = run / "export"
        meta = read_meta(student_dir)
        assert meta["objective"] == "distill_features" and meta["registry_name"] == "vit_tiny" and meta["step"] == 500

        # (a) the probe: the teacher is genuinely better than random, and so is the student it taught
        probes = tmp_path / "probes"
        top1 = {"teacher": _probe_top1(teacher_dir, probes / "teacher", cache),
                "student": _probe_top1(student_dir, probes / "student", cache),
                "init": _probe_top1(student_dir, probes / "init", cache, "--random-init")}
        assert top1["teacher"] > top1["init"] + 5, top1
        assert top1["student"] > top1["init"] + 3, top1

        # (b) the student's features move towards the teacher's (the init: the launcher's seed, as the probe's)
        val_images, _ = _digits(val_spec)
        x = prepare(val_images)
        torch.manual_seed(cfg["train"]["seed"])
        init = build_from_meta(meta).eval()
        student = ssl_vit.load_backbone(student_dir).eval()
        with torch.no_grad():
            f_teacher, f_student, f_init = teacher(x), student(x), init(x)
        q = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0]
        assert _linear_cka(f_teacher, 3.0 * f_teacher @ q) == pytest.approx(1.0, abs=1e-6)  # the measure itself
        cka = {"init": _linear_cka(f_init, f_teacher), "student": _linear_cka(f_student, f_teacher)}
        assert cka["student"] > cka["init"] + 0.3 and cka["student"] > 0.6, cka
    finally:
        torch.set_num_threads(threads)
