"""`train.strategy: fsdp` through the launcher, for real on CPU (gloo): DINO on vit_tiny, four processes.

One 4-step run as two "nodes" of two processes on loopback (started like a multi-node job), the same run
stopped at step 2 on two nodes and resumed on one node of four, and a DDP run of the same steps. The sharded
checkpoints verify, the resumed run repeats the uninterrupted one's losses (1e-6), and the export (the
teacher, gathered) equals the DDP run's. The teacher's EMA (momentum 0.5) runs shard to shard, DINO's last
layer is frozen past the stop (the resumed optimizer must leave it without Adam state until its first
gradient), two micro-batches accumulate per step (no gradient sync on the first) and the blocks recompute
their activations. fp32 only: bf16 compute (MixedPrecisionPolicy) runs on gloo too but is not compared here;
NCCL, speed and memory at scale need GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ssl_vit
from launch.build import restore
from launch.cli import main
from ssl_vit.files import verify_manifest
from tests.test_launch_dist import ACCELERATE, ROOT, _launch_nodes, _losses

STEPS = 4


def _args(tmp, out, strategy: str = "fsdp", *extra: str) -> list[str]:
    return ["pretrain.py", "--objective", "dino", "--backbone", "vit", "--steps", str(STEPS), "--out", str(out),
            "--set", f"data.cache={tmp / 'cache'}", "--set", "data.batch_size=4", "--set", "data.num_workers=0",
            "--set", "data.shuffle_buffer=16", "--set", "train.val_batches=1", "--set", "train.log_every=1",
            "--set", f"train.strategy={strategy}", "--set", "objective_args.moving_average_decay=0.5",
            "--set", "objective_args.ema_time_fraction=0", "--set", "objective_args.freeze_last_layer_steps=3",
            "--set", "optim.grad_accum=2", "--set", "train.activation_checkpointing=true", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fsdp on 2 nodes x 2 processes; the same stopped at 2 and resumed on 1 node x 4; ddp on 1 x 4."""
    if not Path(ACCELERATE).is_file():
        pytest.skip("the accelerate command is not installed next to this Python")
    tmp = tmp_path_factory.mktemp("fsdp")
    out = {name: tmp / name for name in ("straight", "split", "ddp")}
    text = {"straight": _launch_nodes(tmp, _args(tmp, out["straight"]), 2, 2),
            "stopped": _launch_nodes(tmp, _args(tmp, out["split"], "fsdp", "--set", "train.stop_at=2"), 2, 2)}
    text["resumed"] = _launch_nodes(tmp, [*_args(tmp, out["split"]), "--resume"], 1, 4)
    text["ddp"] = _launch_nodes(tmp, _args(tmp, out["ddp"], "ddp"), 1, 4)
    return tmp, out, text


def test_fsdp_writes_verified_shards_and_resumes_exactly(runs):
    _, out, text = runs
    step = out["straight"] / "checkpoints" / f"step_{STEPS:07d}"
    verify_manifest(step)
    manifest = json.loads((step / "checksums.json").read_text())["files"]
    assert {"sharded/.metadata", *(f"sharded/__{r}_0.distcp" for r in range(4))} <= set(manifest)
    assert not (step / "objective.safetensors").exists() and not (step / "optimizer.pt").exists()
    state = json.loads((step / "state.json").read_text())
    assert state["strategy"] == "fsdp" and [r["rank"] for r in state["ranks"]] == [0, 1, 2, 3]
    assert len({str(r["weights_fingerprint"]) for r in state["ranks"]}) == 1
    assert "strategy fsdp (FSDP2: 4 shared blocks" in text["straight"] and text["straight"].count("done:") == 1
    a, b = _losses(out["straight"]), _losses(out["split"])
    assert [s for s, _ in b] == list(range(1, STEPS + 1))
    assert all(abs(x - y) <= 1e-6 for (_, x), (_, y) in zip(a, b)), (a, b)
    assert len({loss for _, loss in a}) == STEPS                                    # the losses do move
    assert "val loss" in text["straight"]                                            # validation ran sharded too
    assert not [p for p in out["split"].rglob("*") if ".tmp-" in p.name or ".old-" in p.name]  # no temporaries


def test_fsdp_export_is_the_full_backbone_and_matches_ddp(runs):
    _, out, _ = runs
    fsdp, ddp = (load_file(str(out[n] / "export" / "backbone.safetensors")) for n in ("straight", "ddp"))
    assert fsdp.keys() == ddp.keys()
    for name in fsdp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-5, msg=name)
    model = ssl_vit.load_backbone(out["straight"] / "export")                         # checksums, rebuild
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in fsdp.values())
    # one process reads the shards back (export.py, the visualizer and the probe go through restore())
    restored = restore(out["split"] / "checkpoints" / f"step_{STEPS:07d}").objective.export_backbone()
    for name, value in restored.state_dict().items():
        torch.testing.assert_close(value, fsdp[name], rtol=0, atol=1e-6, msg=name)
    a, b = _losses(out["straight"]), _losses(out["ddp"])
    assert all(abs(x - y) <= 1e-4 for (_, x), (_, y) in zip(a, b)), (a, b)


def test_strategies_do_not_resume_each_other(runs, capsys):
    tmp, out, _ = runs
    args = _args(tmp, out["straight"], "ddp")[1:]
    assert main([*args, "--resume"]) == 2
    assert "train.strategy=fsdp run; resume it with --set train.strategy=fsdp" in capsys.readouterr().err


@pytest.mark.parametrize("extra, says", [
    (("--backbone", "cvt"), "CvT has none (its family builds its own layers); train it with train.strategy=ddp"),
    ((), "it needs several processes: accelerate launch --num_processes N"),
    (("--set", "train.knn_every=5"), "train.knn_every run the backbone outside the objective's forward"),
])
def test_fsdp_refuses_in_one_line(tmp_path, capsys, extra, says):
    out = tmp_path / "run"
    args = _args(tmp_path, out)[1:]
    if extra[:1] == ("--backbone",):
        args[args.index("--backbone") + 1] = extra[1]
        extra = ("--set", "train.activation_checkpointing=false")
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: train.strategy=fsdp: ") and says in err, err
    assert not out.exists()


def test_accelerate_configs_parse():
    """configs/accelerate/*.yaml are what `accelerate launch --config_file` reads: one node and several."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = ROOT / "configs" / "accelerate"
    seen = {}
    for path in sorted(folder.glob("*.yaml")):
        cfg = load_config_from_file(str(path))
        seen[path.stem] = (cfg.distributed_type.value, cfg.num_machines, cfg.num_processes)
    assert seen["one_node"] == ("MULTI_GPU", 1, 8) and seen["multi_node"][:2] == ("MULTI_GPU", 2), seen


def test_accelerate_fsdp_flag_points_to_the_strategy(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("accelerate's own FSDP runs on GPUs")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main(_args(tmp_path, tmp_path / "run")[1:]) == 2
    assert "or FSDP2 with --set train.strategy=fsdp" in capsys.readouterr().err

