"""Forward+backward throughput of each tiny preset, ours vs vit-pytorch's same configuration, one run.

    .venv-bench/bin/python -m benchmarks.bench_zoo_isotropic_b [--threads 1] [--batch 32] [--rounds 15]

Models: ATS-ViT, ViT with Patch Merger, ViT for small datasets, Parallel ViT, the learnable-memory
Adapter (over a ViT), NaViT (variable-size images packed four to a sequence), and the timm wrapper
against plain timm. Contenders run interleaved (benchmarks.common.compare); prints images/s and the
ratio ours / peer per model.
"""

from __future__ import annotations

import argparse

import torch
from timm.models.vision_transformer import VisionTransformer

import backbones
from benchmarks.common import compare, report, train_step_fn

CLASSES = 10
TINY = dict(image_size=32, patch_size=8, num_classes=CLASSES, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128)


def pairs():
    """(title, ours, peer, input kind): each pair built with the same configuration."""
    from vit_pytorch import (
        ats_vit,
        learnable_memory_vit,
        na_vit,
        parallel_vit,
        vit_for_small_dataset,
        vit_with_patch_merger,
    )

    ats = dict(TINY, max_tokens_per_depth=(12, 6))
    merge = dict(TINY, patch_merge_layer=1, patch_merge_num_tokens=4)
    yield "ats_vit", backbones.ATSViT(**ats), ats_vit.ViT(**ats), None
    yield "patch_merger_vit", backbones.PatchMergerViT(**merge), vit_with_patch_merger.ViT(**merge), None
    yield "small_dataset_vit", backbones.SmallDatasetViT(**TINY), vit_for_small_dataset.ViT(**TINY), None
    par = dict(TINY, num_parallel_branches=2)
    yield "parallel_vit", backbones.ParallelViT(**par), parallel_vit.ViT(**par), None
    ours_mem = backbones.Adapter(vit=backbones.ViT(**TINY), num_classes=CLASSES, num_memories_per_layer=4)
    peer_mem = learnable_memory_vit.Adapter(vit=learnable_memory_vit.ViT(**TINY), num_classes=CLASSES,
                                            num_memories_per_layer=4)
    yield "memory_vit (Adapter)", ours_mem, peer_mem, None
    nav = dict(TINY, token_dropout_prob=0.1)
    yield "na_vit (packed lists)", backbones.NaViT(**nav), na_vit.NaViT(**nav), "packed"
    timm_kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)
    yield ("timm_vit_tiny (wrapped vs timm)", backbones.TimmViT(num_classes=CLASSES, **timm_kwargs),
           VisionTransformer(num_classes=CLASSES, **timm_kwargs), None)


def packed_batch(batch: int):
    """`batch` images of four sizes, as sequences of four images (both NaViTs take this form)."""
    sizes = [(32, 32), (16, 32), (32, 16), (16, 16)]
    images = [torch.randn(3, *sizes[i % 4]) for i in range(batch)]
    return lambda: [images[i:i + 4] for i in range(0, batch, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={args.threads} batch={args.batch} rounds={args.rounds}; fwd+bwd images/s, ratio = ours / peer")
    ratios = {}
    for title, ours, peer, kind in pairs():
        ours.train()
        peer.train()
        if kind == "packed":
            make = packed_batch(args.batch)
        else:
            fixed = torch.randn(args.batch, 3, 32, 32)
            make = lambda fixed=fixed: fixed
        rates = compare({"ours": train_step_fn(ours, make), "peer": train_step_fn(peer, make)},
                        images_per_call=args.batch, rounds=args.rounds, warmup=2)
        ratios[title] = report(title, rates, "ours", "peer")
    slow = {k: v for k, v in ratios.items() if v < 0.9}
    print("all >= 0.9x" if not slow else f"below 0.9x: {slow}")


if __name__ == "__main__":
    main()
