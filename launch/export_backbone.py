"""Export a trained backbone: `backbone.safetensors` + `backbone.json` + the resolved `config.yaml`.

The format is ssl_vit's (`ssl_vit.export.save_backbone`, read back by `ssl_vit.load_backbone`):
`backbone.json` holds the registry name and its keyword overrides, the class, the objective and the
step. Here the folder is written under a temporary name and renamed, so an existing export is
replaced whole or not at all. Shared with export.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        save_backbone(module, tmp, objective=objective, step=int(step),
                      config=_plain(config) if config is not None else None)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
