"""Checkpoints: everything needed to continue a run bit for bit, written atomically, verified on every load,
read without pickle.

A checkpoint is a folder `<out>/checkpoints/step_XXXXXXX/`:
- `objective.safetensors`: the objective's state dict (backbone, heads, teacher, centres, buffers);
- `optimizer.pt`, `scaler.pt`: state dicts, read back with `torch.load(..., weights_only=True)`;
- `rng.pt`: the RNG states (torch, CUDA, numpy, Python) of every process, gathered on rank 0;
- `state.json`: step, run id, data position (batches consumed per process), schedule, names, world size;
- `config.yaml`: the resolved config;
- `checksums.json`: sha256 and size of each file above, written last (`ssl_vit.files`).
Under `train.strategy: fsdp` the weights and the optimizer state are sharded: `sharded/` (SHARDED_DIR) replaces
`objective.safetensors` and `optimizer.pt`, a `torch.distributed.checkpoint` folder where every process writes its
own shards (`__<rank>_0.distcp`) and rank 0 the `.metadata`; the other files and the manifest (which lists the
shards too) are the same, and `load_objective_weights` reads it back in one process for export and restore.
It is written under a temporary name and renamed (`ssl_vit.files.atomic_dir`); `checkpoints/latest` (a
one-line file, replaced atomically) names the newest one. A checkpoint holding a non-finite tensor is never
written. Pruning keeps the newest `keep` checkpoints of the same run (by run id and step number).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ssl_vit import CorruptCheckpoint
from ssl_vit.files import MANIFEST, atomic_dir, atomic_write_text, remove_stale_temps, verify_manifest, write_manifest

from . import sharded_io
from .config import dump
from .errors import DivergedError, LaunchError
from .export_backbone import state_for_safetensors

LATEST = "latest"
OBJECTIVE_FILE = "objective.safetensors"
SHARDED_DIR = "sharded"  # FSDP runs: torch.distributed.checkpoint of {"model": ..., "optim": ...}


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


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def step_folders(out_dir: str | Path) -> list[Path]:
    """Every `step_*` folder of an output folder, newest (highest step) first."""
    root = checkpoint_root(out_dir)
    found = [p for p in root.glob("step_*") if p.is_dir() and _step_of(p) >= 0] if root.is_dir() else []
    return sorted(found, key=_step_of, reverse=True)


def newest_intact(out_dir: str | Path, below: Path | None = None) -> Path | None:
    """The newest checkpoint whose checksums verify (older than `below` when given), or None."""
    for path in step_folders(out_dir):
        if below is not None and _step_of(path) >= _step_of(below):
            continue
        try:
            verify_manifest(path)
        except CorruptCheckpoint:
            continue
        return path
    return None


def latest(out_dir: str | Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names (not verified), or None."""
    pointer = checkpoint_root(out_dir) / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        path = checkpoint_root(out_dir) / name
        if name.startswith("step_") and path.is_dir():
            return path
    return None


def verified(path: Path, out_dir: Path | None = None) -> Path:
    """`path` if its checksums verify; else CorruptCheckpoint naming the damaged file and, where there is one,
    the newest intact checkpoint to resume from instead."""
    try:
        verify_manifest(path)
    except CorruptCheckpoint as err:
        older = newest_intact(out_dir if out_dir is not None else path.parent.parent, below=path)
        hint = f"; the newest intact checkpoint is {older}: resume it with --resume {older}" if older else \
            "; no intact checkpoint is left"
        raise CorruptCheckpoint(f"{err}{hint}") from None
    return path


def find_checkpoint(target: str | Path) -> Path | None:
    """A checkpoint folder, or the latest checkpoint of a run folder (the newest intact one when the
    `latest` pointer is missing); None when `target` holds none. Not verified."""
    path = Path(target)
    if is_checkpoint(path):
        return path
    found = latest(path)
    if found is None and step_folders(path):
        found = newest_intact(path) or step_folders(path)[0]
    return found


