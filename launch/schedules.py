"""Learning-rate and weight-decay schedules, and the batch-size scaling of the learning rate.

Learning rate: linear warm-up, then cosine to `min_lr` at the last step; peak
`lr * (global_batch / base_batch) ** p` (p = 1 linear, 0.5 sqrt, 0 none; Goyal et al. 2017).
Weight decay: cosine from `weight_decay` to `weight_decay_end` (DINO, Caron et al. 2021).
"""

from __future__ import annotations

import math

_POWER = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}


def warmup_steps(warmup: float, total: int) -> int:
    """`warmup` as a fraction of `total` (< 1) or a number of steps (>= 1)."""
    return int(round(warmup * total)) if warmup < 1 else int(warmup)


def lr_at(step: int, total: int, peak: float, min_lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `peak` to `min_lr` at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup - 1)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def wd_at(step: int, total: int, start: float, end: float) -> float:
    t = step / max(1, total - 1)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def scaled_lr(lr: float, scaling: str, global_batch: int, base_batch: int) -> float:
    """The peak learning rate for `global_batch` images per step."""
    return lr * (global_batch / base_batch) ** _POWER[scaling]
