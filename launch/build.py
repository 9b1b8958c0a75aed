"""Building a run from its config, and restoring one from a checkpoint: the one home of both.

`build_objective(cfg)` makes the backbone and the objective; `make_accelerator`, `param_groups` and
`make_adamw` the rest of a training run. `restore(checkpoint)` verifies a checkpoint's checksums, parses its
config (validated like any config, never executed) and loads the objective's weights strictly: what
`export.py`, the visualizer, the probe and the tests use to read a run back.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

import ssl_vit
from ssl_vit import IncompatibleBackbone, Objective, UnknownNameError, ViewSpec
from ssl_vit.files import verify_manifest

from .checkpoint import load_objective_weights, read_state
from .config import RunConfig, parse_stored, read_yaml
from .errors import LaunchError
from .init_weights import load_init
from .schedules import scaled_lr, warmup_steps
from .strategy import make_strategy


def pick_backbone_name(cfg: RunConfig) -> str:
    """The registry name to build: `<backbone>_tiny` when backbone_size is tiny and it exists."""
    name = cfg.backbone
    if cfg.backbone_size in (None, "none") or name.endswith("_tiny") or ":" in name:
        return name
    return f"{name}_tiny" if f"{name}_tiny" in ssl_vit.list_backbones() else name


def build_objective(cfg: RunConfig, init: str | Path | None = None) -> tuple[ssl_vit.Backbone, Objective]:
    """(backbone, objective) from the config; LaunchError on unknown names, bad arguments, bad pairs.
    `init`: weights loaded into the backbone before the objective copies it (teachers). The objective is told
    the normalisation of the launcher's views (`data.mean/std`)."""
    if cfg.objective not in ssl_vit.list_objectives():
        try:
            ssl_vit.registry.OBJECTIVES.get(cfg.objective)
        except UnknownNameError as err:
            raise LaunchError(str(err)) from None
    name = pick_backbone_name(cfg)
    try:
        backbone = ssl_vit.create_backbone(name, **cfg.backbone_args)
    except UnknownNameError as err:
        raise LaunchError(str(err)) from None
    except (TypeError, ValueError) as err:
        raise LaunchError(f"cannot build backbone '{name}' with backbone_args {cfg.backbone_args}: {err}") from None
    if init is not None:
        load_init(init, backbone)
    if cfg.train.activation_checkpointing:
        try:
            backbone.set_grad_checkpointing(True)
        except IncompatibleBackbone as err:
            raise LaunchError(f"train.activation_checkpointing: {err}") from None
    try:
        objective = ssl_vit.create_objective(cfg.objective, backbone, **cfg.objective_args)
    except IncompatibleBackbone as err:
        raise LaunchError(f"incompatible pair --objective {cfg.objective} --backbone {name}: {err}") from None
    except (TypeError, ValueError) as err:
        raise LaunchError(f"cannot build objective '{cfg.objective}' with objective_args {cfg.objective_args}: "
                          f"{err}") from None
    objective.registry_name = cfg.objective
    objective.set_input_normalization(cfg.data.mean, cfg.data.std)
    return backbone, objective


def scale_views(specs: list[ViewSpec], view_size: int | None, multiple: int) -> list[ViewSpec]:
    """The objective's views with the largest side set to `view_size`, the others scaled along and
    rounded to the backbone's size multiple (DINO's 224/96 px recipe at 32/16 px)."""
    if not view_size:
        return list(specs)
    largest = max(max(s.size) for s in specs)
    return [dataclasses.replace(s, size=tuple(max(multiple, int(round(v * view_size / largest / multiple)) * multiple)
                                              for v in s.size)) for s in specs]


def param_groups(objective: Objective, weight_decay: float) -> list[dict]:
    """AdamW groups: decayed weights, and the objective's no_weight_decay() names without decay."""
    skip = set(objective.no_weight_decay())
    decay, no_decay = [], []
    for name, p in objective.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def make_adamw(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
               fused: bool = True) -> torch.optim.AdamW:
    """AdamW, on torch's fused kernel where every parameter lives on a device that has one (CPU, CUDA):
    the same update as the per-tensor loop, several times faster (benchmarks/RESULTS.md)."""
    params = [p for g in groups for p in g["params"]]
    fused = fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX-BF16 in Linux's /proc/cpuinfo), where
    CPU autocast to bf16 pays (benchmarks/RESULTS.md: 1.5-1.7x at ViT-S/16 and ViT-Ti/4 DINO, probes within
    a point of fp32). False where the flags cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def resolve_precision(cfg: RunConfig) -> str | None:
    """train.mixed_precision with `auto` resolved: bf16 on GPUs that have it and on CPUs with native bf16
    (`cpu_has_native_bf16`), else no; None: what `accelerate launch --mixed_precision` / `accelerate config`
    chose (ACCELERATE_MIXED_PRECISION)."""
    mp: str | None = cfg.train.mixed_precision
    if mp == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            mp = None
        elif torch.cuda.is_available():
            mp = "bf16" if torch.cuda.is_bf16_supported() else "no"
        else:
            mp = "bf16" if cpu_has_native_bf16() else "no"
    return mp


