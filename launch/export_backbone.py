"""Export a trained backbone: `backbone.safetensors` + `backbone.json` + the resolved `config.yaml`.

The format is ssl_vit's (`ssl_vit.export.save_backbone`, read back by `ssl_vit.load_backbone`):
`backbone.json` holds the registry name and its keyword overrides, the class, the objective and the
step; `checksums.json` the sha256 of every file. `save_backbone` writes the folder atomically, so an
existing export is replaced whole or not at all. Shared with export.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ssl_vit.export import save_backbone

from .config import _plain

__all__ = ["export_backbone", "state_for_safetensors"]


def state_for_safetensors(module: nn.Module) -> dict:
    """A state dict safetensors can write: CPU, contiguous, no shared storage (tied weights are cloned)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def export_backbone(module: nn.Module, out_dir: str | Path, *, registry_name: str | None,
                    overrides: Mapping[str, Any] | None, objective: str | None, step: int,
                    config: Mapping[str, Any] | None) -> Path:
    """Write the export folder `out_dir` (replaced atomically if it exists); returns its path.

    `registry_name` / `overrides` rebuild the module with `ssl_vit.create_backbone`; None keeps what
    the module recorded (its class and `init_config`).
    """
    module = getattr(module, "module", module)  # DDP / accelerate wrappers
    if registry_name is not None:
        module.registry_name = registry_name
        module.registry_overrides = dict(overrides or {})
    return save_backbone(module, out_dir, objective=objective, step=int(step),
                         config=_plain(config) if config is not None else None)