def resolve_resume(target: str, out_dir: str | Path) -> Path:
    """`--resume` (target "latest": the newest in --out) or `--resume PATH` (a checkpoint folder or an
    output folder) -> the verified checkpoint folder; LaunchError / CorruptCheckpoint otherwise."""
    where = Path(out_dir) if target == LATEST else Path(target)
    found = find_checkpoint(where)
    if found is None:
        if target == LATEST:
            raise LaunchError(f"--resume: no checkpoint in {checkpoint_root(out_dir)} "
                              "(give a checkpoint path, or drop --resume to start a new run)")
        raise LaunchError(f"--resume {target} is not a checkpoint (a folder with objective.safetensors, or an "
                          "output folder with checkpoints/)")
    return verified(found, found.parent.parent)


def read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpoint(f"checkpoint {path} has an unreadable state.json: {err}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CorruptCheckpoint(f"checkpoint {path}: state.json holds no step")
    return state


def check_compatible(state: Mapping[str, Any], cfg: Any, backbone: str, path: Path) -> None:
    """LaunchError when a checkpoint belongs to another backbone, objective or schedule."""
    for key, now in (("backbone", backbone), ("objective", cfg.objective)):
        if state.get(key) != now:
            raise LaunchError(f"--resume {path} belongs to {key} '{state.get(key)}', not '{now}'")
    if (state.get("backbone_args") or {}) != cfg.backbone_args:
        raise LaunchError(f"--resume {path} was trained with backbone_args {state.get('backbone_args')}, "
                          f"not {cfg.backbone_args}")
    was = "fsdp" if (path / SHARDED_DIR).is_dir() else "ddp"
    if was != cfg.train.strategy:
        raise LaunchError(f"--resume {path} was written by a train.strategy={was} run; resume it with "
                          f"--set train.strategy={was} (weights carry over between strategies only through --init "
                          "from an export)")
    if state.get("total_steps") != cfg.train.steps:
        raise LaunchError(f"--resume {path}: that run schedules {state.get('total_steps')} steps, this one "
                          f"{cfg.train.steps}; pass --steps {state.get('total_steps')}")


def clean_temporaries(out_dir: str | Path) -> list[Path]:
    """Remove what interrupted checkpoint and export writes left behind (main process, at start)."""
    removed = []
    for folder in (Path(out_dir), checkpoint_root(out_dir)):
        if folder.is_dir():
            removed += remove_stale_temps(folder)
            removed += [p for p in folder.glob(".tmp-step_*")]  # the layout of earlier versions
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    return removed


def is_checkpoint(path: Path) -> bool:
    """A checkpoint folder (what `checkpoint.save` writes), as opposed to a run or export folder."""
    if not path.is_dir() or (path / "backbone.json").is_file():  # an export also has checksums.json
        return False
    return any((path / name).is_file() for name in (OBJECTIVE_FILE, "state.json", MANIFEST))


def _sharded_metadata(path: Path) -> dict[str, Any]:
    """{flat key: storage metadata} of a checkpoint's SHARDED_DIR ("model.<name>", "optim.state.<name>.<key>")."""
    try:
        return dict(sharded_io.read_metadata(path / SHARDED_DIR).state_dict_metadata)
    except CorruptCheckpoint:
        raise
    except Exception as err:  # a damaged .metadata: one line, not torch's unpickler traceback
        raise CorruptCheckpoint(f"checkpoint {path}: cannot read {SHARDED_DIR}/.metadata: "
                                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def read_sharded_weights(objective: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors of a sharded checkpoint's model, read in this one process (no collective):
    {name: tensor shaped like the objective's}; LaunchError naming missing / unexpected keys or a shape."""
    saved = {k[len("model."):]: v for k, v in _sharded_metadata(path).items() if k.startswith("model.")}
    own = objective.state_dict()
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise LaunchError(f"checkpoint {path} does not fit this model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    for name, meta in saved.items():
        size = tuple(getattr(meta, "size", ()))  # tensors carry a size; other entries (bytes) have none
        if size != tuple(own[name].shape):
            raise LaunchError(f"checkpoint {path} does not fit this model: {name} is {list(size)} there, "
                              f"{list(own[name].shape)} here")
    weights = {k: torch.empty_like(v, device="cpu") for k, v in own.items()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            sharded_io.load({"model": weights}, path / SHARDED_DIR, no_dist=True)
    except CorruptCheckpoint:
        raise
    except Exception as err:
        raise CorruptCheckpoint(f"checkpoint {path}: cannot read {SHARDED_DIR}: {str(err).splitlines()[0]}") from None
    return weights


def load_objective_weights(objective: torch.nn.Module, path: Path) -> None:
    """Load `path/objective.safetensors` (or the shards of an FSDP run, gathered in this process) into the
    objective, strictly; LaunchError when it does not fit."""
    if (path / SHARDED_DIR).is_dir():
        weights = read_sharded_weights(objective, path)
    else:
        try:
            weights = load_file(str(path / OBJECTIVE_FILE))
        except (OSError, SafetensorError) as err:
            raise CorruptCheckpoint(f"checkpoint {path}: cannot read {OBJECTIVE_FILE}: {err}") from None
    try:
        missing, unexpected = objective.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatch: another preset or other constructor arguments
        first = str(err).strip().splitlines()[-1].strip()
        raise LaunchError(f"checkpoint {path} does not fit this model: {first}") from None
    if missing or unexpected:
        raise LaunchError(f"checkpoint {path} does not fit this model: missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")


# ---- writing and reading ------------------------------------------------------------------------
def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating tensors holding NaN or inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save(out_dir: str | Path, *, step: int, objective: torch.nn.Module | Mapping[str, torch.Tensor], optimizer,
         scaler, rng_states: list, state: dict[str, Any], config: Mapping[str, Any], keep: int = 2) -> Path:
    """Write `checkpoints/step_<step>` atomically with its checksums, point `latest` at it and prune (main
    process only). DivergedError, with nothing written, when a weight is not finite.

    objective: the module, or its full state dict (gathered under FSDP / DeepSpeed); optimizer None:
    not saved (sharded optimizers; such a checkpoint cannot be resumed). `state["run_id"]` names the run:
    pruning only ever removes older checkpoints of the same run."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    if isinstance(objective, torch.nn.Module):
        tensors = state_for_safetensors(objective)
    else:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in objective.items()}
    bad = non_finite(tensors)
    if bad:
        raise DivergedError(f"step {step}: {len(bad)} weights are not finite (first: {bad[0]}); no checkpoint "
                            "written, the last good one is kept")
    with atomic_dir(root / name) as tmp:
        save_file(tensors, str(tmp / "objective.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        _write_run_files(tmp, step=step, scaler=scaler, rng_states=rng_states, state=state, config=config)
    atomic_write_text(root / LATEST, name + "\n")
    prune(out_dir, run_id=state.get("run_id"), keep=keep)
    return root / name


def _write_run_files(tmp: Path, *, step: int, scaler, rng_states: list, state: dict[str, Any],
                     config: Mapping[str, Any]) -> None:
    """The files every checkpoint has besides the weights (scaler, RNGs, state.json, config.yaml), then the
    manifest of everything in `tmp`."""
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save({f"rank_{i}": s for i, s in enumerate(rng_states)}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    dump(config, tmp / "config.yaml")
    write_manifest(tmp)


def save_sharded(out_dir: str | Path, *, step: int, shards: Mapping[str, Any], rng_states: list,
                 state: dict[str, Any], config: Mapping[str, Any], keep: int = 2) -> Path:
    """FSDP: write `checkpoints/step_<step>` with `shards` ({"model": ..., "optim": ...} of sharded state dicts)
    in SHARDED_DIR. A collective: every process calls it and writes its own shards into rank 0's temporary
    folder (one file system for all nodes); rank 0 writes the rest and the manifest, renames the folder into
    place, points `latest` at it and prunes, as `save` does. `rng_states` and `state` matter on rank 0 only."""
    root = checkpoint_root(out_dir)
    name = f"step_{step:07d}"
    main = dist.get_rank() == 0
    with atomic_dir(root / name) if main else contextlib.nullcontext() as tmp:
        box = [str(tmp) if main else None]
        dist.broadcast_object_list(box, src=0)
        dcp.save(dict(shards), checkpoint_id=str(Path(box[0]) / SHARDED_DIR))
        dist.barrier()  # every shard is written before rank 0 lists them in the manifest
        if main:
            _write_run_files(tmp, step=step, scaler=None, rng_states=rng_states, state=state, config=config)
    if main:
        atomic_write_text(root / LATEST, name + "\n")
        prune(out_dir, run_id=state.get("run_id"), keep=keep)
    dist.barrier()
    return root / name


def prune(out_dir: str | Path, *, run_id: str | None, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (by step) of run `run_id`; other runs' are kept."""
    mine = []
    for path in step_folders(out_dir):
        try:
            if json.loads((path / "state.json").read_text()).get("run_id") == run_id:
                mine.append(path)
        except (OSError, ValueError):
            continue  # unreadable: not provably ours, so never deleted here
    for path in mine[keep:]:
        # renamed aside first: a crash mid-delete leaves a temporary that the next start removes, never a
        # half-deleted step_* folder that looks like a damaged checkpoint
        aside = path.parent / f".{path.name}.old-{secrets.token_hex(4)}"
        try:
            os.replace(path, aside)
        except OSError:
            aside = path
        shutil.rmtree(aside, ignore_errors=True)
    return mine[keep:]


def _load_pt(path: Path, name: str) -> Any:
    try:
        return torch.load(path / name, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign: one line, never a traceback from torch's unpickler
        raise CorruptCheckpoint(f"checkpoint {path}: cannot read {name}: {str(err).splitlines()[0]}") from None


def load(path: Path, *, objective: torch.nn.Module, optimizer, scaler, rank: int) -> dict[str, Any]:
    """Restore a verified checkpoint into the (unwrapped) objective, optimizer, scaler and this process's RNG."""
    state = read_state(path)
    if (path / SHARDED_DIR).is_dir():
        raise LaunchError(f"checkpoint {path} holds the shards of a train.strategy=fsdp run; resume it with "
                          "train.strategy=fsdp (or start a ddp run from its export with --init)")
    load_objective_weights(objective, path)
    if not (path / "optimizer.pt").is_file():
        raise LaunchError(f"checkpoint {path} holds no optimizer state (written under FSDP or DeepSpeed); "
                          "exact resume is supported for DDP runs")
    optimizer.load_state_dict(_load_pt(path, "optimizer.pt"))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(_load_pt(path, "scaler.pt"))
    restore_rng(path, rank)
    return state


def load_sharded(path: Path, *, objective: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 rank: int) -> dict[str, Any]:
    """FSDP: restore a verified sharded checkpoint into the sharded objective and its optimizer (a collective:
    every process reads the shards it holds, whatever the saving processes held) and this process's RNG.
    The optimizer keeps state only for the parameters that had it when saved (torch's state-dict helpers
    give every parameter a zero state first; a parameter that had no gradient yet, e.g. DINO's frozen last
    layer, must start its Adam moments and step count when it gets one, as in an uninterrupted run)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = read_state(path)
    if not (path / SHARDED_DIR).is_dir():
        raise LaunchError(f"checkpoint {path} was written by a train.strategy=ddp run; resume it with "
                          "train.strategy=ddp (or start the fsdp run from its export with --init)")
    metadata = _sharded_metadata(path)
    folder = str(path / SHARDED_DIR)
    model = get_model_state_dict(objective)
    try:
        sharded_io.load({"model": model}, folder)
    except CorruptCheckpoint:
        raise
    except Exception as err:  # shapes or names that differ: another preset or other arguments
        raise LaunchError(f"checkpoint {path} does not fit this model: {str(err).strip().splitlines()[-1]}") \
            from None
    set_model_state_dict(objective, model)
    optim = get_optimizer_state_dict(objective, optimizer)
    sharded_io.load({"optim": optim}, folder, allow_partial_load=True)
    set_optimizer_state_dict(objective, optimizer, optim)
    saved = {k[len("optim.state."):].rsplit(".", 1)[0] for k in metadata if k.startswith("optim.state.")}
    for name, p in objective.named_parameters():
        if name not in saved:
            optimizer.state.pop(p, None)
    restore_rng(path, rank)
    return state


def restore_rng(path: Path, rank: int) -> None:
    """Set this process's RNG states from the checkpoint's rng.pt."""
    rngs = _load_pt(path, "rng.pt")
    key = f"rank_{rank}"
    if key not in rngs:
        raise LaunchError(f"checkpoint {path} was written by {len(rngs)} processes; rank {rank} has no RNG state "
                          "(resume with the same number of processes)")
    set_rng_state(rngs[key])


def remove_run(out_dir: str | Path) -> None:
    """`--overwrite`: delete the checkpoints, export and logs another run left in `out_dir`."""
    out = Path(out_dir)
    for name in ("checkpoints", "export", "tensorboard", "visualize"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "config.yaml"):
        (out / name).unlink(missing_ok=True)
