"""Forward+backward throughput of each tiny preset, ours vs vit-pytorch's same configuration, one run.

    .venv-bench/bin/python -m benchmarks.bench_zoo_isotropic_a [--threads 1] [--batch 32] [--rounds 15]

Models: DeepViT, CaiT, T2T-ViT, CCT, CrossViT, XCiT. Each pair is built from the registry's
`<name>_tiny` preset (the same keyword arguments go to vit-pytorch's class) with 10 classes, and
run interleaved (benchmarks.common.compare). Prints images/s and the ratio ours / vit-pytorch.
"""

from __future__ import annotations

import argparse

import torch

import backbones
from benchmarks.common import compare, report, train_step_fn
from ssl_vit.registry import BACKBONES

CLASSES = 10


def pairs():
    """(title, ours, peer, input size) built with the same configuration."""
    from vit_pytorch import cait, cct, cross_vit, deepvit, t2t, xcit

    table = [
        ("deep_vit_tiny", backbones.DeepViT, deepvit.DeepViT),
        ("cait_tiny", backbones.CaiT, cait.CaiT),
        ("t2t_vit_tiny", backbones.T2TViT, t2t.T2TViT),
        ("cct_tiny", backbones.CCT, cct.CCT),
        ("cross_vit_tiny", backbones.CrossViT, cross_vit.CrossViT),
        ("xcit_tiny", backbones.XCiT, xcit.XCiT),
    ]
    for name, ours_cls, peer_cls in table:
        config = dict(BACKBONES.get(name).preset, num_classes=CLASSES)
        torch.manual_seed(0)
        ours = ours_cls(**config)
        peer = peer_cls(**config)
        size = config.get("image_size", config.get("img_size"))
        yield name, ours, peer, (size, size) if isinstance(size, int) else tuple(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} batch={args.batch} rounds={args.rounds} (forward+backward, train mode)")
    ratios = {}
    for name, ours, peer, size in pairs():
        ours.train()
        peer.train()
        x = torch.randn(args.batch, 3, *size)
        rates = compare({"ours": train_step_fn(ours, lambda x=x: x), "vit-pytorch": train_step_fn(peer, lambda x=x: x)},
                        images_per_call=args.batch, rounds=args.rounds, warmup=2)
        n_ours = sum(p.numel() for p in ours.parameters())
        n_peer = sum(p.numel() for p in peer.parameters())
        ratios[name] = report(f"{name} ({n_ours:,} / {n_peer:,} params)", rates, "ours", "vit-pytorch")
    slow = [n for n, r in ratios.items() if r < 0.9]
    print("all at or above 0.9x" if not slow else f"below 0.9x: {', '.join(slow)}")


if __name__ == "__main__":
    main()
