"""The pretraining loop on Accelerate: one optimizer step at a time, side tasks as hooks (launch.hooks).

One optimizer step = `optim.grad_accum` micro-batches of `data.batch_size` images per process; views are
made on the accelerator (objectives.views.make_views) from the uint8 batches the CPU workers deliver.
A step whose loss or gradient norm is not finite on any process is skipped (no update); the guard hook
stops a run that keeps diverging. Clipping: one global norm (`optim.clip_mode: global`) or each parameter's
own norm (`per_param`, as DINO does). Objective hooks: `on_before_optimizer_step(step, total)` after the
backward pass, `on_step_end(step, total)` after the optimizer step, `on_resume(step, total)` after a
checkpoint load (launch.build), `step` counting from 0.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from objectives.views import make_views
from ssl_vit import CorruptCheckpoint, SslVitError
from ssl_vit.files import verify_manifest

from . import checkpoint as ckpt
from .build import Trainer, build_trainer
from .config import dump
from .data import ShardStream, SkipCounter, iter_batches, make_loader
from .errors import DivergedError, LaunchError
from .export_backbone import export_backbone
from .hooks import StepResult, default_hooks
from .hooks.guard import CAUSES, first_non_finite
from .logging import RunLogger, summary_lines, truncate_metrics
from .plan import Plan
from .schedules import lr_at, wd_at
from .throughput import Throughput, count_step_flops, peak_flops


def clip_gradients(trainer: Trainer) -> torch.Tensor:
    """Clip as `optim.clip_mode` says and return the global gradient norm before clipping (fused, fp32)."""
    o = trainer.cfg.optim
    params = [p for p in trainer.objective.parameters() if p.grad is not None]
    if trainer.scaler is not None:
        trainer.accelerator.unscale_gradients()
    grads = trainer.strategy.local([p.grad for p in params])  # FSDP: this process's shards, clipped in place
    if not grads:
        return torch.zeros(())
    norms = trainer.strategy.global_norms(torch._foreach_norm(grads))
    total = torch.linalg.vector_norm(torch.stack(norms).float())
    if o.clip_grad and o.clip_mode == "per_param":  # DINO's utils.clip_gradients: each parameter on its own
        torch._foreach_mul_(grads, [(o.clip_grad / (n + 1e-6)).clamp(max=1.0) for n in norms])
    elif o.clip_grad:
        torch._foreach_mul_(grads, (o.clip_grad / (total + 1e-6)).clamp(max=1.0).to(grads[0].dtype))
    return total


def make_meter(trainer: Trainer, views: list[torch.Tensor], labels: torch.Tensor | None) -> Throughput:
    """The run's throughput meter: FLOPs of one optimizer step counted once on the first views (on a copy of
    the objective under DDP, whose gradient hooks must only see real steps), and the device's peak."""
    acc = trainer.accelerator
    dtype = trainer.strategy.compute_dtype
    # FSDP: on the sharded objective itself (every process counts, so the collectives match; the count puts
    # gradients and buffers back)
    objective = copy.deepcopy(trainer.objective) if trainer.world > 1 and trainer.strategy.replicated \
        else trainer.objective
    try:
        with acc.autocast():
            flops = count_step_flops(objective, views, labels) * trainer.cfg.optim.grad_accum
        peak, source = peak_flops(acc.device, dtype)
    except (RuntimeError, NotImplementedError) as err:  # a monitor: the run goes on without FLOP/s and MFU
        trainer.log.print(f"FLOPs not counted ({type(err).__name__}: {str(err).splitlines()[0]}): no MFU reported")
        return Throughput(acc.device)
    trainer.log.print(f"{flops / 1e9:.3g} GFLOP per optimizer step and process; peak {peak / 1e12:.3g} TFLOP/s "
                      f"({source})")
    return Throughput(acc.device, flops, peak)


