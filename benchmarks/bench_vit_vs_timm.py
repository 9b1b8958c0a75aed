"""ViT-S/16 forward+backward throughput at batch 16, ours vs timm's vit_small_patch16_224, one run.

    .venv-bench/bin/python -m benchmarks.bench_vit_vs_timm [--threads N] [--batch 16] [--rounds 5]

Both models have the same shapes (dim 384, depth 12, 6 heads, qkv bias); both run on
F.scaled_dot_product_attention. Prints images/s of each and the ratio ours / timm.
"""

from __future__ import annotations

import argparse

import timm
import torch

import ssl_vit
from benchmarks.common import compare, report, train_step_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = ssl_vit.create_backbone("vit_small_patch16")
    peer = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_peer = sum(p.numel() for p in peer.parameters())
    print(f"threads={args.threads} batch={args.batch} params ours={n_ours:,} timm={n_peer:,}")
    batch = lambda: torch.randn(args.batch, 3, 224, 224)
    rates = compare({"ours": train_step_fn(ours, batch), "timm": train_step_fn(peer, batch)},
                    images_per_call=args.batch, rounds=args.rounds, warmup=1)
    report("ViT-S/16 fwd+bwd", rates, "ours", "timm")


if __name__ == "__main__":
    main()
