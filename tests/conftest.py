"""Shared fixtures: the registry sweeps and tiny inputs for any backbone."""

from __future__ import annotations

import os

import pytest
import torch

import ssl_vit

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Launcher runs in the tests compute in fp32 (what their exactness and parity checks compare) whatever the CPU:
# `mixed_precision: auto` would pick bf16 on CPUs with native bf16. The bf16 path has its own tests
# (test_precision.py), which remove this.
os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "no")


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


# ---- the fast tier (`make test-fast`, `pytest -m fast`): a few presets of every sweep, the loss parity tests
# and one end-to-end run with resume. `make test` runs everything.
FAST_PRESETS = {"vit_tiny", "simple_vit_tiny", "cvt_tiny", "max_vit_tiny", "vit_3d_tiny"}
FAST_FILES = {"test_losses_reconstruction.py", "test_dino_esvit_distill.py", "test_masking.py", "test_layers.py",
              "test_files.py", "test_launch_config.py", "test_registry.py"}
SWEEP_FILES = {"test_backbone_conformance.py", "test_objective_matrix.py"}
FAST_TESTS = {"test_launch_run.py::test_resume_repeats_the_per_step_losses",
              "test_launch_fsdp.py::test_fsdp_refuses_in_one_line",
              "test_launch_fsdp.py::test_accelerate_configs_parse"}


def _is_fast(item: pytest.Item) -> bool:
    file = item.path.name
    if file in FAST_FILES or f"{file}::{item.originalname}" in FAST_TESTS:
        return True
    if file in SWEEP_FILES:
        params = getattr(item, "callspec", None)
        names = {v for v in params.params.values() if isinstance(v, str)} if params is not None else set()
        return bool(names & FAST_PRESETS)
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_fast(item):
            item.add_marker(pytest.mark.fast)
