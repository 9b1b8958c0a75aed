"""Activation checkpointing per shared block (`Backbone.set_grad_checkpointing`): the same loss and the
same gradients as without it (dropout and drop-path included), fewer activations kept for backward, no
recomputation outside training, and one plain line for families without shared blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ssl_vit
from ssl_vit.layers import Block, set_block_checkpointing

# Dropout and stochastic depth switched on, so the recompute must replay the same random draws.
CASES = {
    "vit_tiny": dict(dropout=0.1, drop_path=0.2),
    "cait_tiny": dict(dropout=0.1, layer_dropout=0.2),
    "deep_vit_tiny": dict(dropout=0.1, drop_path=0.2),
}


def _step(model: nn.Module, loss_fn, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one training forward+backward from a fixed RNG state."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(model, x)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _features_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.forward_features(x)
    return out.patch_tokens.square().mean() + out.pooled.sin().sum()


def _assert_same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict]) -> None:
    assert torch.allclose(a[0], b[0], rtol=0, atol=1e-6), (a[0], b[0])
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], rtol=1e-6, atol=1e-6), name


def _saved_bytes(model: nn.Module, loss_fn, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward during one training forward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.train()
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model, x)
    return total


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_loss_and_gradients(name):
    torch.manual_seed(1)
    plain = ssl_vit.create_backbone(name, **CASES[name])
    ckpt = copy.deepcopy(plain)
    assert plain.supports_grad_checkpointing
    ckpt.set_grad_checkpointing()
    blocks = [m for m in ckpt.modules() if isinstance(m, Block)]
    assert blocks and all(b.grad_checkpointing for b in blocks)
    assert not any(b.grad_checkpointing for b in plain.modules() if isinstance(b, Block))
    x = torch.randn(2, 3, 32, 32)
    ref = _step(plain, _features_loss, x)
    _assert_same(ref, _step(ckpt, _features_loss, x))
    assert not torch.allclose(ref[0], _step(plain, _features_loss, x, seed=1)[0])  # the dropout draws matter
    assert _saved_bytes(ckpt, _features_loss, x) < 0.7 * _saved_bytes(plain, _features_loss, x)


def test_switched_off_again_and_only_while_training(monkeypatch):
    model = ssl_vit.create_backbone("vit_tiny")
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 3, 32, 32)
    model.set_grad_checkpointing(True)
    model.train()
    model(x)
    depth = len(calls)
    assert depth == sum(isinstance(m, Block) for m in model.modules()) > 0
    model.eval()
    model(x)
    model.train()
    with torch.no_grad():
        model(x)
    assert len(calls) == depth                       # no recompute at eval or without grad
    model.set_grad_checkpointing(False)
    model(x)
    assert len(calls) == depth


def test_mae_step_on_top():
    torch.manual_seed(2)
    plain = ssl_vit.create_objective("mae", ssl_vit.create_backbone("vit_tiny", dropout=0.1, drop_path=0.2))
    ckpt = copy.deepcopy(plain)
    ckpt.backbone.set_grad_checkpointing()
    x = torch.rand(2, 3, 32, 32)

    def mae_loss(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images)

    _assert_same(_step(plain, mae_loss, x), _step(ckpt, mae_loss, x))
    # The whole objective (its decoder's blocks too) can be switched with the layers helper.
    assert set_block_checkpointing(ckpt, True) > sum(isinstance(m, Block) for m in ckpt.backbone.modules())
    _assert_same(_step(plain, mae_loss, x), _step(ckpt, mae_loss, x))


def test_family_without_shared_blocks_says_so():
    model = ssl_vit.create_backbone("cvt_tiny")
    assert not model.supports_grad_checkpointing
    model.set_grad_checkpointing(False)              # switching off is always fine
    with pytest.raises(ssl_vit.IncompatibleBackbone, match="no ssl_vit.layers blocks to checkpoint"):
        model.set_grad_checkpointing(True)
