"""FSDP2 (`train.strategy=fsdp`) end to end through `accelerate launch` on this machine: resume, DDP agreement, time.

What the CPU tests (tests/test_launch_fsdp.py, gloo, fp32) cannot show: the same checks over NCCL on N GPUs, in
bf16, with the memory each strategy takes. DINO on `--backbone` (the embedded digits, cached under
`--out`/cache; the run folders `--out`/{fsdp,fsdp_resumed,ddp} are deleted and made afresh), `--steps` steps of
`--batch` images per process, one metrics record a step. Three launches of N processes on one machine:

- (a) fsdp straight;  (b) fsdp stopped at steps // 2 (`train.stop_at`), then `--resume`d to the end;  (c) ddp.

(b) runs first, so the timed (a) and (c) find the data cache built. Printed: the per-step losses of each run;
max |loss (b) - loss (a)| (an exact resume: 0 up to float noise in fp32); max |loss (a) - loss (c)| (the same
training math, sharded or replicated); max |weight (a) - weight (c)| over the exports
(`export/backbone.safetensors`, the EMA teacher); the wall seconds of (a) and (c) (whole launches: start-up,
steps, checkpoint, export), their ratio, and the same for steps 2..S alone (metrics.jsonl timestamps); on CUDA,
rank 0's peak `torch.cuda.max_memory_allocated` as the runs log it (`train/peak_memory_mb`). Exit status 0
when the resume diff is <= 1e-5 (bf16: 1e-2) and the fsdp-vs-ddp loss diff <= 1e-3 (bf16: 5e-2), else 1; a
failed launch prints its stderr's tail and exits 1. In bf16 DDP autocasts fp32 weights while FSDP computes
with bf16 copies: close, not equal.

Run: `.venv/bin/python -m benchmarks.fsdp_check [--processes N] [--backbone vit_tiny] [--steps 6] [--batch 4]
[--precision no|bf16] [--out runs/fsdp_check]`; on GPUs, e.g. `--processes 2 --precision bf16
--backbone vit_small_patch16 --steps 20 --batch 32`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TIMEOUT = 1800
LIMITS = {"no": (1e-5, 1e-3), "bf16": (1e-2, 5e-2)}  # (resume, fsdp vs ddp) max |loss difference|


class LaunchFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(out: Path, cuda: bool) -> dict[str, str]:
    """The launched processes' environment: unbuffered output, no accelerate config file, one thread on CPUs."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", HF_HOME=str(out / "hf"))
    if not cuda:
        env["OMP_NUM_THREADS"] = "1"
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def pretrain_args(args: argparse.Namespace, run: Path, strategy: str, *extra: str) -> list[str]:
    sets = [f"data.cache={args.out / 'cache'}", f"data.batch_size={args.batch}", "data.num_workers=0",
            "train.log_every=1", "train.val_batches=0", f"train.strategy={strategy}",
            f"train.mixed_precision={args.precision}"]
    return ["pretrain.py", "--objective", "dino", "--backbone", args.backbone, "--steps", str(args.steps),
            "--out", str(run), *(x for s in sets for x in ("--set", s)), *extra]


def tail(stderr: str | bytes | None, lines: int = 30) -> str:
    """The launcher's one-line errors (`error: ...`, once, not per rank), then the last lines."""
    text = (stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or "").splitlines()
    said = list(dict.fromkeys(line for line in text[:-lines] if line.lower().startswith("error:")))
    return "\n".join([*said, *text[-lines:]])


def launch(args: argparse.Namespace, name: str, pretrain: list[str], env: dict[str, str]) -> float:
    """One `accelerate launch` of `args.processes` processes; its wall seconds (LaunchFailed on a non-zero exit)."""
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(args.processes), "--num_machines", "1",
           "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           "--mixed_precision", args.precision, "--dynamo_backend", "no", *pretrain]
    print(f"[{name}] {' '.join(pretrain)}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        raise LaunchFailed(f"[{name}] timed out after {TIMEOUT} s; its stderr ends:\n{tail(err.stderr)}") from None
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise LaunchFailed(f"[{name}] exited with {proc.returncode}; the end of its stderr:\n{tail(proc.stderr)}")
    print(f"[{name}] done in {seconds:.1f} s", flush=True)
    return seconds


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in records(run) if r.get("train/loss") is not None}


def max_diff(a: dict[int, float], b: dict[int, float]) -> float:
    """max |a - b| over the steps both have; inf when their steps differ (a run lost or repeated a step)."""
    if a.keys() != b.keys() or not a:
        return float("inf")
    return max(abs(a[s] - b[s]) for s in a)


def peak_memory(run: Path) -> float | None:
    values = [r["train/peak_memory_mb"] for r in records(run) if r.get("train/peak_memory_mb") is not None]
    return max(values) if values else None


def step_seconds(run: Path) -> float | None:
    """Seconds from step 1's record to the last one's (metrics.jsonl timestamps): the steps without start-up."""
    times = [r["time"] for r in records(run) if "train/loss" in r]
    return times[-1] - times[0] if len(times) > 1 else None


