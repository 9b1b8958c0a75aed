"""Linear probe and weighted k-NN of an exported backbone: `accelerate launch linear_probe.py --weights DIR`.

Frozen features (pooled, or DINO's concatenated class tokens of the last blocks) are computed once,
each process embedding its share of the shards, then gathered. Several linear heads, one per
learning rate, train at once on the same features (the learning-rate sweep of DINO's linear
evaluation, Caron et al. 2021); top-1 / top-5 of each and of the best go to `results.json` and a
table. The weighted k-NN (k = 20, T = 0.07) runs on the same features. `--random-init` evaluates the
same architecture with fresh weights: the baseline a pretrained result is read against.
Head training is replicated on every process with one seed (features are small), so every process
agrees; the main process writes the results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ssl_vit
from ssl_vit.export import build_from_meta, read_meta

from .args import ArgumentParser
from .errors import LaunchError
from .knn import IMAGENET_MEAN, IMAGENET_STD, extract_features, knn_classify, last_blocks_cls, normalizer, topk_accuracy

__all__ = ["main", "run_probe", "train_linear_heads"]

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="linear_probe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="an export folder (backbone.safetensors + backbone.json)")
    p.add_argument("--train", help="labelled training shards (default: the embedded digits)")
    p.add_argument("--val", help="labelled validation shards (default: the embedded digits)")
    p.add_argument("--random-init", action="store_true", help="same architecture, fresh weights (the baseline)")
    p.add_argument("--n-last-blocks", type=int, default=0,
                   help="0: pooled features; n: class tokens of the last n blocks, concatenated (DINO)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="one linear head per rate")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256, help="images per process while embedding")
    p.add_argument("--head-batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--no-knn", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results folder (default: the weights folder, or <weights>/random_init)")
    p.add_argument("--cache", help="where the embedded digits shards are built")
    args = p.parse_args(argv)
    if (args.train is None) != (args.val is None):
        p.error("give both --train and --val, or neither (the embedded digits)")
    if args.epochs < 1 or args.n_last_blocks < 0 or args.k < 1 or args.temperature <= 0 or min(args.lrs) <= 0:
        p.error("--epochs and --k must be >= 1, --n-last-blocks >= 0, --temperature and --lrs > 0")
    return args


def train_linear_heads(train_f: torch.Tensor, train_y: torch.Tensor, lrs: list[float], num_classes: int, *,
                       epochs: int = 100, batch_size: int = 256, seed: int = 0) -> nn.ModuleList:
    """One linear head per learning rate, trained together on the same shuffled mini-batches
    (SGD, momentum 0.9, cosine schedule, no weight decay). train_f (N, D) -> heads (D -> C)."""
    g = torch.Generator().manual_seed(seed)
    dim = train_f.shape[1]
    heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in lrs).to(train_f.device)
    for h in heads:  # DINO's head init
        nn.init.normal_(h.weight, std=0.01, generator=g)
        nn.init.zeros_(h.bias)
    opt = torch.optim.SGD([{"params": h.parameters(), "lr": lr} for h, lr in zip(heads, lrs)], momentum=0.9)
    n = train_f.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(train_f.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x, y = train_f[idx], train_y[idx]
            scale = 0.5 * (1 + math.cos(math.pi * step / total))
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * scale
            # every head sees the same batch; the summed loss gives each head its own gradient
            loss = sum(F.cross_entropy(h(x), y) for h in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return heads


def _loaders(args: argparse.Namespace, accelerator, size: int):
    from .data import ShardStream, check_shards, expand_shards, make_loader

    if args.train is None:
        from .digits import digits_shards
        train, val = digits_shards(args.cache)
    else:
        train, val = args.train, args.val
    made = []
    for spec in (train, val):
        urls = expand_shards(spec)
        check_shards(urls)
        stream = ShardStream(urls, batch_size=args.batch_size, image_size=size, rank=accelerator.process_index,
                             world=accelerator.num_processes, seed=args.seed, infinite=False, need_labels=True)
        made.append(make_loader(stream, args.workers))
    return made


def _input_size(model: nn.Module, requested: int | None) -> int:
    size = requested or int(model.default_size[-1])
    m = model.size_multiple
    if size % m:
        raise LaunchError(f"--image-size {size} is not a multiple of the backbone's size_multiple {m}")
    return size


def run_probe(args: argparse.Namespace, accelerator) -> dict[str, Any]:
    """Evaluate and return the results dict (also written to results.json by the main process)."""
    meta = read_meta(args.weights)
    if args.random_init:
        torch.manual_seed(args.seed)
        model = build_from_meta(meta)
    else:
        model = ssl_vit.load_backbone(args.weights)
    model = model.to(accelerator.device).eval()
    size = _input_size(model, args.image_size)
    data_cfg = (meta.get("config") or {}).get("data") or {}
    prepare = normalizer(data_cfg.get("mean", IMAGENET_MEAN), data_cfg.get("std", IMAGENET_STD), size)
    features = last_blocks_cls(model, args.n_last_blocks) if args.n_last_blocks else None
    train_loader, val_loader = _loaders(args, accelerator, size)
    train_f, train_y = extract_features(model, train_loader, accelerator, prepare=prepare, features=features)
    val_f, val_y = extract_features(model, val_loader, accelerator, prepare=prepare, features=features)
    if train_f.shape[0] == 0 or val_f.shape[0] == 0:
        raise LaunchError("no labelled samples (a `cls` entry per sample) in the training or validation shards")
    num_classes = int(max(train_y.max(), val_y.max())) + 1

    results: dict[str, Any] = {
        "weights": str(args.weights), "random_init": bool(args.random_init),
        "backbone": meta.get("registry_name") or meta.get("class_name") or meta.get("class"),
        "objective": meta.get("objective"), "step": meta.get("step"),
        "features": f"cls_last{args.n_last_blocks}" if args.n_last_blocks else "pooled",
        "feature_dim": int(train_f.shape[1]), "image_size": size, "num_classes": num_classes,
        "train_samples": int(train_f.shape[0]), "val_samples": int(val_f.shape[0]),
    }
    if not args.no_knn:
        scores = knn_classify(train_f, train_y, val_f, k=args.k, t=args.temperature, num_classes=num_classes)
        top1, top5 = topk_accuracy(scores, val_y)
        results["knn"] = {"k": args.k, "temperature": args.temperature, "top1": top1, "top5": top5}

    # standardise with training statistics, so one set of learning rates fits any backbone's scale
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    train_n, val_n = (train_f - mean) / std, (val_f - mean) / std
    heads = train_linear_heads(train_n, train_y, list(args.lrs), num_classes, epochs=args.epochs,
                               batch_size=args.head_batch_size, seed=args.seed)
    rows = []
    with torch.no_grad():
        for lr, head in zip(args.lrs, heads):
            top1, top5 = topk_accuracy(head(val_n), val_y)
            rows.append({"lr": lr, "top1": top1, "top5": top5})
    results["linear"] = rows
    results["best"] = max(rows, key=lambda r: (r["top1"], r["top5"]))
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = [f"linear probe of {results['backbone']} ({'random init' if results['random_init'] else 'pretrained'}"
             f", {results['features']} features, {results['train_samples']} train / {results['val_samples']} val)",
             f"{'head':>12} {'top-1':>8} {'top-5':>8}"]
    for r in results["linear"]:
        lines.append(f"{'lr ' + format(r['lr'], 'g'):>12} {r['top1']:8.2f} {r['top5']:8.2f}")
    b = results["best"]
    lines.append(f"{'best':>12} {b['top1']:8.2f} {b['top5']:8.2f}  (lr {b['lr']:g})")
    if "knn" in results:
        kn = results["knn"]
        lines.append(f"{'k-NN k=' + str(kn['k']):>12} {kn['top1']:8.2f} {kn['top5']:8.2f}  (T {kn['temperature']:g})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        from accelerate import Accelerator

        accelerator = Accelerator()
        results = run_probe(args, accelerator)
        if accelerator.is_main_process:
            out = Path(args.out) if args.out else Path(args.weights) / ("random_init" if args.random_init else "")
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            print(format_table(results))
            print(f"results: {out / 'results.json'}")
    except (ssl_vit.SslVitError, OSError, ValueError) as err:
        print(f"linear_probe.py: error: {err}", file=sys.stderr)
        return 2
    return 0
