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
