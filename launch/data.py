"""WebDataset streaming: shards -> uint8 image (or clip) batches, decoded and batched in CPU workers.

A sample is `__key__`, an image (`jpg`, `png` or `webp`) and optionally `cls`. A batch is
`{"image": uint8 (B, 3, S, S), "label": long (B,) (-1 without labels), "key": list[str],
"skipped": (2,) long [worker, samples skipped so far by it]}`. Workers only decode and resize to the
fixed canvas S x S (shorter side to S, centre crop); every random augmentation happens later on the
accelerator (objectives.views).

Video (`ShardStream(frames=T, frame_stride=s)`): a sample is a clip (`npy` or numbered frames, see
launch.video); workers decode `T` frames `s` apart from a random start and the batch holds
`"image": uint8 (B, 3, T, S, S)`. The start is drawn from an RNG seeded by (seed, epoch, part,
position in the part's stream), so a resumed run samples the same frames as an uninterrupted one.

Determinism, which exact resume relies on: the shard order of an epoch is a function of
(seed, epoch) only; process `rank` of `world` with `W` workers reads part `rank * W + worker` of
`world * W` (by shards when there are enough, else by samples); shuffle buffers are seeded by
(seed, epoch, part). The DataLoader takes batches from its workers in turn, so the position in the
stream is one number: the batches this process has consumed (`skip_batches` fast-forwards to it).
"""

