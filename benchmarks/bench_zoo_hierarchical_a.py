"""Forward+backward throughput on the CPU of PiT, LeViT, CvT, Twins-SVT, RegionViT and CrossFormer at
their `*_tiny` configurations: ours vs the vit-pytorch package's same configuration, interleaved.

    .venv-bench/bin/python -m benchmarks.bench_zoo_hierarchical_a [--threads 1] [--batch 16] [--rounds 7]
        [--only cvt,pit]

Each pair is built from the same keyword arguments (our tiny preset, less the arguments the seed
does not take), with a 10-class head, in train mode, on random images at the preset's size.
Prints images/s of each and the ratio ours / vit-pytorch per model.
"""

from __future__ import annotations

import argparse

import torch
from vit_pytorch.crossformer import CrossFormer as PeerCrossFormer
from vit_pytorch.cvt import CvT as PeerCvT
from vit_pytorch.levit import LeViT as PeerLeViT
from vit_pytorch.pit import PiT as PeerPiT
from vit_pytorch.regionvit import RegionViT as PeerRegionViT
from vit_pytorch.twins_svt import TwinsSVT as PeerTwinsSVT

import ssl_vit
from benchmarks.common import compare, report, train_step_fn

# name -> (peer class, the preset arguments the peer does not take)
PEERS = {
    "pit": (PeerPiT, ()),
    "levit": (PeerLeViT, ()),
    "cvt": (PeerCvT, ("image_size",)),
    "twins_svt": (PeerTwinsSVT, ("image_size",)),
    "regionvit": (PeerRegionViT, ("image_size",)),
    "crossformer": (PeerCrossFormer, ("image_size",)),
}


def peer_kwargs(name: str) -> dict:
    preset = dict(ssl_vit.registry.BACKBONES.get(f"{name}_tiny").preset)
    for key in PEERS[name][1]:
        preset.pop(key, None)
    return {**preset, "num_classes": 10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(PEERS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in PEERS if not args.only or n in args.only.split(",")]
    print(f"threads={args.threads} batch={args.batch} rounds={args.rounds}")
    ratios = {}
    for name in names:
        torch.manual_seed(0)
        ours = ssl_vit.create_backbone(f"{name}_tiny", num_classes=10).train()
        peer = PEERS[name][0](**peer_kwargs(name)).train()
        size = ours.default_size
        n_ours = sum(p.numel() for p in ours.parameters())
        n_peer = sum(p.numel() for p in peer.parameters())
        batch = lambda size=size: torch.randn(args.batch, 3, *size)
        rates = compare({"ours": train_step_fn(ours, batch), "vit-pytorch": train_step_fn(peer, batch)},
                        images_per_call=args.batch, rounds=args.rounds, warmup=2)
        ratios[name] = report(f"{name}_tiny {size[0]}x{size[1]} ({n_ours:,} / {n_peer:,} params)", rates,
                              "ours", "vit-pytorch")
    print("slowest ratio:", min(ratios.values()) if ratios else None)


if __name__ == "__main__":
    main()
