"""Shared fixtures: the registry sweeps and tiny inputs for any backbone."""

from __future__ import annotations

import os

import pytest
import torch

import ssl_vit

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_backbones() -> list[str]:
    """Every family's `<name>_tiny` preset: what the conformance sweeps run on."""
    return [n for n in ssl_vit.list_backbones() if n.endswith("_tiny")]


def make_input(model: ssl_vit.Backbone, size: tuple[int, ...] | None = None, batch: int = 2,
               seed: int = 0) -> torch.Tensor:
    """A random batch for `model` at `size` (default: its default size)."""
    size = tuple(model.default_size if size is None else size)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.in_channels, *size, generator=g)


def second_size(model: ssl_vit.Backbone) -> tuple[int, ...]:
    """Another valid input size: one `size_multiple` taller and wider than the default."""
    size = list(model.default_size)
    m = model.size_multiple
    size[-2] += m
    size[-1] += 2 * m
    return tuple(size)


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ssl_vit")
