"""iBOT (Zhou et al. 2022) and DINOv2 (Oquab et al. 2023): loss parity against the formulas, block masks,
capability checks, one training step with the teacher's EMA, and a 2-step launcher run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ssl_vit
from objectives.dino import dino_loss
from objectives.ibot import (
    IBOT,
    ibot_block_masks,
    ibot_mask_ratios,
    ibot_patch_loss,
    koleo_loss,
    multicrop_cross_entropy,
    sinkhorn_knopp,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = dict(image_size=None, num_classes_K=32, patch_prototypes=32, projection_hidden_size=32, bottleneck_dim=16,
             num_local_crops=1)


# ---- loss parity ---------------------------------------------------------------------------------------
def test_patch_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    b, n, k, ts = 3, 5, 7, 0.1
    s = torch.randn(b, n, k, generator=g)
    q = F.softmax(torch.randn(b, n, k, generator=g) / 0.04, -1)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    expected = 0.0
    for i in range(b):  # the reference's formula, written out
        cells = [j for j in range(n) if mask[i, j]]
        terms = [-(q[i, j] * torch.log_softmax(s[i, j] / ts, -1)).sum() for j in cells]
        expected += (sum(terms) / max(1, len(cells))) if cells else 0.0
    expected /= b
    got = ibot_patch_loss(s[mask], q[mask], mask, ts)
    assert torch.allclose(got, torch.as_tensor(expected), atol=1e-5)
    empty = torch.zeros(b, n, dtype=torch.bool)
    assert float(ibot_patch_loss(s[empty], q[empty], empty, ts)) == 0.0


def test_multicrop_cross_entropy_matches_dino_loss():
    g = torch.Generator().manual_seed(1)
    s, t, c = torch.randn(4, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g), torch.randn(11, generator=g)
    q = F.softmax((t - c) / 0.04, -1)
    assert torch.allclose(multicrop_cross_entropy(s, q, 0.1), dino_loss(s, t, c, 0.1, 0.04), atol=1e-5)


def _sinkhorn_direct(scores: np.ndarray, eps: float, iterations: int) -> np.ndarray:
    """SwAV's Sinkhorn-Knopp as written in the paper: P = exp(S / eps) over (K, B), alternately scaled to
    row sums 1/K and column sums 1/B; the targets are B * P^T."""
    p = np.exp(scores.T / eps)
    p /= p.sum()
    k, b = p.shape
    for _ in range(iterations):
        p /= p.sum(1, keepdims=True) * k
        p /= p.sum(0, keepdims=True) * b
    return (p * b).T


def test_sinkhorn_knopp_matches_direct_implementation():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 9, generator=g) * 0.3
    got = sinkhorn_knopp(logits, 0.07, 3)
    want = _sinkhorn_direct(logits.double().numpy(), 0.07, 3)
    assert np.allclose(got.double().numpy(), want, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(16), atol=1e-5)  # every sample's target is a distribution
    balanced = sinkhorn_knopp(logits, 0.07, 200)  # converged: every prototype gets B / K of the mass
    assert torch.allclose(balanced.sum(0), torch.full((9,), 16 / 9), atol=1e-3)
    assert torch.isfinite(sinkhorn_knopp(logits * 100, 0.04, 3)).all()  # large logits: no overflow


def test_koleo_matches_formula_and_is_finite_on_duplicates():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    z = F.normalize(x, dim=-1)
    d = torch.cdist(z, z) + torch.diag(torch.full((10,), math.inf, dtype=torch.float64))
    want = -torch.log(d.min(1).values).mean()
    assert torch.allclose(koleo_loss(x).double(), want, atol=1e-5)
    batched = koleo_loss(torch.stack([x, x.flip(0)]))  # (2, B, D) -> (2,)
    assert batched.shape == (2,) and torch.allclose(batched.double(), want.expand(2), atol=1e-5)

    dup = torch.randn(6, 8, generator=g).repeat(2, 1).requires_grad_(True)  # every point twice
    loss = koleo_loss(dup)
    assert torch.isfinite(loss) and math.isclose(float(loss), -math.log(1e-8), rel_tol=1e-4)
    loss.backward()
    assert torch.isfinite(dup.grad).all()
    half = koleo_loss(dup.detach().to(torch.bfloat16))
    assert half.dtype == torch.float32 and torch.isfinite(half)


# ---- masks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["bernoulli", "stratified"])
def test_block_masks_within_the_ratio_range(sampling):
    torch.manual_seed(0)
    b, grid = 200, (14, 14)
    ratios = ibot_mask_ratios(b, 0.3, 0.2, 0.5, sampling)
    masked = ratios > 0
    assert ((ratios[masked] >= 0.1) & (ratios[masked] <= 0.5)).all()
    if sampling == "stratified":
        assert int(masked.sum()) == b // 2
    else:
        assert 0.35 < float(masked.float().mean()) < 0.65
    mask = ibot_block_masks(ratios, grid)
    assert mask.shape == (b, *grid) and mask.dtype == torch.bool
    counts = mask.flatten(1).sum(1)
    assert (counts[~masked] == 0).all()
    assert torch.equal(counts[masked], (ratios[masked] * 196).round().long())  # the blocks reach the target
    frac = counts[masked].float() / 196
    assert (frac >= 0.1 - 1 / 196).all() and (frac <= 0.5 + 1 / 196).all()
    # blocks, not scattered cells: masked cells have far more masked 4-neighbours than at random
    m = mask[masked].float()
    pairs = (m[:, 1:] * m[:, :-1]).sum() + (m[:, :, 1:] * m[:, :, :-1]).sum()
    assert float(pairs / m.sum()) > 1.0


def test_block_masks_video_grid_and_model_grid():
    ratios = torch.tensor([0.3, 0.0])
    mask = ibot_block_masks(ratios, (2, 4, 4))
    assert mask.shape == (2, 2, 4, 4) and torch.equal(mask[:, 0], mask[:, 1]) and not mask[1].any()
    backbone = ssl_vit.create_backbone("vit_tiny")
    model = IBOT(backbone, **SMALL, mask_probability=1.0)
    grid = backbone.mask_grid(model.global_size)
    masks = model.make_masks(8, grid, torch.device("cpu"))
    assert masks.shape == (8, *grid) and masks.flatten(1).any(1).all()
    late = IBOT(backbone, **SMALL, mask_probability=1.0, mask_start_step=5)
    assert not late.make_masks(8, grid, torch.device("cpu")).any()  # no masks before mask_start_step


# ---- capabilities ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ibot", "dinov2"])
def test_refuses_a_backbone_without_mask_token(name):
    backbone = ssl_vit.create_backbone("vit_tiny")
    backbone.__class__ = type("NoMaskViT", (type(backbone),), {"capabilities": frozenset({"token_drop"})})
    with pytest.raises(ssl_vit.IncompatibleBackbone, match="mask_token"):
        ssl_vit.create_objective(name, backbone, **SMALL)


# ---- training ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, extra", [("ibot", {}), ("ibot", {"shared_head": False, "patch_prototypes": 24}),
                                         ("dinov2", {}), ("dinov2", {"centering": "ema"})])
def test_one_step_trains_student_and_ema_moves_teacher(name, extra):
    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone("vit_tiny")
    model = ssl_vit.create_objective(name, backbone, **{**SMALL, "mask_probability": 1.0, **extra}).train()
    x = torch.randn(4, 3, *backbone.default_size)
    loss = model(x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert model.metrics["patch_loss"] > 0 and 0 < model.metrics["mask_ratio"] < 1
    assert math.isclose(model.collapse_loss(), math.log(32))
    if name == "dinov2":
        assert "koleo_loss" in model.metrics and math.isfinite(model.metrics["koleo_loss"])
    teacher = [p.detach().clone() for p in model.teacher.parameters()]
    assert all(not p.requires_grad for p in model.teacher.parameters())
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.on_before_optimizer_step(5, 10)  # past the frozen-last-layer steps
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(teacher, model.teacher.parameters())), "gradient moved the teacher"
    model.on_step_end(5, 10)
    assert model.momentum < 1
    assert any(not torch.equal(a, b) for a, b in zip(teacher, model.teacher.parameters())), "EMA left the teacher"
    assert model.export_backbone() is model.teacher_backbone


def test_ema_centres_move_and_schedules_resume():
    torch.manual_seed(0)
    model = ssl_vit.create_objective("ibot", ssl_vit.create_backbone("vit_tiny"), **SMALL,
                                     mask_probability=1.0).train()
    model(torch.randn(4, 3, 32, 32))
    assert model.center.abs().sum() > 0 and model.patch_center.abs().sum() > 0
    model.on_resume(30, 100)
    assert math.isclose(model.teacher_patch_temp, 0.07) and math.isclose(model.teacher_temp, 0.07)
    model.on_resume(0, 100)
    assert math.isclose(model.teacher_patch_temp, 0.04)


def test_launcher_runs_dinov2_for_two_steps(tmp_path):
    from accelerate.state import AcceleratorState

    from launch.cli import main

    AcceleratorState._reset_state(reset_partial_state=True)
    args = ["--objective", "dinov2", "--backbone", "vit", "--set", "backbone_args.num_registers=0", "--steps", "2",
            "--set", "data.batch_size=4", "--set", "data.num_workers=0", "--set", "train.val_batches=0",
            "--set", f"data.cache={tmp_path / 'cache'}", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


# ---- distributed: the sums of Sinkhorn-Knopp and of the centres run over every process ----------------
def _distributed_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    from objectives.dino import update_center_

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        logits = torch.randn(12, 5, generator=torch.Generator().manual_seed(4)) * 0.5
        rows = logits.chunk(world)[rank]
        targets = sinkhorn_knopp(rows, 0.07, 3)
        center = torch.zeros(5)
        update_center_(center, rows[: 2 + rank], 0.5)  # a different number of rows on each process
        gathered = [torch.zeros_like(targets) for _ in range(world)]
        dist.all_gather(gathered, targets)
        if rank == 0:
            torch.save({"targets": torch.cat(gathered), "center": center}, out_file)
    finally:
        dist.destroy_process_group()


def test_sinkhorn_and_centres_all_reduce_over_processes(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    out = tmp_path / "out.pt"
    mp.spawn(_distributed_worker, args=(world, str(tmp_path / "init"), str(out)), nprocs=world, join=True)
    result = torch.load(out, weights_only=True)
    logits = torch.randn(12, 5, generator=torch.Generator().manual_seed(4)) * 0.5
    assert torch.allclose(result["targets"], sinkhorn_knopp(logits, 0.07, 3), atol=1e-5)
    chunks = logits.chunk(world)
    rows = torch.cat([chunks[0][:2], chunks[1][:3]])
    assert torch.allclose(result["center"], 0.5 * rows.mean(0), atol=1e-6)


def test_launcher_resume_is_exact(tmp_path):
    """ibot: 3 steps straight and the same stopped at 2 and resumed end with equal weights and losses (masks,
    centres and the patch temperature resume with the run)."""
    import json

    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from launch.cli import main

    common = ["--objective", "ibot", "--backbone", "vit", "--steps", "3", "--set", "data.batch_size=4",
              "--set", "data.num_workers=0", "--set", "train.val_batches=0", "--set", "train.log_every=1",
              "--set", "train.checkpoint_every=1", "--set", f"data.cache={tmp_path / 'cache'}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for extra in (["--out", str(straight)], ["--out", str(split), "--set", "train.stop_at=2"],
                  ["--out", str(split), "--resume"]):
        AcceleratorState._reset_state(reset_partial_state=True)
        assert main([*common, *extra]) == 0
    a = load_file(straight / "checkpoints" / "step_0000003" / "objective.safetensors")
    b = load_file(split / "checkpoints" / "step_0000003" / "objective.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}

    la, lb = losses(straight), losses(split)
    assert lb[3] == pytest.approx(la[3], abs=1e-6)
