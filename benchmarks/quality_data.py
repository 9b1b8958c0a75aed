"""The learning-quality benchmark's data sets, as WebDataset shards in the project's own format.

- `digits`: the launcher's embedded data set (launch.digits: scikit-learn's 1797 handwritten digits,
  10 classes, a fixed stratified 85/15 train/val split), decoded at the 32 px canvas.
- `photos`: 32 px crops of the colour photographs that ship inside scikit-image (`skimage.data`) and
  scikit-learn (`load_sample_images`), labelled by source photograph (10 classes). Each photograph is
  cut into a 4 x 4 grid of blocks; four blocks, one per row and column, are held out, so no held-out
  crop overlaps a training crop. A crop is a random square inside one block (30-100 % of the block's
  shorter side), resized to 32 px with antialiasing. Fixed seed: the same bytes on every machine.

Both are built on first use into `$SSL_VIT_CACHE` (default ~/.cache/ssl_vit) in a temporary folder that
is renamed when complete, like the digits. `load_split` reads a split back through the launcher's
shard stream, as uint8 tensors.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from launch.digits import cache_dir, digits_shards
from launch.make_shards import ShardWriter, pattern

__all__ = ["DATASETS", "PHOTOS", "dataset_shards", "photo_shards", "load_split"]

VERSION = "photos-v1"
DATASETS = ("digits", "photos")
# (name, loader): the colour photographs shipped with the packages (no download)
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "motorcycle", "retina",
          "rocket", "china", "flower")
GRID = 4
HELD_OUT = {(0, 1), (1, 3), (2, 0), (3, 2)}  # one block per row and per column
TRAIN_PER_PHOTO, VAL_PER_PHOTO = 150, 40
SIZE = 32
TRAIN_SHARDS, VAL_SHARDS = 8, 2


def _photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 of one shipped photograph."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"))
    import skimage.data

    if name == "motorcycle":
        return np.asarray(skimage.data.stereo_motorcycle()[0])
    return np.asarray(getattr(skimage.data, name)())[..., :3]


def _crops(image: np.ndarray, blocks: list[tuple[int, int]], count: int, rng: np.random.Generator) -> list[bytes]:
    """`count` PNG crops (SIZE px) of `image`, each a random square inside one of `blocks`."""
    h, w = image.shape[:2]
    bh, bw = h // GRID, w // GRID
    side = min(bh, bw)
    pil = Image.fromarray(image)
    out = []
    for i in range(count):
        r, c = blocks[i % len(blocks)]
        s = int(rng.integers(max(SIZE // 2, int(0.3 * side)), side + 1))
        y = r * bh + int(rng.integers(0, bh - s + 1))
        x = c * bw + int(rng.integers(0, bw - s + 1))
        crop = pil.crop((x, y, x + s, y + s)).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        crop.save(buf, format="PNG", optimize=False)
        out.append(buf.getvalue())
    return out


def _write(folder: Path, prefix: str, samples: list[tuple[bytes, int]], shards: int) -> str:
    writer = ShardWriter(folder, prefix, -(-len(samples) // shards))
    for i, (png, label) in enumerate(samples):
        writer.write(f"{prefix}{i:05d}", {"png": png, "cls": str(label).encode()})
    writer.close()
    return pattern(prefix, len(writer.shards))


def photo_shards(cache: str | None = None) -> tuple[str, str]:
    """(train pattern, val pattern) of the photo crops, building them if needed."""
    folder = cache_dir(cache) / VERSION
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        rng = np.random.default_rng(0)
        train_blocks = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in HELD_OUT]
        val_blocks = sorted(HELD_OUT)
        train, val = [], []
        for label, name in enumerate(PHOTOS):
            image = _photo(name)
            train += [(png, label) for png in _crops(image, train_blocks, TRAIN_PER_PHOTO, rng)]
            val += [(png, label) for png in _crops(image, val_blocks, VAL_PER_PHOTO, rng)]
        order = rng.permutation(len(train))  # mixed classes in every shard
        train = [train[i] for i in order]
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{VERSION}-", dir=folder.parent))
        info = {"name": "photo crops (skimage.data, sklearn sample images)", "classes": list(PHOTOS),
                "num_classes": len(PHOTOS), "train": _write(tmp, "train", train, TRAIN_SHARDS),
                "val": _write(tmp, "val", val, VAL_SHARDS), "train_samples": len(train), "val_samples": len(val),
                "grid": GRID, "held_out_blocks": sorted(HELD_OUT), "size": SIZE, "seed": 0}
        (tmp / "manifest.json").write_text(json.dumps(info, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads(manifest.read_text())
    return str(folder / info["train"]), str(folder / info["val"])


def dataset_shards(name: str, cache: str | None = None) -> tuple[str, str]:
    """(train pattern, val pattern) of a benchmark data set (`digits` or `photos`)."""
    if name == "digits":
        return digits_shards(cache)
    if name == "photos":
        return photo_shards(cache)
    raise ValueError(f"unknown data set {name!r}; one of {', '.join(DATASETS)}")


def load_split(spec: str, size: int = SIZE, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, 3, size, size), labels (N,)) of one split, read through the launcher's stream
    in shard order; at most `limit` samples, a fixed random subset (seed 0) when there are more."""
    from launch.data import ShardStream, expand_shards, make_loader

    stream = ShardStream(expand_shards(spec), batch_size=256, image_size=size, seed=0, infinite=False,
                         need_labels=True)
    images, labels = [], []
    for batch in make_loader(stream, 0):
        images.append(batch["image"])
        labels.append(batch["label"])
    x, y = torch.cat(images), torch.cat(labels)
    if limit and limit < len(y):
        pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        x, y = x[pick], y[pick]
    return x, y