def make_accelerator(cfg: RunConfig):
    """The Accelerator: bf16 on GPUs and CPUs that have it under `mixed_precision: auto`, CPU processes over gloo.
    Under `train.strategy: fsdp` it does no autocast: FSDP2's mixed precision policy casts (launch.strategy)."""
    mp = resolve_precision(cfg) if cfg.train.strategy == "ddp" else "no"
    kwargs = DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters)
    # `accelerate launch --multi_gpu` on a machine without GPUs starts torchrun processes; accelerate only
    # joins them (gloo) when told it runs on the CPU, otherwise every process would train alone.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    sharded = [name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
               if os.environ.get(var, "").lower() in ("1", "true")]
    if sharded and not torch.cuda.is_available():
        # accelerate would stop deep inside with "no available devices"; say it in one line instead.
        raise LaunchError(f"{sharded[0]} needs GPUs (accelerate runs it on CUDA, XPU and similar devices); on a "
                          f"CPU-only machine launch without --use_{sharded[0].lower()} (plain DDP over gloo"
                          + (", or FSDP2 with --set train.strategy=fsdp)" if sharded[0] == "FSDP" else ")"))
    if sharded and cfg.train.strategy == "fsdp":
        raise LaunchError(f"train.strategy=fsdp shards the model itself (torch FSDP2); launch without "
                          f"--use_{sharded[0].lower()} and without an accelerate config that enables it")
    return Accelerator(mixed_precision=mp, kwargs_handlers=[kwargs], cpu=cpu)


# ---- reading a run back ---------------------------------------------------------------------------
@dataclass
class Restored:
    """A checkpoint read back: its validated config, the objective with its weights, and state.json."""

    cfg: RunConfig
    objective: Objective
    state: dict[str, Any]
    path: Path

    @property
    def backbone_name(self) -> str:
        return str(self.state.get("backbone") or pick_backbone_name(self.cfg))


def restore(path: str | Path) -> Restored:
    """The objective of a checkpoint folder, checksums verified first (ssl_vit.CorruptCheckpoint names the
    damaged file). Nothing of the folder is executed: its config is data, validated by `config.parse_stored`."""
    path = Path(path)
    verify_manifest(path, what="checkpoint")
    cfg = parse_stored(read_yaml(path / "config.yaml"), str(path / "config.yaml"))
    state = read_state(path)
    _, objective = build_objective(cfg)
    load_objective_weights(objective, path)
    return Restored(cfg, objective.eval(), state, path)


# ---- a training run, built ------------------------------------------------------------------------
@dataclass
class Trainer:
    """Everything the loop and its hooks share: built once by `build_trainer`, read as attributes."""

    plan: Any  # launch.plan.Plan
    cfg: RunConfig
    accelerator: Any
    backbone: ssl_vit.Backbone
    objective: Objective
    model: Any  # the prepared (wrapped, maybe compiled) objective
    optimizer: torch.optim.Optimizer
    scaler: Any
    specs: list[ViewSpec]
    frames: int | None  # video: frames per decoded clip
    start: int
    stop: int
    consumed: int  # micro-batches this process has read, for exact resume
    peak_lr: float
    warmup: int
    batches: Any = None  # iterator over the training loader
    log: Any = None  # launch.logging.RunLogger
    skips: Any = None  # launch.data.SkipCounter
    first_keys: list = dataclasses.field(default_factory=list)
    last_checkpoint: Path | None = None
    last_loss: float = float("nan")
    data_wait: float = 0.0  # share of the time spent waiting for data (the metrics hook keeps it)
    meter: Any = None  # launch.throughput.Throughput, made at the first step (FLOPs counted on its views)
    strategy: Any = None  # launch.strategy.Strategy: DDP or FSDP2 (train.strategy)

    @property
    def total(self) -> int:
        return self.cfg.train.steps

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.world * self.cfg.optim.grad_accum

    @property
    def norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.cfg.data.mean, self.cfg.data.std


