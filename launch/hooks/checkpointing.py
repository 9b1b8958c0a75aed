"""A checkpoint every `train.checkpoint_every` steps and at the last step (see launch.checkpoint).

Every process contributes its RNG state, a fingerprint of its weights (replicas must agree; under FSDP the
fingerprint of the whole sharded model) and the keys of its first batch (processes read different data); the
run's strategy writes (launch.strategy: rank 0 under DDP, every process its shards under FSDP).
"""

from __future__ import annotations

from typing import Any

from accelerate.utils import gather_object

from .. import checkpoint as ckpt
from .base import Hook, StepResult, due


def save_checkpoint(trainer: Any, done: int) -> None:
    acc = trainer.accelerator
    rngs = gather_object([ckpt.rng_state()])
    ranks = gather_object([{"rank": acc.process_index, "weights_fingerprint": trainer.strategy.fingerprint(
        trainer.objective), "first_keys": trainer.first_keys}])
    cfg, plan = trainer.cfg, trainer.plan
    state = {"run_id": plan.run_id, "objective": cfg.objective, "backbone": plan.backbone_name,
             "backbone_args": cfg.backbone_args, "batches_consumed": trainer.consumed,
             "world_size": trainer.world, "num_workers": cfg.data.num_workers, "total_steps": cfg.train.steps,
             "seed": cfg.train.seed, "strategy": cfg.train.strategy, "ranks": ranks}
    trainer.strategy.save_checkpoint(trainer, done, rngs, state)  # DDP: rank 0 writes; FSDP: every rank its shards
    acc.wait_for_everyone()
    trainer.last_checkpoint = ckpt.checkpoint_root(plan.out) / f"step_{done:07d}"


class Checkpointing(Hook):
    def __init__(self, trainer: Any) -> None:
        self.every = trainer.cfg.train.checkpoint_every

    def after_step(self, trainer: Any, result: StepResult) -> None:
        if due(result.done, self.every, trainer.stop):
            save_checkpoint(trainer, result.done)