def train_step(trainer: Trainer, step: int) -> StepResult:
    """Forward and backward over the micro-batches, the non-finite check, clipping and the optimizer step."""
    t0, acc, cfg = time.perf_counter(), trainer.accelerator, trainer.cfg
    lr = lr_at(step, trainer.total, trainer.peak_lr, cfg.optim.min_lr, trainer.warmup)
    wd = wd_at(step, trainer.total, cfg.optim.weight_decay, cfg.optim.weight_decay_end)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd"):
            group["weight_decay"] = wd
    loss_sum, wait, accum = torch.zeros((), device=acc.device), 0.0, cfg.optim.grad_accum
    for micro in range(accum):
        w0 = time.perf_counter()
        batch = next(trainer.batches)
        wait += time.perf_counter() - w0
        trainer.consumed += 1
        trainer.skips.update(batch)
        trainer.first_keys = trainer.first_keys or list(batch["key"])
        views = make_views(batch["image"].to(acc.device, non_blocking=True), trainer.specs, normalize=trainer.norm,
                           boxes=batch["box"].to(acc.device, non_blocking=True))
        labels = batch["label"].to(acc.device) if trainer.objective.needs_labels else None
        if trainer.meter is None:
            c0 = time.perf_counter()
            trainer.meter = make_meter(trainer, views, labels)
            t0 += time.perf_counter() - c0  # counting is not training time
        sync = contextlib.nullcontext() if micro == accum - 1 else trainer.strategy.no_sync(trainer.model)
        with sync:
            with acc.autocast():
                loss = trainer.model(views, labels=labels) if labels is not None else trainer.model(views)
            acc.backward(loss / accum)
        loss_sum += loss.detach().float() / accum
    grad_norm = clip_gradients(trainer)
    bad = (~torch.isfinite(loss_sum)).float() + (~torch.isfinite(grad_norm)).float().to(loss_sum.device)
    skipped = bool((acc.reduce(bad, reduction="sum") if trainer.world > 1 else bad) > 0)
    if not skipped:
        trainer.objective.on_before_optimizer_step(step, trainer.total)
        trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.objective.on_step_end(step, trainer.total)
    return StepResult(step, float(loss_sum), float(grad_norm), lr, wd, skipped, cfg.data.batch_size * accum *
                      trainer.world, wait, time.perf_counter() - t0, batch)


def open_stream(trainer: Trainer) -> None:
    """The training batches, continuing after the consumed ones, and the main process's logger."""
    d, plan, acc = trainer.cfg.data, trainer.plan, trainer.accelerator
    stream = ShardStream(plan.train_urls, batch_size=d.batch_size, image_size=d.image_size, rank=acc.process_index,
                         world=trainer.world, seed=trainer.cfg.train.seed, shuffle_buffer=d.shuffle_buffer,
                         resampled=d.resampled, need_labels=trainer.objective.needs_labels,
                         skip_batches=trainer.consumed, frames=trainer.frames, frame_stride=d.frame_stride,
                         decode_size=d.decode_size or d.image_size, max_aspect=d.max_aspect)
    trainer.batches = iter_batches(make_loader(stream, d.num_workers, pin_memory=acc.device.type == "cuda",
                                               seed=trainer.cfg.train.seed))
    trainer.skips = SkipCounter()
    trainer.log = RunLogger(plan.out, total=trainer.total, initial=trainer.start, enabled=trainer.main)


def train(plan: Plan) -> dict[str, Any]:
    """Build, (resume,) train with the hooks, checkpoint and export; returns the summary."""
    trainer = build_trainer(plan)
    prepare_out_dir(trainer)
    open_stream(trainer)
    hooks = default_hooks(trainer)
    try:
        for line in summary_lines(trainer):
            trainer.log.print(line)
        for hook in hooks:
            hook.on_start(trainer)
        trainer.model.train()
        for step in range(trainer.start, trainer.stop):
            result = train_step(trainer, step)
            for hook in hooks:
                hook.after_step(trainer, result)
        for hook in hooks:
            hook.on_end(trainer)
    except SslVitError as err:
        trainer.log.close()
        undo_fresh_start(trainer, err)
        if isinstance(err, LaunchError):
            raise
        # an input the objective or backbone refuses (a view too small to mask, ...): say where to look
        raise LaunchError(f"{err} (at step {trainer.start + 1}: check data.view_size, data.image_size and "
                          f"objective_args for {plan.backbone_name})") from None
    trainer.log.close()
    return finish(trainer)