_KIND_WORDS = {"image": "images", "video": "video clips"}  # what shards hold


def check_data_kind(plan: Any, backbone: ssl_vit.Backbone) -> int | None:
    """LaunchError when the shards and the backbone disagree (clips for an image model or images for a
    video one); the frames per decoded clip for video backbones, else None."""
    video = ssl_vit.VIDEO in backbone.capabilities
    want = "video" if video else "image"
    if plan.data_kind is not None and plan.data_kind != want:
        data = plan.cfg.data.train
        if video:
            raise LaunchError(f"backbone {plan.backbone_name} is a video model (inputs (B, C, T, H, W)) but {data} "
                              "holds images; give it clip shards (python -m launch.make_shards CLIP_DIR OUT --video)")
        raise LaunchError(f"{data} holds video clips but backbone {plan.backbone_name} takes images; pick a video "
                          "backbone (vit_3d, simple_vit_3d, vivit, cct_3d) or image shards")
    if not video:
        return None
    return int(plan.cfg.data.frames or backbone.default_size[0])


def check_views(specs: list[ViewSpec], backbone: ssl_vit.Backbone, frames: int | None, cfg: RunConfig) -> None:
    """LaunchError unless every view fits the backbone (size multiples; video: frame counts)."""
    for s in specs:
        size: tuple[int, ...] = tuple(s.size)
        if frames is not None:
            if s.frames is not None and s.frames > frames:
                raise LaunchError(f"view '{s.name}' of {cfg.objective} samples {s.frames} frames but clips are "
                                  f"decoded with {frames}; set data.frames to at least {s.frames}")
            size = (s.frames or frames, *size)
        try:
            backbone.check_size(size)
        except ssl_vit.InputShapeError as err:
            raise LaunchError(f"view '{s.name}' of {cfg.objective} does not fit {cfg.backbone}: {err}; "
                              "set data.view_size, data.frames or objective_args") from None


def build_trainer(plan: Any) -> Trainer:
    """Accelerator, objective, optimizer and views from the plan, the checkpoint loaded when resuming.
    Writes nothing."""
    cfg = plan.cfg
    accelerator = make_accelerator(cfg)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every process
    # a resumed run's checkpoint holds everything; --init only seeds a fresh one
    backbone, objective = build_objective(cfg, init=cfg.init if plan.resume is None else None)
    frames = check_data_kind(plan, backbone)
    specs = scale_views(list(objective.view_specs()), cfg.data.view_size, backbone.size_multiple)
    check_views(specs, backbone, frames, cfg)
    o, t = cfg.optim, cfg.train
    precision = resolve_precision(cfg) or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    strategy = make_strategy(cfg, accelerator, backbone, precision)
    global_batch = cfg.data.batch_size * accelerator.num_processes * o.grad_accum
    peak_lr = scaled_lr(o.lr, o.lr_scaling, global_batch, o.base_batch)
    model, optimizer = strategy.prepare(
        objective, lambda m: make_adamw(param_groups(m, o.weight_decay), lr=peak_lr, betas=o.betas, eps=o.eps,
                                        fused=o.fused), t.compile)
    scaler = accelerator.scaler if accelerator.mixed_precision == "fp16" else None
    stop = min(t.steps, t.stop_at) if t.stop_at else t.steps
    trainer = Trainer(plan, cfg, accelerator, backbone, objective, model, optimizer, scaler, specs, frames, 0,
                      stop, 0, peak_lr, warmup_steps(o.warmup, t.steps), strategy=strategy)
    if plan.resume is not None:
        state = strategy.load_checkpoint(trainer, plan.resume)
        trainer.start, trainer.consumed = int(state["step"]), int(state["batches_consumed"])
        objective.on_resume(trainer.start, t.steps)
        if state.get("num_workers") != cfg.data.num_workers or state.get("world_size") != accelerator.num_processes:
            accelerator.print("warning: resuming with another number of processes or data workers: the data "
                              "order differs from an uninterrupted run")
    else:
        torch.manual_seed(t.seed + 1_000_003 * accelerator.process_index)  # different views on every process
    return trainer
