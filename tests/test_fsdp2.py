"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on a tiny ViT, two CPU processes over gloo: sharded
training matches one unsharded process, and a `torch.distributed.checkpoint` save/load of the sharded model
and optimizer state resumes exactly. Skipped where this torch cannot shard on the CPU."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ssl_vit

WORLD = 2
STEPS, STOP = 4, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, 3, 32, 32, generator=g)


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def _build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = ssl_vit.create_backbone("vit_tiny")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _shard(model: torch.nn.Module, checkpointing: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ssl_vit.layers import Block

    mesh = init_device_mesh("cpu", (WORLD,))
    model.set_grad_checkpointing(checkpointing)
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int) -> list[float]:
    """Mean loss over the ranks per step (each rank its own batch; gradients are averaged by FSDP)."""
    losses = []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, _batch(step, rank))
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / WORLD)
    return losses


def _worker(rank: int, port: int, folder: str, checkpointing: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        straight = _train(*_shard(_build()[0], checkpointing), range(STEPS), rank)

        model, opt = _shard(_build()[0], checkpointing)
        first = _train(model, opt, range(STOP), rank)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder)
        del model, opt

        model, opt = _shard(_build()[0], checkpointing)
        torch.manual_seed(123)  # the resumed weights must come from the checkpoint, not from the init
        for p in model.parameters():
            torch.nn.init.normal_(p.to_local())
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        # Partial: a fresh optimizer lists state for every parameter, the saved one only for those that had
        # gradients (not the unused mask token); a model key missing would show as a different loss below.
        dcp.load(state, checkpoint_id=folder, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        resumed = first + _train(model, opt, range(STOP, STEPS), rank)

        if rank == 0:
            torch.save({"straight": straight, "resumed": resumed}, Path(folder).parent / "losses.pt")
    finally:
        dist.destroy_process_group()
    # DTensor's sharding caches keep the device mesh, and with it gloo's threads, alive past
    # destroy_process_group; interpreter finalisation then aborts the process now and then ("terminate called
    # without an active exception") after all the work above is done. Leave as launch.cli.exit_process does.
    sys.stderr.flush()
    os._exit(0)


def _reference() -> list[float]:
    """One unsharded process on both ranks' batches (the gradient of the mean of the two rank losses)."""
    model, opt = _build()
    losses = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = sum(_loss(model, _batch(step, r)) for r in range(WORLD)) / WORLD
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _fully_shard_on_cpu() -> str | None:
    """Why FSDP2 cannot run here, or None."""
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "this torch has no torch.distributed.fsdp.fully_shard (FSDP2)"
    return None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fsdp2_matches_unsharded_and_resumes_exactly(checkpointing):
    why = _fully_shard_on_cpu()
    if why:
        pytest.skip(why)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dcp"
        mp.spawn(_worker, args=(_free_port(), str(folder), checkpointing), nprocs=WORLD, join=True)
        result = torch.load(Path(tmp) / "losses.pt", weights_only=True)
    ref = _reference()
    assert result["straight"] == pytest.approx(ref, rel=1e-5, abs=1e-6), (result["straight"], ref)
    assert result["resumed"] == pytest.approx(result["straight"], rel=0, abs=1e-6)
    assert len(set(ref)) == STEPS  # the weights do move