def prepare_out_dir(trainer: Trainer) -> None:
    """Main process: clear what interrupted writes left, replace another run with --overwrite, write the
    config, and on resume drop the metrics past the resumed step."""
    plan, acc = trainer.plan, trainer.accelerator
    if trainer.main:
        plan.out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_temporaries(plan.out)
        if plan.overwrite:
            ckpt.remove_run(plan.out)
        if plan.resume is not None:
            truncate_metrics(plan.out, trainer.start)
        dump(trainer.cfg.as_dict(), plan.out / "config.yaml")
    acc.wait_for_everyone()


def undo_fresh_start(trainer: Trainer, err: SslVitError) -> None:
    """Bad input found only once training began (a view the objective cannot mask, an input check): a fresh
    run that wrote no checkpoint leaves the output folder as it found it. A diverged run keeps its logs."""
    if trainer.plan.resume is not None or trainer.last_checkpoint is not None or isinstance(err, DivergedError):
        return
    out = trainer.plan.out
    if trainer.main and not trainer.plan.out_existed:
        shutil.rmtree(out, ignore_errors=True)
    elif trainer.main:  # what prepare_out_dir and the logger made
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
        for name in ("config.yaml", "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)


def export_intact(folder: Path) -> bool:
    try:
        verify_manifest(folder, what="export")
    except CorruptCheckpoint:
        return False
    return True


def finish(trainer: Trainer) -> dict[str, Any]:
    """Export the backbone (finite weights only) and print where everything is."""
    plan, cfg, data_wait = trainer.plan, trainer.cfg, trainer.data_wait
    export_dir = plan.out / "export"
    backbone = trainer.strategy.export_module(trainer.objective)  # FSDP: gathered on the main process
    bad = trainer.strategy.agree(first_non_finite(backbone) if backbone is not None else None)
    if bad is not None:
        raise DivergedError(f"weight {bad} of the backbone is not finite: no export written; {CAUSES}")
    # also when resuming a finished run whose export was interrupted or damaged: the checkpoint rebuilds it
    if trainer.main and (trainer.start < trainer.stop or not export_intact(export_dir)):
        # registry_name None: the module's own recipe (create_backbone's name and overrides, plus what the
        # objective changed, e.g. MAE's pool="mean") rebuilds it
        export_backbone(backbone, export_dir, registry_name=None, overrides=None,
                        objective=cfg.objective, step=trainer.stop, config=cfg.as_dict())
    trainer.accelerator.wait_for_everyone()
    summary = {"steps": trainer.stop, "total_steps": trainer.total, "loss": trainer.last_loss,
               "checkpoint": str(trainer.last_checkpoint or ""), "export": str(export_dir),
               "skipped_samples": trainer.skips.total, "out": str(plan.out), "data_wait": data_wait,
               "backbone": plan.backbone_name}
    if trainer.main:
        if trainer.start >= trainer.stop:
            print(f"nothing to train: {plan.resume} is at step {trainer.start} of {trainer.stop}; the exported "
                  f"backbone is {export_dir}", flush=True)
        else:
            loss = f"{trainer.last_loss:.4f}" if math.isfinite(trainer.last_loss) else "n/a"
            print(f"done: {trainer.stop} steps, last loss {loss}, data wait {data_wait:.0%}, "
                  f"skipped samples {trainer.skips.total}", flush=True)
            if trainer.meter is not None:
                print(f"throughput: {trainer.meter.describe()}", flush=True)
            if trainer.skips.bad_shards or trainer.skips.total:
                print(trainer.skips.summary(), flush=True)
            print(f"checkpoints: {plan.out / 'checkpoints'} (latest: {trainer.last_checkpoint})", flush=True)
            print(f"exported backbone: {export_dir} (load with ssl_vit.load_backbone('{export_dir}'))", flush=True)
    trainer.accelerator.end_training()
    return summary
