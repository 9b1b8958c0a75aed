"""Checkpoints: everything needed to continue a run bit for bit, written atomically, loaded without pickle.

A checkpoint is a folder `<out>/checkpoints/step_XXXXXXX/`:
- `objective.safetensors`: the objective's state dict (backbone, heads, teacher, centres, buffers);
- `optimizer.pt`, `scaler.pt`: state dicts, read back with `torch.load(..., weights_only=True)`;
- `rng.pt`: the RNG states (torch, CUDA, numpy, Python) of every process, gathered on rank 0;
- `state.json`: step, data position (batches consumed per process), schedule, names, world size;
- `config.yaml`: the resolved config.
It is written to `.tmp-step_XXXXXXX` and renamed; `checkpoints/latest` (a one-line file, itself
replaced atomically) names the newest one, so a crash never leaves a half-written "latest".
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import dump
from .errors import LaunchError
from .export_backbone import state_for_safetensors

LATEST = "latest"


# ---- RNG states as plain tensors (so torch.load(weights_only=True) reads them) ----------------
def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *mt], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"].tolist()
    gauss = float(state["python_gauss"][0])
    random.setstate((py[0], tuple(py[1:]), None if np.isnan(gauss) else gauss))
    pos, has_gauss, cached = state["numpy_extra"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---- locating checkpoints ----------------------------------------------------------------------
def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of an output folder, or None."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "state.json").is_file():
            return path
    return None


def resolve_resume(target: str, out_dir: str | Path) -> Path:
    """`--resume` (target "latest": the newest in --out) or `--resume PATH` (a checkpoint folder or an
    output folder) -> the checkpoint folder; LaunchError when it is not a checkpoint."""
    if target == LATEST:
        found = latest(out_dir)
        if found is None:
            raise LaunchError(f"--resume: no checkpoint in {checkpoint_root(out_dir)} "
                              "(give a checkpoint path, or drop --resume to start a new run)")
        return found
    path = Path(target)
    if (path / "state.json").is_file() and (path / "objective.safetensors").is_file():
        return path
    found = latest(path) if path.is_dir() else None
    if found is not None:
        return found
    raise LaunchError(f"--resume {target} is not a checkpoint (a folder with state.json and "
                      "objective.safetensors, or an output folder with checkpoints/latest)")


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LaunchError(f"checkpoint {path} has an unreadable state.json: {err}") from None


def check_compatible(state: Mapping[str, Any], cfg: Mapping[str, Any], path: Path) -> None:
    """LaunchError when a checkpoint belongs to another backbone or objective."""
    for key, what in (("backbone", "backbone"), ("objective", "objective")):
        if state.get(key) != cfg.get(key):
            raise LaunchError(f"--resume {path} belongs to {what} '{state.get(key)}', not '{cfg.get(key)}'")
    if (state.get("backbone_args") or {}) != (cfg.get("backbone_args") or {}):
        raise LaunchError(f"--resume {path} was trained with backbone_args {state.get('backbone_args')}, "
                          f"not {cfg.get('backbone_args')}")


# ---- writing and reading ------------------------------------------------------------------------
def save(out_dir: str | Path, *, step: int, objective: torch.nn.Module | Mapping[str, torch.Tensor], optimizer,
         scaler, rng_states: list, state: dict[str, Any], config: Mapping[str, Any], keep: int = 2) -> Path:
    """Write `checkpoints/step_<step>` atomically and point `latest` at it (main process only).

    objective: the module, or its full state dict (gathered under FSDP / DeepSpeed); optimizer None:
    not saved (sharded optimizers; such a checkpoint cannot be resumed)."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final, tmp = root / name, root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if isinstance(objective, torch.nn.Module):
        tensors = state_for_safetensors(objective)
    else:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in objective.items()}
    save_file(tensors, str(tmp / "objective.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save({f"rank_{i}": s for i, s in enumerate(rng_states)}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    dump(config, tmp / "config.yaml")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    if keep and keep > 0:
        old = sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load(path: Path, *, objective: torch.nn.Module, optimizer, scaler, rank: int) -> dict[str, Any]:
    """Restore a checkpoint into the (unwrapped) objective, optimizer, scaler and this process's RNG."""
    state = read_state(path)
    try:
        weights = load_file(str(path / "objective.safetensors"))
    except Exception as err:
        raise LaunchError(f"checkpoint {path}: cannot read objective.safetensors: {err}") from None
    try:
        missing, unexpected = objective.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatch: another preset or other constructor arguments
        first = str(err).strip().splitlines()[-1].strip()
        raise LaunchError(f"checkpoint {path} does not fit this model: {first}") from None
    if missing or unexpected:
        raise LaunchError(f"checkpoint {path} does not fit this model: missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")
    if not (path / "optimizer.pt").is_file():
        raise LaunchError(f"checkpoint {path} holds no optimizer state (written under FSDP or DeepSpeed); "
                          "exact resume is supported for DDP runs")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
    rngs = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    key = f"rank_{rank}"
    if key not in rngs:
        raise LaunchError(f"checkpoint {path} was written by {len(rngs)} processes; rank {rank} has no RNG state "
                          "(resume with the same number of processes)")
    set_rng_state(rngs[key])
    return state
