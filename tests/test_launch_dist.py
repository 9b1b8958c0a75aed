"""Launcher, distributed for real on CPU (gloo): two processes on one machine, and two single-process
"machines" on loopback started the way a multi-node job is. Both ranks read different shards, end with
identical weights, and only rank 0 writes checkpoints and logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TIMEOUT = 300


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"), PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def _args(tmp_path: Path, out: Path) -> list[str]:
    return ["pretrain.py", "--objective", "dino", "--backbone", "vit", "--steps", "3", "--out", str(out),
            "--set", f"data.cache={tmp_path / 'cache'}", "--set", "data.batch_size=8",
            "--set", "train.val_batches=0", "--set", "train.log_every=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(out: Path, stdout: str) -> None:
    state = json.loads((out / "checkpoints" / "step_0000003" / "state.json").read_text())
    ranks = state["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and state["world_size"] == 2
    assert ranks[0]["weights_fingerprint"] == ranks[1]["weights_fingerprint"]   # identical replicas
    keys = [set(r["first_keys"]) for r in ranks]
    assert keys[0] and keys[1] and not keys[0] & keys[1]                       # different data
    manifest = json.loads((out.parent / "cache" / "digits-v1" / "manifest.json").read_text())
    per_shard = -(-manifest["train_samples"] // 8)
    shards = [{int(k[len("train"):]) // per_shard for k in ks} for ks in keys]
    assert not shards[0] & shards[1]                                            # from different shards
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]                            # written once, by rank 0
    assert len(list((out / "tensorboard").glob("events.*"))) == 1
    assert stdout.count("exported backbone:") == 1 and stdout.count("done:") == 1
    assert "processes 2" in stdout and (out / "export" / "backbone.safetensors").is_file()
    assert not [p for p in out.rglob("*") if p.name.startswith((".tmp", ".export"))]


def test_two_processes_one_machine(tmp_path):
    out = tmp_path / "run"
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           *_args(tmp_path, out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(out, proc.stdout)


def test_two_machines_on_loopback(tmp_path):
    out = tmp_path / "run"
    port = str(_free_port())
    procs = []
    for machine in (0, 1):
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "2",
               "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
               "--mixed_precision", "no", "--dynamo_backend", "no", *_args(tmp_path, out)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            results.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    _check(out, results[0][0] + results[1][0])


@pytest.fixture(autouse=True)
def _skip_without_accelerate():
    if not Path(ACCELERATE).is_file():
        pytest.skip("the accelerate command is not installed next to this Python")
