"""What a run will do, checked before anything is written: data, output folder, resume target.

`plan(cfg, resume=..., overwrite=...)` resolves the shards (the embedded digits when none are given), the
output folder (writable, not a file, not another run's unless `--overwrite`) and the checkpoint to resume
(verified: a damaged one is `ssl_vit.CorruptCheckpoint` naming the file and the newest intact checkpoint).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .build import _KIND_WORDS, pick_backbone_name
from .config import RunConfig
from .data import check_shards, expand_shards
from .digits import digits_shards
from .errors import LaunchError


@dataclass
class Plan:
    cfg: RunConfig
    out: Path
    train_urls: list[str]
    val_urls: list[str]
    backbone_name: str
    run_id: str
    requested_backbone: str = ""  # what --backbone named (backbone_name may be its tiny preset)
    resume: Path | None = None
    resume_state: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    out_existed: bool = True  # whether --out was there before this run (a failed fresh start removes what it made)
    data_kind: str | None = None  # "image" / "video" as found in local shards; None: not checked (URLs)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LaunchError(f"--out {out} is a file; give a folder for the run's checkpoints, export and logs")
    probe = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise LaunchError(f"--out {out}: {probe} is not writable; choose another --out")
    try:  # permission bits do not bind root, and read-only mounts pass os.access: try it (an unnamed file)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise LaunchError(f"--out {out}: cannot write in {probe} ({err.strerror or err}); choose another --out") \
            from None


def _holds_a_run(out: Path) -> bool:
    return bool(ckpt.step_folders(out)) or (out / "export").exists()


def plan(cfg: RunConfig, resume: str | None = None, overwrite: bool = False) -> Plan:
    """Check everything that can be checked before touching the output folder."""
    data = cfg.data
    if data.train is None:
        train_spec, digits_val = digits_shards(data.cache)
        cfg = cfg.replace(data={"train": train_spec, "val": data.val if data.val is not None else digits_val})
        data = cfg.data
    train_urls = expand_shards(data.train)
    kind = check_shards(train_urls)
    val_urls: list[str] = []
    if data.val:
        val_urls = expand_shards(data.val)
        val_kind = check_shards(val_urls)
        if kind and val_kind and val_kind != kind:
            raise LaunchError(f"training shards hold {_KIND_WORDS[kind]} but validation shards {data.val} hold "
                              f"{_KIND_WORDS[val_kind]}")
        kind = kind or val_kind
    out = Path(cfg.out or f"runs/{cfg.objective}-{cfg.backbone}")
    _check_out(out)
    requested, backbone = cfg.backbone, pick_backbone_name(cfg)
    cfg = cfg.replace(out=str(out), backbone=backbone)
    if resume is not None and overwrite:
        raise LaunchError("--resume and --overwrite exclude each other: continue the run, or start it over")
    run = Plan(cfg, out, train_urls, val_urls, backbone, run_id=uuid.uuid4().hex, requested_backbone=requested,
               overwrite=overwrite, data_kind=kind, out_existed=out.exists())
    if resume is not None:
        run.resume = ckpt.resolve_resume(resume, out)
        run.resume_state = ckpt.read_state(run.resume)
        ckpt.check_compatible(run.resume_state, cfg, backbone, run.resume)
        run.run_id = str(run.resume_state.get("run_id") or run.run_id)
    elif _holds_a_run(out) and not overwrite:
        raise LaunchError(f"{out} already holds checkpoints or an export of another run; pass --resume to continue "
                          "it, --overwrite to replace it, or choose another --out")
    return run
