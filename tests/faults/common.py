"""Helpers of the fault-injection suite (tests/faults, docs/reliability.md).

Runs happen in this process (`launch.cli.main`, accelerate's state reset between runs) except where a
process has to die: `kill_run` starts `python -c KILLER`, which patches one function to SIGKILL its own
process on the N-th matching call and then runs `launch.cli.main`. No production code has a fault hook.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Patches `module:attr.path` so that the N-th call whose arguments (joined with " | ") match `match` kills
# the process: before the call, after it, or (for rmtree) after deleting one file of the folder.
KILLER = r"""
import importlib, json, os, re, signal, sys
spec = json.loads(sys.argv[1])
mod, _, attr = spec["target"].partition(":")
owner = importlib.import_module(mod)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
orig = getattr(owner, name)
seen = [0]
def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
def wrapper(*args, **kwargs):
    text = " | ".join(str(a) for a in args if isinstance(a, (str, os.PathLike)))
    if re.search(spec.get("match") or "", text):
        seen[0] += 1
        if seen[0] == spec["nth"]:
            if spec["mode"] == "before":
                die()
            if spec["mode"] == "partial":
                files = sorted(p for p in os.listdir(args[0]))
                os.unlink(os.path.join(args[0], files[0]))
                die()
            orig(*args, **kwargs)
            die()
    return orig(*args, **kwargs)
setattr(owner, name, wrapper)
from launch.cli import main
sys.exit(main(sys.argv[2:]))
"""


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def call(fn: Callable[[list[str]], int], args: list[str]) -> tuple[int, list[str], str]:
    """Run a command's `main(args)` in this process: (exit status, stderr lines, stdout)."""
    reset_accelerate()
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            rc = fn(args)
        except SystemExit as stop:  # argparse's own exits
            rc = stop.code if isinstance(stop.code, int) else 1
    lines = [line for line in err.getvalue().splitlines() if line.strip() and not _progress(line)]
    return rc, lines, out.getvalue()


def _progress(line: str) -> bool:
    """tqdm's progress bar lines (they go to stderr)."""
    return "step/s]" in line or "it/s]" in line or line.startswith("pretrain:")


def pretrain(args: list[str]) -> tuple[int, list[str], str]:
    from launch.cli import main

    return call(main, args)


def kill_run(target: str, args: list[str], *, mode: str = "before", match: str = "", nth: int = 1,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """`pretrain.py args` in a subprocess that SIGKILLs itself on the nth matching call of `target`."""
    spec = json.dumps({"target": target, "mode": mode, "match": match, "nth": nth})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", KILLER, spec, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def tree_hash(folder: Path) -> dict[str, str]:
    """Every path below `folder` -> sha256 of its bytes ("dir" for folders): equal means byte-identical."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    found = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        found[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) of every training record of metrics.jsonl, in file order."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files and folders of interrupted writes (`.X.tmp-*`, `.X.old-*`) in a run folder."""
    run_dir = Path(run_dir)
    return sorted(p.name for folder in (run_dir, run_dir / "checkpoints") if folder.is_dir()
                  for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def finite_on_disk(run_dir: Path) -> list[str]:
    """Names of non-finite tensors in every checkpoint and export below `run_dir` (empty: all finite)."""
    import torch
    from safetensors.torch import load_file

    bad = []
    for path in Path(run_dir).rglob("*.safetensors"):
        bad += [f"{path}:{k}" for k, v in load_file(path).items()
                if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    for path in Path(run_dir).rglob("optimizer.pt"):
        state = torch.load(path, weights_only=True)["state"]
        bad += [f"{path}:{i}.{k}" for i, s in state.items() for k, v in s.items()
                if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return bad


def tiny(cache: Path, *extra: str) -> list[str]:
    """The tiniest run: MAE on vit_tiny, 4 images a step, no workers, a record every step, no validation."""
    return ["--objective", "mae", "--backbone", "vit", "--set", "data.batch_size=4", "--set", "data.num_workers=0",
            "--set", "train.log_every=1", "--set", "train.val_batches=0", "--set", f"data.cache={cache}", *extra]


def one_error_line(lines: list[str], *needles: str) -> str:
    """The single stderr line; asserts there is exactly one, without a traceback, holding every needle."""
    assert len(lines) == 1, lines
    line = lines[0]
    assert "Traceback" not in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    return line
