"""How a run spreads the objective over its processes: `train.strategy`.

- `ddp` (`Strategy`, the base class): Accelerate prepares the objective (DistributedDataParallel over the processes, or
  what `accelerate launch` configured); every process holds all weights and the whole optimizer state, and
  rank 0 writes checkpoints alone (launch.checkpoint.save).
- `fsdp` (`FSDPStrategy`): torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every shared transformer
  block (`ssl_vit.layers.Block`, the blocks `Backbone.set_grad_checkpointing` switches) of the objective, the
  EMA teacher's included, and then the objective itself (embeddings, heads, the rest of the teacher) over all
  processes. Teacher and student blocks are sharded alike, so `objectives.ema.ema_update_` runs shard to shard
  (each process updates the slice it holds). `train.mixed_precision: bf16` keeps fp32 shards and optimizer
  state, computes with bf16 parameters and reduces gradients in fp32 (`MixedPrecisionPolicy`); fp16 is refused
  (it would need a sharded gradient scaler). Checkpoints hold the shards (launch.checkpoint.save_sharded,
  torch.distributed.checkpoint: every process writes its own) and resume exactly; the export gathers the full
  weights on rank 0, into an unsharded copy of the objective that rank 0 keeps on the CPU (CPU memory for one
  objective) and asks for its `export_backbone()`.

Accelerate's own FSDP plugin is not used: the installed Accelerate (1.16) runs it on accelerators only (with
`cpu=True` it falls back to DDP, without it a CPU machine gets no process group). Accelerate still starts the
processes and makes the process group (gloo on CPUs, NCCL on GPUs); this module calls torch directly.

What the loop asks of a strategy is declared here (`replicated`, `precision`, `compute_dtype`, and the
methods of `Strategy`), never sniffed from the wrapped model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import ssl_vit
from ssl_vit.layers import Block

from . import checkpoint as ckpt
from .errors import DivergedError, LaunchError


def first_non_finite(module: nn.Module) -> str | None:
    """The name of the first parameter or floating buffer of `module` holding NaN or inf (of this process's
    part of each under FSDP), or None."""
    for name, t in _named_tensors(module):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters then buffers, each as the plain tensor this process holds (a DTensor's local shard)."""
    return [(n, t.to_local() if isinstance(t, DTensor) else t)
            for n, t in [*module.named_parameters(), *module.named_buffers()]]


