"""Forward+backward throughput on the CPU: ours vs vit-pytorch, ScalableViT, SepViT, MaxViT, NesT, MobileViT.

Each model is built at its `<name>_tiny` preset and the vit-pytorch class with the same keyword
arguments, timed interleaved in one run (benchmarks.common.compare); the ratio is ours / theirs.
Where the seed cannot run the preset as is, the closest configuration both run is used:
SepViT's seed always uses 7x7 windows and 32-wide heads, so both get window 7, dim_head 32 at 56 px;
MobileViT's seed hard-codes 4 heads of width 8, so ours gets heads=4, dim_head=8.

Run from the repository root: `.venv-bench/bin/python -m benchmarks.bench_zoo_hierarchical_b [--batch 8]`.
"""

from __future__ import annotations

import argparse

import torch

import ssl_vit

from .common import compare, report, train_step_fn

NUM_CLASSES = 10


def cases() -> list[tuple[str, dict, int, object]]:
    """(registry name, overrides for ours, input size, builder of the vit-pytorch model)."""
    from vit_pytorch.max_vit import MaxViT
    from vit_pytorch.mobile_vit import MobileViT
    from vit_pytorch.nest import NesT
    from vit_pytorch.scalable_vit import ScalableViT
    from vit_pytorch.sep_vit import SepViT

    def preset(name: str) -> dict:
        return dict(ssl_vit.registry.BACKBONES.get(name).preset)

    def without(d: dict, *keys: str) -> dict:
        return {k: v for k, v in d.items() if k not in keys}

    sc = preset("scalable_vit_tiny")
    sep = {**preset("sep_vit_tiny"), "window_size": 7, "dim_head": 32, "image_size": 56}
    mx = preset("max_vit_tiny")
    ne = preset("nest_tiny")
    mb = {**preset("mobile_vit_tiny"), "heads": 4, "dim_head": 8}
    return [
        ("scalable_vit_tiny", {}, 32, lambda: ScalableViT(num_classes=NUM_CLASSES, **without(sc, "image_size"))),
        ("sep_vit_tiny", sep, 56, lambda: SepViT(num_classes=NUM_CLASSES, **without(sep, "image_size", "window_size",
                                                                                     "dim_head"))),
        ("max_vit_tiny", {}, 32, lambda: MaxViT(num_classes=NUM_CLASSES, **without(mx, "image_size"))),
        ("nest_tiny", {}, 32, lambda: NesT(num_classes=NUM_CLASSES, **without(ne, "dim_head"))),
        ("mobile_vit_tiny", mb, 64, lambda: MobileViT(num_classes=NUM_CLASSES, **without(mb, "heads", "dim_head"))),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default="", help="substring of the registry names to run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ratios = {}
    for name, overrides, size, build_theirs in cases():
        if args.only not in name:
            continue
        torch.manual_seed(0)
        ours = ssl_vit.create_backbone(name, num_classes=NUM_CLASSES, **overrides).train()
        theirs = build_theirs().train()
        batch = torch.randn(args.batch, 3, size, size)
        with torch.no_grad():
            assert ours(batch).shape == theirs(batch).shape == (args.batch, NUM_CLASSES)
        n_ours = sum(p.numel() for p in ours.parameters())
        n_theirs = sum(p.numel() for p in theirs.parameters())
        rates = compare({"ours": train_step_fn(ours, lambda b=batch: b),
                         "vit-pytorch": train_step_fn(theirs, lambda b=batch: b)},
                        images_per_call=args.batch, rounds=args.rounds)
        ratios[name] = report(f"{name} @{size}px ({n_ours}/{n_theirs} params)", rates, "ours", "vit-pytorch")
    if ratios:
        print(f"slowest ratio: {min(ratios.values()):.2f}x ({min(ratios, key=ratios.get)})")


if __name__ == "__main__":
    main()