from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from .errors import LaunchError
from .video import decode_clip, is_clip_member, is_clip_sample

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_shards(spec: str) -> list[str]:
    """Shard URLs from a spec: a `.tar` path, a folder of `.tar` files, a brace pattern
    (`shards/train-{000000..000099}.tar`), a `pipe:` / URL, or several joined by `::`.
    Local files must exist; LaunchError otherwise."""
    if not spec or not str(spec).strip():
        raise LaunchError("empty data path: pass shards with --data (a .tar, a folder of .tar, or a brace pattern)")
    urls: list[str] = []
    for part in str(spec).split("::"):
        part = part.strip()
        if not part:
            continue
        if part.startswith("pipe:") or "://" in part:
            urls.extend(expand_urls(part))
            continue
        path = Path(part)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise LaunchError(f"data folder {path} holds no .tar shards "
                                  "(make them with python -m launch.make_shards)")
            urls.extend(found)
            continue
        expanded = expand_urls(part)
        missing = [u for u in expanded if not Path(u).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise LaunchError(f"data path {missing[0]}{more} does not exist")
        urls.extend(expanded)
    if not urls:
        raise LaunchError(f"data path '{spec}' names no shards")
    return urls


def check_shards(urls: list[str], limit: int = 3) -> str | None:
    """What the first local shards hold: "image", "video" (clips: `npy` or numbered frames) or None
    when no shard is local (pipe: / URLs are not opened). LaunchError when they hold neither."""
    local = [u for u in urls if not (u.startswith("pipe:") or "://" in u)][:limit]
    if not local:
        return None
    for url in local:
        try:
            with tarfile.open(url) as tar:
                names = tar.getnames()
        except (tarfile.TarError, OSError) as err:
            raise LaunchError(f"shard {url} is not a readable tar file: {err}") from None
        # clip members first: a numbered frame `<key>.000.jpg` also ends in an image extension
        if any(is_clip_member(n) for n in names):
            return "video"
        if any(n.rsplit(".", 1)[-1].lower() in IMAGE_KEYS for n in names):
            return "image"
    raise LaunchError(f"shards {', '.join(local)} hold no images (jpg, png or webp) and no clips (npy or numbered "
                      "frames); see python -m launch.make_shards")


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Image bytes -> uint8 (3, size, size): shorter side resized to `size`, centre crop."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it is much larger
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _label(sample: dict) -> int | None:
    raw = sample.get("cls")
    if raw is None:
        return None
    return int(raw.decode().strip() if isinstance(raw, bytes) else raw)


class ShardStream(IterableDataset):
    """Batches from WebDataset shards, for one process of `world`; see the module docstring.

    infinite=True repeats epochs forever (training); False gives one pass, the last batch partial
    (validation). resampled=True draws shards with replacement instead of epochs over them.
    need_labels=True skips (and counts) samples without a `cls`.
    frames: None reads images; a number reads clips of that many frames `frame_stride` apart (image
    samples are then skipped and counted, as clip samples are when reading images).
    """

    def __init__(self, urls: list[str], *, batch_size: int, image_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle_buffer: int = 0, resampled: bool = False, infinite: bool = True,
                 need_labels: bool = False, skip_batches: int = 0, frames: int | None = None,
                 frame_stride: int = 1) -> None:
        super().__init__()
        if frames is not None and (frames < 1 or frame_stride < 1):
            raise LaunchError(f"data.frames and data.frame_stride must be at least 1, got {frames}, {frame_stride}")
        self.urls, self.batch_size, self.image_size = list(urls), batch_size, image_size
        self.rank, self.world, self.seed = rank, world, seed
        self.shuffle_buffer, self.resampled, self.infinite = shuffle_buffer, resampled, infinite
        self.need_labels, self.skip_batches = need_labels, skip_batches
        self.frames, self.frame_stride = frames, frame_stride

    def _epoch_samples(self, epoch: int, part: int, parts: int, on_error) -> Iterator[dict]:
        if self.resampled:
            rng = random.Random(f"resample-{self.seed}-{epoch}-{part}")
            shards = [rng.choice(self.urls) for _ in range(max(1, len(self.urls) // parts))]
            split = None
        else:
            shards = list(self.urls)
            random.Random(f"shards-{self.seed}-{epoch}").shuffle(shards)
            split = None if len(shards) >= parts else (part, parts)
            if split is None:
                shards = shards[part::parts]
        samples = wds.tarfile_samples([{"url": u} for u in shards], handler=on_error)
        if split is not None:  # fewer shards than readers: every reader takes every parts-th sample
            samples = (s for i, s in enumerate(samples) if i % split[1] == split[0])
        if self.shuffle_buffer > 1:
            samples = _shuffle(samples, self.shuffle_buffer, random.Random(f"shuffle-{self.seed}-{epoch}-{part}"))
        return samples

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader always asks worker 0 first; after `skip_batches` the next batch is due from the
        # part (skip_batches % workers), so worker w plays the part of worker (w + skip_batches) % workers.
        worker = (worker + self.skip_batches) % workers
        part, parts = self.rank * workers + worker, self.world * workers
        to_skip = len(range(worker, self.skip_batches, workers))  # batches this part already delivered
        skipped = [0]

        def on_error(err: Exception) -> bool:  # unreadable tar member or shard: count and go on
            skipped[0] += 1
            return True

        epoch = 0
        while True:
            batch: list[tuple[torch.Tensor, int, str]] = []
            decoded = 0
            for index, sample in enumerate(self._epoch_samples(epoch, part, parts, on_error)):
                # skipped batches are decoded too (and draw their frames), so the stream stays aligned
                rng = random.Random(f"clip-{self.seed}-{epoch}-{part}-{index}") if self.frames else None
                item = self._decode(sample, rng)
                if item is None:
                    skipped[0] += 1
                    continue
                decoded += 1
                batch.append(item)
                if len(batch) == self.batch_size:
                    if to_skip > 0:
                        to_skip -= 1
                    else:
                        yield self._collate(batch, part, skipped[0])
                    batch = []
            if not self.infinite:
                if batch and to_skip <= 0:
                    yield self._collate(batch, part, skipped[0])
                return
            if decoded == 0:
                raise LaunchError(f"data part {part} of {parts}: no decodable samples in its shards "
                                  f"({skipped[0]} skipped){' with labels' if self.need_labels else ''}")
            epoch += 1

    def _decode(self, sample: dict, rng: random.Random | None = None) -> tuple[torch.Tensor, int, str] | None:
        if self.frames:
            if not is_clip_sample(sample):
                return None
            data = None
        else:
            data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if data is None:
                return None
        try:
            label = _label(sample)
            if data is None:
                image = decode_clip(sample, frames=self.frames, stride=self.frame_stride, size=self.image_size,
                                    rng=rng)
            else:
                image = decode_image(data, self.image_size)
        except Exception:  # undecodable image, clip or label: skipped and counted, never a crash
            return None
        if label is None:
            if self.need_labels:
                return None
            label = -1
        return image, label, str(sample.get("__key__", ""))

    @staticmethod
    def _collate(batch: list, part: int, skipped: int) -> dict:
        images, labels, keys = zip(*batch)
        return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long), "key": list(keys),
                "skipped": torch.tensor([part, skipped], dtype=torch.long)}


def _shuffle(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A seeded shuffle buffer of `size` samples."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader over a ShardStream: batching already happens in the workers. Its own generator,
    so starting it never draws from the global RNG (resume replays that RNG exactly)."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))


class SkipCounter:
    """Sums the per-worker skip counts that batches carry: `update(batch)`, `total`."""

    def __init__(self) -> None:
        self.by_part: dict[int, int] = {}

    def update(self, batch: dict) -> None:
        part, count = (int(v) for v in batch["skipped"])
        self.by_part[part] = max(count, self.by_part.get(part, 0))

    @property
    def total(self) -> int:
        return sum(self.by_part.values())
