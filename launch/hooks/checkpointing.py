"""A checkpoint every `train.checkpoint_every` steps and at the last step (see launch.checkpoint).

Every process contributes its RNG state, a fingerprint of its weights (replicas must agree) and the keys of
its first batch (processes read different data); rank 0 writes.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import DistributedType, gather_object

from .. import checkpoint as ckpt
from .base import Hook, StepResult, due


def fingerprint(module: torch.nn.Module) -> list[float]:
    """(sum, sum of squares) over all parameters in float64: equal on replicas with equal weights."""
    with torch.no_grad():
        params = [p.detach().double() for p in module.parameters()]
        total = torch.stack([torch.stack([p.sum(), p.square().sum()]) for p in params]).sum(0)
    return [float(v) for v in total.cpu()]


def save_checkpoint(trainer: Any, done: int) -> None:
    acc = trainer.accelerator
    rngs = gather_object([ckpt.rng_state()])
    ranks = gather_object([{"rank": acc.process_index, "weights_fingerprint": fingerprint(trainer.objective),
                            "first_keys": trainer.first_keys}])
    sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    # Under FSDP / DeepSpeed the full weights are gathered (a collective: every process calls it); their
    # optimizer state is sharded and not written, so such checkpoints export but do not resume.
    weights = acc.get_state_dict(trainer.model) if sharded else trainer.objective
    cfg, plan = trainer.cfg, trainer.plan
    if acc.is_main_process:
        state = {"run_id": plan.run_id, "objective": cfg.objective, "backbone": plan.backbone_name,
                 "backbone_args": cfg.backbone_args, "batches_consumed": trainer.consumed,
                 "world_size": trainer.world, "num_workers": cfg.data.num_workers, "total_steps": cfg.train.steps,
                 "seed": cfg.train.seed, "ranks": ranks}
        ckpt.save(plan.out, step=done, objective=weights, optimizer=None if sharded else trainer.optimizer,
                  scaler=trainer.scaler, rng_states=rngs, state=state, config=cfg.as_dict(),
                  keep=cfg.train.keep_checkpoints)
    acc.wait_for_everyone()
    trainer.last_checkpoint = ckpt.checkpoint_root(plan.out) / f"step_{done:07d}"


class Checkpointing(Hook):
    def __init__(self, trainer: Any) -> None:
        self.every = trainer.cfg.train.checkpoint_every

    def after_step(self, trainer: Any, result: StepResult) -> None:
        if due(result.done, self.every, trainer.stop):
            save_checkpoint(trainer, result.done)
