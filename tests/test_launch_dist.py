"""Launcher, distributed for real on CPU (gloo): two processes on one machine, two single-process
"machines" on loopback started the way a multi-node job is, and two two-process "nodes" (four ranks)
with resampled shards, stopped and resumed. The ranks read different data, end with identical weights,
only rank 0 writes checkpoints and logs, and a resumed run repeats the uninterrupted run's losses."""

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
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TIMEOUT = 300


def _env(tmp_path: Path) -> dict:
    # PYTHONFAULTHANDLER: a rank that aborts prints every thread's Python stack
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"), PYTHONUNBUFFERED="1",
               PYTHONFAULTHANDLER="1")
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


def _launch_nodes(tmp_path: Path, args: list[str], nodes: int, per_node: int, torchrun: bool = False) -> str:
    """Run `pretrain.py args` as `nodes` launches (accelerate launch, or plain torchrun) of `per_node`
    processes on 127.0.0.1; returns their stdout joined (fails the test on a non-zero exit)."""
    port = str(_free_port())
    procs = []
    for machine in range(nodes):
        if torchrun:
            cmd = [TORCHRUN, "--nnodes", str(nodes), "--nproc-per-node", str(per_node), "--node-rank", str(machine),
                   "--master-addr", "127.0.0.1", "--master-port", port, *args]
        else:
            cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nodes * per_node),
                   "--num_machines", str(nodes), "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no", *args]
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
    return "".join(out for out, _ in results)


def _args_2x2(tmp_path: Path, out: Path, *extra: str, steps: int = 4, resampled: bool = True) -> list[str]:
    return ["pretrain.py", "--objective", "mae", "--backbone", "vit", "--steps", str(steps), "--out", str(out),
            "--set", f"data.cache={tmp_path / 'cache'}", "--set", "data.batch_size=4", "--set", "data.num_workers=0",
            "--set", f"data.resampled={str(resampled).lower()}", "--set", "data.shuffle_buffer=16",
            "--set", "train.val_batches=0", "--set", "train.log_every=1", *extra]


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    """Two nodes of two processes: 4 steps straight, and the same stopped at step 2 and resumed to 4."""
    tmp = tmp_path_factory.mktemp("nodes")
    straight, split = tmp / "straight", tmp / "split"
    outs = {"straight": _launch_nodes(tmp, _args_2x2(tmp, straight), 2, 2),
            "stopped": _launch_nodes(tmp, _args_2x2(tmp, split, "--set", "train.stop_at=2"), 2, 2)}
    assert (split / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    outs["resumed"] = _launch_nodes(tmp, [*_args_2x2(tmp, split), "--resume"], 2, 2)
    return straight, split, outs


def _losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def test_two_nodes_of_two_write_once(two_by_two):
    straight, split, outs = two_by_two
    state = json.loads((straight / "checkpoints" / "step_0000004" / "state.json").read_text())
    assert [r["rank"] for r in state["ranks"]] == [0, 1, 2, 3] and state["world_size"] == 4
    assert all(r["weights_fingerprint"] == state["ranks"][0]["weights_fingerprint"] for r in state["ranks"])
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["latest", "step_0000004"]
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["latest", "step_0000002", "step_0000004"]
    assert [s for s, _ in _losses(straight)] == [1, 2, 3, 4]                        # one record a step: rank 0
    assert len(list((straight / "tensorboard").glob("events.*"))) == 1
    for text in outs.values():
        assert text.count("done:") == 1 and "processes 4" in text
    assert outs["straight"].count("exported backbone:") == 1
    assert not [p for p in (*straight.rglob("*"), *split.rglob("*")) if p.name.startswith((".tmp", ".export"))]


def test_two_nodes_of_two_resume_exactly(two_by_two):
    straight, split, _ = two_by_two
    a, b = _losses(straight), _losses(split)
    assert [s for s, _ in b] == [1, 2, 3, 4]
    assert all(abs(x - y) <= 1e-6 for (_, x), (_, y) in zip(a, b)), (a, b)
    assert len({loss for _, loss in a}) == 4                                        # the losses do move


def test_two_nodes_of_two_read_different_samples(two_by_two):
    straight, _, _ = two_by_two
    state = json.loads((straight / "checkpoints" / "step_0000004" / "state.json").read_text())
    keys = [r["first_keys"] for r in state["ranks"]]
    assert all(len(k) == 4 for k in keys)
    flat = [k for ks in keys for k in ks]
    assert len(flat) == len(set(flat)), keys                                        # no key on two ranks


def test_plain_torchrun_two_nodes(tmp_path):
    """The launcher under plain torchrun (no accelerate launch): two one-process nodes on loopback."""
    if not Path(TORCHRUN).is_file():
        pytest.skip("torchrun is not installed next to this Python")
    out = tmp_path / "run"
    stdout = _launch_nodes(tmp_path, _args_2x2(tmp_path, out, steps=2, resampled=False), 2, 1, torchrun=True)
    state = json.loads((out / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert [r["rank"] for r in state["ranks"]] == [0, 1] and state["world_size"] == 2
    assert state["ranks"][0]["weights_fingerprint"] == state["ranks"][1]["weights_fingerprint"]
    keys = [set(r["first_keys"]) for r in state["ranks"]]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert stdout.count("done:") == 1 and "processes 2" in stdout


@pytest.fixture(autouse=True)
def _skip_without_accelerate():
    if not Path(ACCELERATE).is_file():
        pytest.skip("the accelerate command is not installed next to this Python")


@pytest.mark.parametrize("world, finalised", [("1", True), ("4", False)])
def test_a_launched_process_ends_with_its_status_and_its_output(world, finalised):
    """launch.cli.run's exit: a rank of a multi-process launch skips interpreter finalisation (no atexit
    handler runs) but still ends with main's status and everything it printed."""
    code = ("import atexit, sys; from launch.cli import exit_process; atexit.register(print, 'finalised'); "
            "print('written'); sys.stderr.write('said'); exit_process(3)")
    env = dict(os.environ, WORLD_SIZE=world)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3 and done.stdout.startswith("written") and done.stderr == "said", done
    assert ("finalised" in done.stdout) == finalised
