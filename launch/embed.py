"""Embeddings of an exported backbone for downstream use:
`python -m launch.embed --weights EXPORT --data SHARDS --out DIR [--format npy|parquet] [--umap]`.

The export's checksums are verified first (ssl_vit.load_backbone); images are normalised as the export's
config says (data.mean / data.std, ImageNet's without one) at the backbone's default size (or
`--image-size`), centre square as in evaluation. Every decodable sample of `--data` (one pass, in
ShardStream's seeded order) gives its key, its label (-1 without `cls`) and its pooled features.

DIR receives `features.npy` (N, D) float32, `labels.npy` (N,) int64 and `keys.json`, or with
`--format parquet` one `embeddings.parquet` (columns key, label, features; needs pyarrow), plus
`embeddings.json` (what was embedded, how) and, with `--umap`, `umap.png` (a 2-D UMAP of the features
coloured by label when labels exist; needs umap-learn). `checksums.json` is written last; DIR is written
under a temporary name and renamed into place. Video exports read clips of `data.frames` frames (the
export's config, else the backbone's default). Bad input: one line on stderr, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import ssl_vit
from ssl_vit.files import MANIFEST, atomic_dir, write_manifest

from .args import ArgumentParser
from .errors import LaunchError
from .knn import IMAGENET_MEAN, IMAGENET_STD, normalizer

__all__ = ["main", "embed", "parse_args"]

INFO_FILE = "embeddings.json"
PARQUET_FILE = "embeddings.parquet"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a usage error is one LaunchError line."""
    p = ArgumentParser(prog="python -m launch.embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="an export folder (backbone.safetensors + backbone.json)")
    p.add_argument("--data", required=True, help="WebDataset shards: a folder, a brace pattern or a list")
    p.add_argument("--out", required=True, help="a new (or earlier embeddings) folder for the results")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's)")
    p.add_argument("--format", choices=("npy", "parquet"), default="npy",
                   help="npy: features.npy + labels.npy + keys.json; parquet: one embeddings.parquet (pyarrow)")
    p.add_argument("--umap", action="store_true", help="also draw umap.png (needs umap-learn)")
    p.add_argument("--workers", type=int, default=2, help="decoding workers")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0 or (args.image_size is not None and args.image_size < 1):
        p.error("--batch-size and --image-size must be at least 1, --workers at least 0")
    return args


def _require_optional(args: argparse.Namespace) -> None:
    """Fail before anything is read or written when an optional package the flags need is missing."""
    if args.format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise LaunchError("--format parquet needs pyarrow, which is not installed: pip install pyarrow "
                              "(or use --format npy)") from None
    if args.umap:
        try:
            import umap  # noqa: F401
        except ImportError:
            raise LaunchError("--umap needs umap-learn, which is not installed: pip install umap-learn") from None


def _check_out(out: Path) -> None:
    """Refuse an --out that is a file, or a folder of something other than earlier embeddings."""
    if out.exists() and not out.is_dir():
        raise LaunchError(f"--out {out} is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not (out / INFO_FILE).is_file():
        raise LaunchError(f"--out {out} exists and does not hold embeddings; it would be replaced whole: "
                          "choose a new or empty folder")


def _input_size(model: nn.Module, requested: int | None) -> int:
    """--image-size, or the backbone's default; a multiple of its size_multiple."""
    size = requested or int(model.default_size[-1])
    m = int(model.size_multiple)
    if size % m:
        raise LaunchError(f"--image-size {size} is not a multiple of the backbone's size_multiple {m}")
    return size


def _prepare(mean: list[float], std: list[float], size: int, video: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 batch -> the backbone's input: launch.knn.normalizer, frame by frame for clips (B, 3, T, H, W)."""
    apply = normalizer(mean, std, size)
    if not video:
        return apply

    def clips(x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape[:3]
        frames = apply(x.transpose(1, 2).reshape(b * t, c, *x.shape[3:]))
        return frames.reshape(b, t, c, *frames.shape[-2:]).transpose(1, 2)
    return clips


def _frames(model: nn.Module, data_cfg: dict[str, Any]) -> tuple[int | None, int]:
    """(frames, stride) of the clips a video backbone reads, (None, 1) for images."""
    if not model.is_video:
        return None, 1
    return int(data_cfg.get("frames") or model.default_size[0]), int(data_cfg.get("frame_stride") or 1)


@torch.no_grad()
def embed(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """(features (N, D) float32, labels (N,) int64, keys, info) of every decodable sample of `args.data`."""
    from tqdm import tqdm

    from .data import ShardStream, check_shards, expand_shards, iter_batches, make_loader, shard_sizes

    model = ssl_vit.load_backbone(args.weights)  # checksums first
    meta = model.export_meta
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    size = _input_size(model, args.image_size)
    data_cfg = (meta.get("config") or {}).get("data") or {}
    mean, std = list(data_cfg.get("mean") or IMAGENET_MEAN), list(data_cfg.get("std") or IMAGENET_STD)
    frames, stride = _frames(model, data_cfg)
    prepare = _prepare(mean, std, size, frames is not None)

    urls = expand_shards(args.data)
    kind = check_shards(urls)
    if kind is not None and (kind == "video") != (frames is not None):
        raise LaunchError(f"--data {args.data} holds {'clips' if kind == 'video' else 'images'} but the export's "
                          f"{type(model).__name__} takes {'clips' if frames else 'images'}")
    stream = ShardStream(urls, batch_size=args.batch_size, image_size=size, infinite=False, need_labels=False,
                         frames=frames, frame_stride=stride)
    known = shard_sizes(urls)
    total = sum(known.values()) if len(known) == len(urls) else None
    feats: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    keys: list[str] = []
    with tqdm(total=total, unit="img", desc="embedding", dynamic_ncols=True, file=sys.stderr) as bar:
        for batch in iter_batches(make_loader(stream, args.workers)):
            x = prepare(batch["image"].to(device, non_blocking=True))
            feats.append(model.forward_features(x).pooled.float().cpu().numpy())
            labels.append(batch["label"].numpy().astype(np.int64))
            keys.extend(batch["key"])
            bar.update(len(batch["key"]))
    if not keys:
        raise LaunchError(f"--data {args.data}: no decodable samples to embed")
    features = np.concatenate(feats).astype(np.float32, copy=False)
    info = {"weights": str(Path(args.weights).resolve()), "data": args.data,
            "backbone": meta.get("registry_name") or meta.get("class_name") or meta.get("class"),
            "objective": meta.get("objective"), "step": meta.get("step"), "features": "pooled",
            "samples": len(keys), "dim": int(features.shape[1]), "image_size": size, "frames": frames,
            "mean": mean, "std": std, "format": args.format}
    return features, np.concatenate(labels), keys, info


def _write_parquet(path: Path, features: np.ndarray, labels: np.ndarray, keys: list[str]) -> None:
    """One table: key (string), label (int64), features (fixed-size list of float32)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), type=pa.float32()),
                                               features.shape[1])
    table = pa.table({"key": pa.array(keys, type=pa.string()), "label": pa.array(labels, type=pa.int64()),
                      "features": column})
    pq.write_table(table, str(path))


def _draw_umap(path: Path, features: np.ndarray, labels: np.ndarray, title: str) -> None:
    """A 2-D UMAP of the features, coloured by label when any sample has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import umap

    n = features.shape[0]
    if n < 3:
        raise LaunchError(f"--umap needs at least 3 samples, got {n}")
    points = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=0).fit_transform(features)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
    labelled = labels >= 0
    if labelled.any():
        if (~labelled).any():
            ax.scatter(points[~labelled, 0], points[~labelled, 1], s=6, c="lightgrey", label="no label")
        classes = np.unique(labels[labelled])
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for i, c in enumerate(classes):
            sel = labels == c
            ax.scatter(points[sel, 0], points[sel, 1], s=6, color=cmap(i % cmap.N), label=str(int(c)))
        if len(classes) <= 20:
            ax.legend(title="label", markerscale=2, fontsize=7, loc="best")
    else:
        ax.scatter(points[:, 0], points[:, 1], s=6)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_embeddings(out: Path, features: np.ndarray, labels: np.ndarray, keys: list[str], info: dict[str, Any],
                     *, fmt: str = "npy", draw_umap: bool = False) -> Path:
    """Write the results folder atomically (checksums.json last); returns it."""
    with atomic_dir(out) as tmp:
        if fmt == "parquet":
            _write_parquet(tmp / PARQUET_FILE, features, labels, keys)
        else:
            np.save(tmp / "features.npy", features)
            np.save(tmp / "labels.npy", labels)
            (tmp / "keys.json").write_text(json.dumps(keys) + "\n", encoding="utf-8")
        if draw_umap:
            _draw_umap(tmp / "umap.png", features, labels, f"{info['backbone']} ({len(keys)} samples)")
            info = {**info, "umap": "umap.png"}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        write_manifest(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    """The command: 0 on success, 2 with one line on stderr on bad input."""
    try:
        args = parse_args(argv)
        _require_optional(args)
        out = Path(args.out)
        _check_out(out)
        features, labels, keys, info = embed(args)
        write_embeddings(out, features, labels, keys, info, fmt=args.format, draw_umap=args.umap)
    except (ssl_vit.SslVitError, OSError, ValueError) as err:
        print(f"embed: error: {err}", file=sys.stderr)
        return 2
    what = PARQUET_FILE if args.format == "parquet" else "features.npy, labels.npy, keys.json"
    print(f"embedded {len(keys)} samples ({features.shape[1]}-d pooled features): {out} ({what}"
          f"{', umap.png' if args.umap else ''}; {MANIFEST})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
