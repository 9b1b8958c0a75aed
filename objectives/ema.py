"""Teacher helpers shared by the self-distillation objectives (DINO, EsViT): a frozen copy of the
student, the EMA step and the schedules of Caron et al. 2021 ("Emerging Properties in
Self-Supervised Vision Transformers", Sec. 3.1 and App. B), with the starting momentum scaled to the
run length (`run_scaled_momentum`).

The EMA step is vectorised over all parameters with `torch._foreach_*` kernels: one call for the
whole model instead of a Python loop of small tensor operations per parameter.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["cosine_schedule", "linear_warmup", "frozen_copy", "ema_update_", "run_scaled_momentum"]


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine ramp from `start` (step 0) to `end` (step total_steps - 1 and later).

    DINO's teacher momentum: 0.996 -> 1, m(t) = end - (end - start) (cos(pi t / T) + 1) / 2.
    """
    if total_steps <= 1:
        return float(end if step > 0 else start)
    t = min(max(step, 0), total_steps - 1) / (total_steps - 1)
    return float(end - (end - start) * (math.cos(math.pi * t) + 1) / 2)


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ramp from `start` to `end` over `warmup_steps`, then `end` (teacher temperature)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(end)
    return float(start + (end - start) * max(step, 0) / warmup_steps)


def run_scaled_momentum(base: float, total_steps: int, time_fraction: float | None) -> float:
    """The starting teacher momentum of a run of `total_steps`: `base`, lowered for short runs so that the
    EMA's time constant 1 / (1 - m) is at most `time_fraction * total_steps` steps.

    DINO's 0.996 is a time constant of 250 steps, 0.2 % of its 100-epoch ImageNet schedule (125 k steps
    at batch 1024): the teacher trails the student by a small part of training. Over a 68-step run the
    same cosine schedule leaves the teacher at 87 % of its random initialisation (the product of the
    momenta), so it keeps giving the random network's targets. With
    `time_fraction=0.1`, runs of at least 2500 steps keep `base`; a 300-step run starts at 0.967, a
    68-step run at 0.853. None or 0: `base` whatever the run length.
    """
    if not time_fraction or total_steps <= 0:
        return float(base)
    return float(min(base, max(0.0, 1.0 - 1.0 / (time_fraction * total_steps))))


def run_scaled_center_momentum(center_base: float, teacher_base: float, teacher_start: float) -> float:
    """A centre momentum whose EMA time constant keeps its ratio to the teacher's: `center_base` when the
    teacher starts at `teacher_base`, faster when `run_scaled_momentum` made the teacher faster (0 at most).

    DINO's centre (0.9, 10 steps) is 25 times faster than its teacher (0.996, 250 steps), so the centre
    follows every change of the teacher's outputs. Lowering the teacher's momentum alone for a short run
    inverts that: at 68 steps the teacher's time constant is 6.8 steps against the centre's 10, the
    centre lags, and the targets of every image go to the one prototype the teacher drifts towards
    (measured: KL of the mean target to uniform = ln K by step 12). (1 - m_c) = (1 - c0)(1 - m_t)/(1 - m_t0).
    """
    if teacher_base >= 1.0:
        return float(center_base)
    rate = (1.0 - center_base) * (1.0 - teacher_start) / (1.0 - teacher_base)
    return float(max(0.0, 1.0 - rate))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with no gradients, kept in eval mode (no dropout or drop path in the teacher)."""
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter at once.

    Floating-point buffers (e.g. BatchNorm statistics) are copied from the student, since the
    teacher runs in eval mode and never updates its own.
    """
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}: not copies")
    if t_params:
        # lerp: t + (1 - m) (s - t) = m t + (1 - m) s, in one fused kernel per tensor group
        torch._foreach_lerp_(t_params, s_params, 1.0 - float(momentum))
    t_bufs = [b for b in teacher.buffers() if b.is_floating_point()]
    s_bufs = [b for b in student.buffers() if b.is_floating_point()]
    if t_bufs and len(t_bufs) == len(s_bufs):
        torch._foreach_copy_(t_bufs, s_bufs)
