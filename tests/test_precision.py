"""Mixed precision and compilation: every objective trains under CPU bf16 autocast close to its fp32
loss; torch.compile (inductor) of MAE, SimMIM and DINO steps gives the eager loss; the backbone
forward compiles without graph breaks."""

from __future__ import annotations

import math

import pytest
import torch
import torch._inductor.config

import ssl_vit
from launch.config import profile_objective_args
from objectives.views import IMAGENET_MEAN, IMAGENET_STD, make_views

BACKBONE = "vit_tiny"


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The objective on the tiny ViT with the demo profile's small settings."""
    torch.manual_seed(seed)
    backbone = ssl_vit.create_backbone(BACKBONE)
    return ssl_vit.create_objective(name, backbone, **profile_objective_args("demo", name)).train()


def batch(model: torch.nn.Module, seed: int = 1) -> tuple[list[torch.Tensor], dict]:
    """The objective's views of a random batch, made outside autocast as the launcher makes them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 32, 32, generator=g)
    views = make_views(x, model.view_specs(), normalize=(IMAGENET_MEAN, IMAGENET_STD), generator=g)
    kwargs = {"labels": torch.tensor([0, 1, 2, 3])} if model.needs_labels else {}
    return views, kwargs


def loss_of(model: torch.nn.Module, views: list[torch.Tensor], kwargs: dict, seed: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)  # the same masks in every precision
    return model(views, **kwargs)


@pytest.mark.parametrize("name", ssl_vit.list_objectives())
def test_one_bf16_autocast_step_matches_fp32(name):
    fp32_model, bf16_model = build(name), build(name)
    x, kwargs = batch(fp32_model)
    reference = loss_of(fp32_model, x, kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(bf16_model, x, kwargs)
    assert loss.dtype == torch.float32, f"{name}: the loss under bf16 autocast is {loss.dtype}"
    assert torch.isfinite(loss)
    got, want = float(loss.detach()), float(reference.detach())
    assert got == pytest.approx(want, rel=0.05, abs=0.02), (name, got, want)

    # the rest of the step: backward, finite gradients reaching the backbone, an optimizer step
    loss.backward()
    grads = [p.grad for p in bf16_model.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad.dtype == p.dtype == torch.float32 for p in bf16_model.parameters() if p.grad is not None)
    opt = torch.optim.AdamW([p for p in bf16_model.parameters() if p.requires_grad], lr=1e-3)
    bf16_model.on_before_optimizer_step(0, 10)
    opt.step()
    bf16_model.on_step_end(0, 10)
    assert all(torch.isfinite(p).all() for p in bf16_model.parameters())
    assert all(math.isfinite(float(v)) for v in bf16_model.metrics.values())


@pytest.mark.parametrize("name", ["mae", "simmim", "dino"])
def test_compiled_step_gives_the_eager_loss(name):
    torch._dynamo.reset()
    eager, compiled_model = build(name), build(name)
    x, kwargs = batch(eager)
    reference = loss_of(eager, x, kwargs)
    reference.backward()
    compiled = torch.compile(compiled_model)
    # inductor draws random numbers its own way unless told to fall back to eager's (the masks)
    with torch._inductor.config.patch(fallback_random=True):
        loss = loss_of(compiled, x, kwargs)
        loss.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-4, abs=1e-5)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    for n, p in compiled_model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{name} {n}: {m}")


def test_mae_step_breaks_its_graph_only_for_its_metrics():
    """MAE's masks are drawn and gathered inside one graph (no host read of the mask); the one break left is
    `float(loss)` for `metrics`, after the loss is computed."""
    torch._dynamo.reset()
    model = build("mae")
    x, kwargs = batch(model)
    explanation = torch._dynamo.explain(model)(x, **kwargs)
    assert explanation.graph_break_count == 1, explanation.break_reasons
    frame = explanation.break_reasons[0].user_stack[-1]
    assert frame.filename.endswith("mae.py") and "float(loss" in (frame.line or ""), frame


def test_backbone_forward_compiles_without_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone(BACKBONE).train()
    x = torch.randn(2, 3, 32, 32)
    keep = torch.arange(4).expand(2, 4)
    for kwargs in ({}, {"keep": keep}):
        explanation = torch._dynamo.explain(backbone.forward_features)(x, **kwargs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("native, cuda, env, want", [(True, False, None, "bf16"), (False, False, None, "no"),
                                                     (True, False, "no", None), (True, True, None, "no")])
def test_auto_precision_picks_bf16_where_the_cpu_has_it(monkeypatch, native, cuda, env, want):
    """auto: bf16 on a CPU with native bf16; what accelerate was told when it was told; the GPU's own rule."""
    from types import SimpleNamespace

    import launch.build as build_module

    monkeypatch.setattr(build_module, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    if env is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    cfg = SimpleNamespace(train=SimpleNamespace(mixed_precision="auto"))
    assert build_module.resolve_precision(cfg) == want
    cfg.train.mixed_precision = "no"
    assert build_module.resolve_precision(cfg) == "no"


def test_a_launcher_run_under_auto_on_a_bf16_cpu_says_so(tmp_path, monkeypatch, capsys):
    """The launcher trains two steps under CPU bf16 autocast when `auto` picks it, and the summary says why."""
    import json

    import launch.build as build_module

    from .test_launch_run import run

    monkeypatch.setattr(build_module, "cpu_has_native_bf16", lambda: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    out = tmp_path / "run"
    assert run(["--objective", "dino", "--backbone", "vit", "--steps", "2", "--out", str(out), "--set",
                "data.batch_size=4", "--set", "data.num_workers=0", "--set", "train.val_batches=0",
                "--set", "train.log_every=1", "--set", f"data.cache={tmp_path / 'c'}"]) == 0
    said = capsys.readouterr()
    assert "mixed precision bf16 (auto: this CPU computes bf16 natively" in said.out + said.err
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # `accelerate launch --mixed_precision bf16` chose it
    assert run(["--objective", "dino", "--backbone", "vit", "--steps", "1", "--out", str(tmp_path / "told"), "--set",
                "data.batch_size=4", "--set", "data.num_workers=0", "--set", "train.val_batches=0",
                "--set", f"data.cache={tmp_path / 'c'}"]) == 0
    said = capsys.readouterr()
    assert "mixed precision bf16, device cpu" in said.out + said.err
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
