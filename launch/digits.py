"""The embedded default dataset: scikit-learn's bundled handwritten digits as WebDataset shards.

1797 real 8x8 grey-level scans of handwritten digits (10 classes, UCI optdigits), shipped inside
scikit-learn, so a run needs no download. Built on first use into a cache folder, with a fixed,
stratified train/val split (85 % / 15 %), as 8 train shards and 2 val shards (enough shards for two
processes with two workers each to read different ones). `manifest.json` lists every shard with its
sample count (`"shards"`), as launch.make_shards does, so the loader counts what a damaged shard lost.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_vit.files import atomic_dir

from .make_shards import ShardWriter, pattern

VERSION = "digits-v1"
TRAIN_SHARDS, VAL_SHARDS = 8, 2


def cache_dir(cache: str | None = None) -> Path:
    """`cache`, else $SSL_VIT_CACHE, else ~/.cache/ssl_vit."""
    root = cache or os.environ.get("SSL_VIT_CACHE") or Path.home() / ".cache" / "ssl_vit"
    return Path(root)


def _png(pixels: np.ndarray) -> bytes:
    # sklearn stores ink as 0..16 on a white=0 scale; draw dark ink on light paper, 8-bit.
    img = Image.fromarray((255 - pixels * (255 / 16)).round().astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _write(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, shards: int) -> tuple[str, list[dict]]:
    """(brace pattern, [{"name", "samples"}, ...]) of the shards written."""
    per_shard = -(-len(images) // shards)
    writer = ShardWriter(folder, prefix, per_shard)
    for i, (pixels, label) in enumerate(zip(images, labels)):
        writer.write(f"{prefix}{i:05d}", {"png": _png(pixels), "cls": str(int(label)).encode()})
    writer.close()
    return pattern(prefix, len(writer.shards)), writer.shards


def digits_shards(cache: str | None = None) -> tuple[str, str]:
    """(train pattern, val pattern): brace patterns of the digits shards, building them if needed.

    Built in a temporary folder and renamed, so concurrent processes and interrupted builds never
    leave a half-written dataset.
    """
    folder = cache_dir(cache) / VERSION
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        idx = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(idx, test_size=0.15, random_state=0, stratify=digits.target)
        train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
        with atomic_dir(folder, keep_existing=True) as tmp:  # another process finished first: keep theirs
            train, train_shards = _write(tmp, "train", digits.images[train_idx], digits.target[train_idx],
                                         TRAIN_SHARDS)
            val, val_shards = _write(tmp, "val", digits.images[val_idx], digits.target[val_idx], VAL_SHARDS)
            info = {"name": "sklearn digits", "train": train, "val": val, "train_samples": len(train_idx),
                    "val_samples": len(val_idx), "classes": [str(c) for c in range(10)], "num_classes": 10,
                    "shards": train_shards + val_shards}
            (tmp / "manifest.json").write_text(json.dumps(info, indent=1))
    info = json.loads(manifest.read_text())
    return str(folder / info["train"]), str(folder / info["val"])
