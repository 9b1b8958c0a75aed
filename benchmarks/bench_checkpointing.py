"""Activation checkpointing per block: peak memory saved and time paid, ViT-B/16 at 224 px, batch 8.

One fwd+bwd step of `vit_base_patch16` (a squared-feature loss on the pooled output) with and without
`Backbone.set_grad_checkpointing()`, on this CPU: peak RSS of each in its own fresh process
(`benchmarks.common.peak_memory_mb`: VmHWM over three steps after a warm-up), and the step rate in
interleaved rounds (`benchmarks.common.compare`, medians). Printed: both peaks, the saving, both rates and
the time cost (checkpointed step time / plain step time - 1; about one extra block forward per block).

Run: `.venv/bin/python -m benchmarks.bench_checkpointing [--rounds 3] [--batch 8] [--size 224]`
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch

import ssl_vit
from benchmarks.common import compare, peak_memory_mb, pick_threads, train_step_fn

NAME = "vit_base_patch16"


def build(batch: int, *, checkpointing: bool, size: int = 224) -> Callable[[], None]:
    """A fwd+bwd step of ViT-B/16 on a fixed batch (module level: `peak_memory_mb` pickles it)."""
    torch.manual_seed(0)
    model = ssl_vit.create_backbone(NAME).train()
    model.set_grad_checkpointing(checkpointing)
    return train_step_fn(model, lambda: torch.randn(batch, 3, size, size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    threads = pick_threads()
    torch.set_num_threads(threads)
    variants = {"plain": False, "checkpointed": True}
    peaks = {k: peak_memory_mb(functools.partial(build, checkpointing=v, size=args.size), args.batch, threads)
             for k, v in variants.items()}
    steps = {k: build(args.batch, checkpointing=v, size=args.size) for k, v in variants.items()}
    rates = compare(steps, args.batch, rounds=args.rounds, warmup=1)
    (p_plain, g_plain), (p_ckpt, g_ckpt) = peaks["plain"], peaks["checkpointed"]
    print(f"{NAME} {args.size}px batch {args.batch} fwd+bwd, {threads} thread(s), {args.rounds} rounds")
    print(f"peak RSS   plain {p_plain:8.0f} MB (+{g_plain:.0f} over the steps)   checkpointed {p_ckpt:8.0f} MB "
          f"(+{g_ckpt:.0f})   saved {p_plain - p_ckpt:.0f} MB ({1 - p_ckpt / p_plain:.0%} of the peak, "
          f"{1 - g_ckpt / max(g_plain, 1e-9):.0%} of the step's growth)")
    print(f"step rate  plain {rates['plain']:6.2f} img/s   checkpointed {rates['checkpointed']:6.2f} img/s   "
          f"time cost {rates['plain'] / rates['checkpointed'] - 1:+.0%}")


if __name__ == "__main__":
    main()