class Strategy:
    """The DDP behaviour; `FSDPStrategy` overrides what sharding changes.

    replicated: every process holds all weights (FLOPs are counted on a copy; replicas' fingerprints agree
    because they are equal, not because they are summed). precision: what the start-up summary prints.
    compute_dtype: the dtype the step computes in (the throughput meter's peak)."""

    name = "ddp"
    replicated = True

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.precision = str(accelerator.mixed_precision)
        self.compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)

    def describe(self) -> str:
        return "ddp (every process holds all weights)"

    def prepare(self, objective: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                compile: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(model to call, optimizer) for the built objective (on the CPU, every process the same weights)."""
        objective.to(self.accelerator.device)
        optimizer = make_optimizer(objective)
        model = torch.compile(objective) if compile else objective
        return self.accelerator.prepare(model, optimizer)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A context for the forward and backward of a micro-batch whose gradients are not yet reduced."""
        return self.accelerator.no_sync(model)

    def after_eval(self) -> None:
        """After forwards without a backward (validation): put the weights back as training expects them."""

    def local(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The part of each tensor this process holds (in-place ops on them change the tensors)."""
        return tensors

    def global_norms(self, norms: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-tensor 2-norms of the whole tensors from those of the `local` parts (0-d each)."""
        return norms

    def all_true(self, flag: bool) -> bool:
        """`flag` where every process has it (a collective under FSDP, where processes must call in step)."""
        return flag

    def agree(self, value: Any) -> Any:
        """Rank 0's `value` on every process (FSDP: values computed on gathered weights exist on rank 0 only)."""
        return value

    def first_non_finite(self, module: nn.Module) -> str | None:
        """The first parameter or floating buffer holding NaN or inf, the same answer on every process."""
        return first_non_finite(module)

    def fingerprint(self, module: nn.Module) -> list[float]:
        """(sum, sum of squares) of all parameters in float64: equal on replicas with equal weights."""
        with torch.no_grad():
            params = [p.detach().double() for p in module.parameters()]
            total = torch.stack([torch.stack([p.sum(), p.square().sum()]) for p in params]).sum(0)
        return [float(v) for v in total.cpu()]

    def export_module(self, objective: Any) -> nn.Module | None:
        """The backbone to export with all its weights, on rank 0 at least (None where not available)."""
        return objective.export_backbone()

    def save_checkpoint(self, trainer: Any, step: int, rng_states: list, state: dict[str, Any]) -> None:
        """Write the checkpoint of `step` (every process calls it)."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        # `accelerate launch --use_fsdp / --use_deepspeed` (GPUs): the full weights are gathered (a collective);
        # their optimizer state is sharded and not written, so such checkpoints export but do not resume.
        sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        weights = acc.get_state_dict(trainer.model) if sharded else trainer.objective
        if acc.is_main_process:
            cfg = trainer.cfg
            ckpt.save(trainer.plan.out, step=step, objective=weights, optimizer=None if sharded else trainer.optimizer,
                      scaler=trainer.scaler, rng_states=rng_states, state=state, config=cfg.as_dict(),
                      keep=cfg.train.keep_checkpoints)

    def load_checkpoint(self, trainer: Any, path: Any) -> dict[str, Any]:
        """Restore the objective, optimizer, scaler and this process's RNG; returns state.json."""
        return ckpt.load(path, objective=trainer.objective, optimizer=trainer.optimizer, scaler=trainer.scaler,
                         rank=self.accelerator.process_index)


class FSDPStrategy(Strategy):
    """FSDP2 over all processes of the run (one mesh dimension): shared blocks, then the objective."""

    name = "fsdp"
    replicated = False

    def __init__(self, accelerator: Any, precision: str) -> None:
        super().__init__(accelerator)
        self.precision = precision
        self.compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.blocks = 0
        self.template: Any = None  # rank 0: an unsharded copy of the objective (CPU), loaded to export
        self.root: Any = None  # the sharded objective

    def describe(self) -> str:
        dtype = "bf16 compute, fp32 shards and gradient reduction" if self.precision == "bf16" else "fp32"
        return f"fsdp (FSDP2: {self.blocks} shared blocks + the objective sharded over {self.world} processes, {dtype})"

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def prepare(self, objective: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                compile: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # rank 0 keeps an unsharded copy of the objective on the CPU to export from: the export backbone may be a
        # submodule (DINO's teacher) or a module derived from one (MAE's mean-pooling copy)
        self.template = copy.deepcopy(objective).cpu() if self.accelerator.is_main_process else None
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.precision == "bf16" else MixedPrecisionPolicy()
        mesh = init_device_mesh(self.accelerator.device.type, (self.world,))
        blocks = [m for m in objective.modules() if isinstance(m, Block)]
        for block in blocks:  # innermost first: each block all-gathers its weights only while it runs
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(objective, mesh=mesh, mp_policy=policy)  # moves the shards to the mesh's device
        self.blocks, self.root = len(blocks), objective
        optimizer = make_optimizer(objective)
        return (torch.compile(objective) if compile else objective), optimizer

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        # the sharded objective (`model` may be its torch.compile wrapper); gradients accumulate unsharded
        # until the last micro-batch
        self.root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.root.set_requires_gradient_sync(True)

    def after_eval(self) -> None:
        # the root keeps its weights gathered after a forward (its backward would gather them again); with no
        # backward to free them, shard them here
        self.root.reshard()

    def local(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.to_local() for t in tensors]

    def global_norms(self, norms: list[torch.Tensor]) -> list[torch.Tensor]:
        squares = torch.stack(norms).float().square()
        dist.all_reduce(squares)
        return list(squares.sqrt().unbind())

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([float(flag)], device=self.accelerator.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def agree(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def first_non_finite(self, module: nn.Module) -> str | None:
        named = _named_tensors(module)
        local = first_non_finite(module)
        bad = [n for n, _ in named].index(local) if local is not None else len(named)
        first = torch.tensor([bad], device=self.accelerator.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)  # the first bad one over all shards
        i = int(first.item())
        return named[i][0] if i < len(named) else None

    def fingerprint(self, module: nn.Module) -> list[float]:
        """(sum, sum of squares) of the whole (gathered) parameters: the same on every process."""
        with torch.no_grad():
            parts = [p.to_local().double() for p in module.parameters()]
            total = torch.stack([torch.stack([p.sum(), p.square().sum()]) for p in parts]).sum(0)
            dist.all_reduce(total)
        return [float(v) for v in total.cpu()]

    def export_module(self, objective: Any) -> nn.Module | None:
        """The export backbone with the full weights, gathered parameter by parameter into rank 0's unsharded copy
        of the objective (a collective; None on the other processes)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.template is None:
            return None
        self.template.load_state_dict(full)
        return self.template.export_backbone()

    def save_checkpoint(self, trainer: Any, step: int, rng_states: list, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        bad = self.first_non_finite(trainer.objective)
        if bad is not None:
            raise DivergedError(f"step {step}: weight {bad} is not finite; no checkpoint written, the last good "
                                "one is kept")
        shards = {"model": get_model_state_dict(trainer.objective),
                  "optim": get_optimizer_state_dict(trainer.objective, trainer.optimizer)}
        cfg = trainer.cfg
        ckpt.save_sharded(trainer.plan.out, step=step, shards=shards, rng_states=rng_states, state=state,
                          config=cfg.as_dict(), keep=cfg.train.keep_checkpoints)

    def load_checkpoint(self, trainer: Any, path: Any) -> dict[str, Any]:
        return ckpt.load_sharded(path, objective=trainer.objective, optimizer=trainer.optimizer,
                                 rank=self.accelerator.process_index)


def make_strategy(cfg: Any, accelerator: Any, backbone: ssl_vit.Backbone, precision: str) -> Strategy:
    """The run's strategy; LaunchError (one line) when `train.strategy: fsdp` cannot run this config.
    precision: the resolved train.mixed_precision (no | fp16 | bf16)."""
    if cfg.train.strategy == "ddp":
        return Strategy(accelerator)
    t = cfg.train
    on = [name for name, every in (("train.knn_every", t.knn_every), ("train.online_probe_every",
                                   t.online_probe_every), ("train.image_every", t.image_every)) if every]
    why = None
    if not backbone.supports_grad_checkpointing:
        why = (f"it shards each shared transformer block (ssl_vit.layers.Block) and {type(backbone).__name__} "
               "has none (its family builds its own layers); train it with train.strategy=ddp")
    elif precision == "fp16":
        why = "fp16 needs a sharded gradient scaler; set train.mixed_precision=bf16 (or no)"
    elif on:
        why = (f"{', '.join(on)} run the backbone outside the objective's forward and "
               "need the full weights on every process; set them to 0 (validation losses do run)")
    elif accelerator.num_processes < 2:
        why = "it needs several processes: accelerate launch --num_processes N (N >= 2) pretrain.py ..."
    if why:
        raise LaunchError(f"train.strategy=fsdp: {why}")
    return FSDPStrategy(accelerator, precision)