def weight_diff(a: Path, c: Path) -> float:
    wa, wc = (load_file(str(p / "export" / "backbone.safetensors")) for p in (a, c))
    if wa.keys() != wc.keys():
        print(f"exports differ in names: only fsdp {sorted(wa.keys() - wc.keys())[:5]}, "
              f"only ddp {sorted(wc.keys() - wa.keys())[:5]}")
        return float("inf")
    return max(float((wa[k].double() - wc[k].double()).abs().max()) for k in wa)


def main() -> int:
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=gpus if gpus >= 2 else 2)
    parser.add_argument("--backbone", default="vit_tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--out", type=Path, default=Path("runs/fsdp_check"))
    args = parser.parse_args()
    if args.processes < 2 or args.steps < 2:
        parser.error("FSDP needs --processes >= 2, and stopping half-way --steps >= 2")
    if not Path(ACCELERATE).is_file():
        parser.error(f"{ACCELERATE} is not installed next to this Python")
    args.out = args.out.resolve()
    runs = {name: args.out / name for name in ("fsdp", "fsdp_resumed", "ddp")}
    for run in runs.values():  # this script's own run folders: a new check starts them afresh (the cache stays)
        shutil.rmtree(run, ignore_errors=True)
    env = child_env(args.out, cuda)
    where = f"{gpus} CUDA device(s), NCCL" if cuda else f"CPU ({os.cpu_count()} cores), gloo"
    print(f"FSDP2 check: {args.processes} processes on {where}, {args.backbone}, DINO, {args.steps} steps of "
          f"batch {args.batch}/process, precision {args.precision}, torch {torch.__version__}")
    half = args.steps // 2
    wall: dict[str, float] = {}
    try:
        launch(args, f"b: fsdp stopped at {half}", pretrain_args(args, runs["fsdp_resumed"], "fsdp",
                                                                 "--set", f"train.stop_at={half}"), env)
        launch(args, "b: fsdp resumed", [*pretrain_args(args, runs["fsdp_resumed"], "fsdp"), "--resume"], env)
        wall["fsdp"] = launch(args, "a: fsdp straight", pretrain_args(args, runs["fsdp"], "fsdp"), env)
        wall["ddp"] = launch(args, "c: ddp straight", pretrain_args(args, runs["ddp"], "ddp"), env)
    except LaunchFailed as err:
        print(err)
        print("verdict: FAIL (a launch failed)")
        return 1

    loss = {name: losses(run) for name, run in runs.items()}
    print("\nstep  (a) fsdp        (b) resumed     (c) ddp")
    for step in sorted(set().union(*loss.values())):
        print(f"{step:4d}  " + "  ".join(f"{loss[n][step]:.8f}" if step in loss[n] else f"{'-':>10}"
                                         for n in runs))
    resume = max_diff(loss["fsdp"], loss["fsdp_resumed"])
    vs_ddp = max_diff(loss["fsdp"], loss["ddp"])
    weights = weight_diff(runs["fsdp"], runs["ddp"])
    limit_resume, limit_ddp = LIMITS[args.precision]
    print(f"\nmax |loss (b) - loss (a)|  resume       {resume:.3e}   (limit {limit_resume:g})")
    print(f"max |loss (a) - loss (c)|  fsdp vs ddp  {vs_ddp:.3e}   (limit {limit_ddp:g})")
    print(f"max |weight (a) - weight (c)|  exports  {weights:.3e}")
    print(f"wall seconds  fsdp {wall['fsdp']:.1f}   ddp {wall['ddp']:.1f}   fsdp/ddp {wall['fsdp'] / wall['ddp']:.2f}")
    steps = {n: step_seconds(runs[n]) for n in ("fsdp", "ddp")}
    if None not in steps.values() and steps["ddp"] > 0:
        print(f"steps 2..{args.steps} seconds (metrics timestamps)  fsdp {steps['fsdp']:.2f}   "
              f"ddp {steps['ddp']:.2f}   fsdp/ddp {steps['fsdp'] / steps['ddp']:.2f}")
    if cuda:
        peaks = {n: peak_memory(runs[n]) for n in ("fsdp", "ddp")}
        print("peak GPU memory (rank 0, max_memory_allocated)  " + "   ".join(
            f"{n} {p:.0f} MB" if p is not None else f"{n} not logged" for n, p in peaks.items()))
    else:
        print("peak GPU memory  n/a (no CUDA; metrics.jsonl's peak_memory_mb is rank 0's RSS here)")
    ok = resume <= limit_resume and vs_ddp <= limit_ddp
    print(f"verdict: {'PASS' if ok else 'FAIL'} (resume {resume:.1e} <= {limit_resume:g}: {resume <= limit_resume}, "
          f"fsdp vs ddp {vs_ddp:.1e} <= {limit_ddp:g}: {vs_ddp <= limit_ddp})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
