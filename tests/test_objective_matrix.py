"""One test swept over every registered `<name>_tiny` backbone x every registered objective.

Compatible pairs (the objective's `compatible(backbone)`) build with small settings and train one
step: a finite scalar loss, gradients reaching the backbone, an optimizer step that changes its
weights. Incompatible pairs must raise `IncompatibleBackbone` naming the missing capability.
Nothing here names a model or an objective: new ones are picked up from the registries.

Small settings: each objective class may carry `tiny_overrides`, a dict (or a classmethod returning
one) of constructor overrides that make it cheap enough for this sweep (e.g. a small DINO head).
"""

from __future__ import annotations

import math

import pytest
import torch

import ssl_vit
from ssl_vit import IncompatibleBackbone, ViewSpec
from ssl_vit.registry import OBJECTIVES

from .conftest import make_input, tiny_backbones

BACKBONES = tiny_backbones()
OBJECTIVE_NAMES = ssl_vit.list_objectives()


def tiny_overrides(factory) -> dict:
    """The objective's `tiny_overrides` (a dict attribute or a classmethod), or {}."""
    value = getattr(factory, "tiny_overrides", {})
    return dict(value() if callable(value) else value)


def test_registries_are_populated():
    assert BACKBONES and OBJECTIVE_NAMES


@pytest.mark.parametrize("objective", OBJECTIVE_NAMES)
@pytest.mark.parametrize("backbone_name", BACKBONES)
def test_objective_trains_one_step_or_refuses(backbone_name, objective):
    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone(backbone_name)
    factory = OBJECTIVES.get(objective)
    overrides = tiny_overrides(factory)
    if hasattr(factory, "compatible") and not factory.compatible(backbone):
        with pytest.raises(IncompatibleBackbone) as err:
            ssl_vit.create_objective(objective, backbone, **overrides)
        missing = set().union(*(set(req) - backbone.capabilities for req in getattr(factory, "requires", ())))
        message = str(err.value)
        if missing:
            assert any(cap in message for cap in missing), message
        return

    model = ssl_vit.create_objective(objective, backbone, **overrides).train()
    specs = list(model.view_specs())
    assert specs and all(isinstance(s, ViewSpec) for s in specs)

    x = make_input(backbone, batch=2)
    kwargs = {"labels": torch.zeros(2, dtype=torch.long)} if getattr(model, "needs_labels", False) else {}
    loss = model(x, **kwargs)
    assert loss.dim() == 0 and torch.isfinite(loss), loss
    assert isinstance(model.metrics, dict) and all(math.isfinite(float(v)) for v in model.metrics.values())

    loss.backward()
    trained = [p for p in backbone.parameters() if p.requires_grad]
    grads = [p.grad for p in trained if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "no gradient reached the backbone"

    before = [p.detach().clone() for p in trained]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.on_before_optimizer_step(0, 10)
    opt.step()
    model.on_step_end(0, 10)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trained)), "optimizer step left the backbone"
    assert isinstance(model.export_backbone(), torch.nn.Module)
