"""WebDataset streaming: shards -> uint8 image (or clip) batches, decoded and batched in CPU workers.

A sample is `__key__`, an image (`jpg`, `png` or `webp`) and optionally `cls`. A batch is
`{"image": uint8 (B, 3, S, S), "box": float (B, 4), "label": long (B,) (-1 without labels),
"key": list[str], "skipped": long (2,), "faults": dict}`. Workers only decode and fit to the fixed
canvas S x S (`image_size`); every random augmentation happens later on the accelerator
(objectives.views.make_views, which draws its crops inside `batch["box"]`).

Canvas (`launch.video.fit_canvas`): `decode_size=None` resizes the shorter side to S and keeps the
centre square (evaluation: probes, pictures); `box` is then the whole canvas. `decode_size=D` (training,
D <= S) keeps the aspect ratio so the random crops see the whole image, as RandomResizedCrop of the
original does in DINO and MAE: a long side beyond `max_aspect` times the short one is centre-cropped to
it, the image is resized bicubic so its shorter side is D (less when its longer side would pass S) and
placed top-left on a zero canvas; `box` = (0, 0, w, h), its valid area in canvas pixels.

Faults: `batch["skipped"]` = [part, samples this reader skipped so far]; `batch["faults"]` = {"part",
"undecodable" (samples without a decodable image or clip), "unlabelled" (skipped for want of `cls`),
"lost" (samples of truncated or unreadable shards, counted from the `manifest.json` next to the shards:
launch.make_shards and launch.digits write one), "bad_shards" {url: what happened}}, all counted from the
start of the stream. `SkipCounter` aggregates them; `SkipCounter.summary()` is the line to print.
A reader whose shards hold no decodable sample raises DataStreamError, a LaunchError whose message stays
one line when the DataLoader re-raises it from a worker (`iter_batches` turns it into a plain
LaunchError).

Video (`ShardStream(frames=T, frame_stride=s)`): a sample is a clip (`npy` or numbered frames, see
launch.video); workers decode `T` frames `s` apart from a random start and the batch holds
`"image": uint8 (B, 3, T, S, S)` (the canvas layout of images, one box per clip). The start is drawn from
an RNG seeded by (seed, epoch, part, position in the part's stream), so a resumed run samples the same
frames as an uninterrupted one.

Determinism, which exact resume relies on: the shard order of an epoch is a function of
(seed, epoch) only; process `rank` of `world` with `W` workers reads part `rank * W + worker` of
`world * W` (by shards when there are enough, else by samples); shuffle buffers are seeded by
(seed, epoch, part). The DataLoader takes batches from its workers in turn, so the position in the
stream is one number: the batches this process has consumed (`skip_batches` fast-forwards to it).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from .errors import LaunchError
from .video import decode_clip_canvas, fit_canvas, is_clip_member, is_clip_sample

__all__ = ["IMAGE_KEYS", "DataStreamError", "ShardStream", "SkipCounter", "check_shards", "decode_canvas",
           "decode_image", "expand_shards", "iter_batches", "make_loader", "shard_sizes"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class DataStreamError(LaunchError):
    """A data reader that cannot go on (no decodable sample). The DataLoader re-raises a worker's error
    as `type(err)(text with the worker's traceback)`; this class keeps only its own line of that text."""

    def __init__(self, message: str) -> None:
        text = str(message)
        if "Original Traceback" in text:
            lines = [line for line in text.splitlines() if f"{type(self).__name__}: " in line]
            if lines:
                text = lines[-1].split(f"{type(self).__name__}: ", 1)[1]
        super().__init__(text)


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


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
        if not _is_local(part):
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
    local = [u for u in urls if _is_local(u)][:limit]
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


def shard_sizes(urls: Iterable[str]) -> dict[str, int]:
    """Samples per shard, for the local shards listed in a `manifest.json` next to them
    (`{"shards": [{"name": ..., "samples": ...}, ...]}`, as launch.make_shards writes); others are absent."""
    sizes: dict[str, int] = {}
    manifests: dict[Path, dict[str, int]] = {}
    for url in urls:
        if not _is_local(url):
            continue
        folder = Path(url).parent
        if folder not in manifests:
            manifests[folder] = {}
            try:
                listed = json.loads((folder / "manifest.json").read_text()).get("shards") or []
                manifests[folder] = {str(s["name"]): int(s["samples"]) for s in listed}
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                pass  # no manifest, or not one of ours: truncation is reported without a count
        if Path(url).name in manifests[folder]:
            sizes[url] = manifests[folder][Path(url).name]
    return sizes


def decode_canvas(data: bytes, size: int, decode_size: int | None = None,
                  max_aspect: float = 2.0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image bytes -> (uint8 (3, size, size), valid area (w, h) at the top-left); see `fit_canvas`."""
    with Image.open(io.BytesIO(data)) as img:
        draft = decode_size or size
        img.draft("RGB", (draft, draft))  # JPEG: decode at a reduced scale when it is much larger
        array, area = fit_canvas(img, size, decode_size, max_aspect)
    return torch.from_numpy(array.copy()).permute(2, 0, 1), area


def decode_image(data: bytes, size: int, decode_size: int | None = None, max_aspect: float = 2.0) -> torch.Tensor:
    """Image bytes -> uint8 (3, size, size): by default the shorter side resized to `size`, centre crop."""
    return decode_canvas(data, size, decode_size, max_aspect)[0]


def _label(sample: dict) -> int | None:
    raw = sample.get("cls")
    if raw is None:
        return None
    return int(raw.decode().strip() if isinstance(raw, bytes) else raw)


def _shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _shard_samples(url: str) -> Iterator[dict]:
    """The samples of one shard; any read error propagates (the caller counts what it lost)."""
    yield from group_by_keys(tar_file_expander(url_opener([{"url": url}]), eof_value=None))


class _Faults:
    """What one reader met so far: counts and bad shards."""

    def __init__(self, part: int) -> None:
        self.part = part
        self.undecodable = self.unlabelled = self.lost = 0
        self.bad: dict[str, str] = {}

    @property
    def skipped(self) -> int:
        return self.undecodable + self.unlabelled + self.lost

    def shard(self, url: str, read: int, expected: int | None, error: Exception | None, lost: int) -> None:
        self.lost += lost
        what = f"{_shard_name(url)} unreadable after sample {read}"
        if expected is not None:
            what += f" of {expected}"
        if error is not None:
            what += f" ({type(error).__name__})"
        self.bad[url] = what

    def as_dict(self) -> dict:
        return {"part": self.part, "undecodable": self.undecodable, "unlabelled": self.unlabelled,
                "lost": self.lost, "bad_shards": dict(self.bad)}


def _describe(undecodable: int, unlabelled: int, lost: int, bad: dict[str, str]) -> str:
    parts = []
    if undecodable:
        parts.append(f"{undecodable} undecodable sample{'s' * (undecodable != 1)}")
    if unlabelled:
        parts.append(f"{unlabelled} without a label")
    if bad:
        lost_text = f"{lost} lost in " if lost else ""
        parts.append(f"{lost_text}{len(bad)} bad shard{'s' * (len(bad) != 1)}: "
                     + "; ".join(bad[u] for u in sorted(bad)))
    return ", ".join(parts) if parts else "none"


def _share(start: int, stop: int, part: int, parts: int) -> int:
    """How many of the stream positions [start, stop) fall to `part` when every reader takes every
    parts-th sample."""
    first = start + (part - start) % parts
    return len(range(first, stop, parts))


class ShardStream(IterableDataset):
    """Batches from WebDataset shards, for one process of `world`; see the module docstring.

    infinite=True repeats epochs forever (training); False gives one pass, the last batch partial
    (validation). resampled=True draws shards with replacement instead of epochs over them.
    need_labels=True skips (and counts) samples without a `cls`.
    frames: None reads images; a number reads clips of that many frames `frame_stride` apart (image
    samples are then skipped and counted, as clip samples are when reading images).
    decode_size, max_aspect: the canvas layout (module docstring); None keeps the centre square.
    """

    def __init__(self, urls: list[str], *, batch_size: int, image_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle_buffer: int = 0, resampled: bool = False, infinite: bool = True,
                 need_labels: bool = False, skip_batches: int = 0, frames: int | None = None,
                 frame_stride: int = 1, decode_size: int | None = None, max_aspect: float = 2.0) -> None:
        super().__init__()
        if frames is not None and (frames < 1 or frame_stride < 1):
            raise LaunchError(f"data.frames and data.frame_stride must be at least 1, got {frames}, {frame_stride}")
        if decode_size is not None and not 1 <= decode_size <= image_size:
            raise LaunchError(f"data.decode_size must be between 1 and data.image_size ({image_size}), got "
                              f"{decode_size}: the canvas must hold the decoded image")
        if max_aspect < 1:
            raise LaunchError(f"max_aspect must be at least 1, got {max_aspect}")
        self.urls, self.batch_size, self.image_size = list(urls), batch_size, image_size
        self.rank, self.world, self.seed = rank, world, seed
        self.shuffle_buffer, self.resampled, self.infinite = shuffle_buffer, resampled, infinite
        self.need_labels, self.skip_batches = need_labels, skip_batches
        self.frames, self.frame_stride = frames, frame_stride
        self.decode_size, self.max_aspect = decode_size, max_aspect
        self.expected = shard_sizes(self.urls)  # read here, once: workers get a copy

    def _epoch_shards(self, epoch: int, part: int, parts: int) -> tuple[list[str], bool]:
        """(shards this part reads in `epoch`, whether it splits them by samples with the other parts)."""
        if self.resampled:
            # one draw per epoch shared by every reader, dealt out: no shard read twice within an epoch
            rng = random.Random(f"resample-{self.seed}-{epoch}")
            if len(self.urls) >= parts:
                return rng.sample(self.urls, k=len(self.urls) // parts * parts)[part::parts], False
            return [rng.choice(self.urls)], True  # fewer shards than readers: split that shard by samples
        shards = list(self.urls)
        random.Random(f"shards-{self.seed}-{epoch}").shuffle(shards)
        if len(shards) >= parts:
            return shards[part::parts], False
        return shards, True  # fewer shards than readers: every reader takes every parts-th sample

    def _epoch_samples(self, epoch: int, part: int, parts: int, faults: _Faults) -> Iterator[dict]:
        shards, split = self._epoch_shards(epoch, part, parts)
        samples = self._read(shards, part, parts if split else 1, faults)
        if self.shuffle_buffer > 1:
            samples = _shuffle(samples, self.shuffle_buffer, random.Random(f"shuffle-{self.seed}-{epoch}-{part}"))
        return samples

    def _read(self, shards: list[str], part: int, parts: int, faults: _Faults) -> Iterator[dict]:
        """The samples of `shards` in order (every parts-th one from `part` on); a shard that breaks off, or
        holds fewer samples than its manifest says, is recorded in `faults` with the samples it lost."""
        position = 0  # in the stream of all the shards' samples
        for url in shards:
            read, error = 0, None
            try:
                for sample in _shard_samples(url):
                    if position % parts == part % parts:
                        yield sample
                    read += 1
                    position += 1
            except Exception as err:  # truncated, unreadable or missing shard: count what it lost, go on
                error = err
            expected = self.expected.get(url)
            if error is None and (expected is None or read >= expected):
                continue
            missing = max(0, expected - read) if expected is not None else 0
            lost = missing if parts == 1 else _share(position, position + missing, part, parts)
            faults.shard(url, read, expected, error, lost)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader always asks worker 0 first; after `skip_batches` the next batch is due from the
        # part (skip_batches % workers), so worker w plays the part of worker (w + skip_batches) % workers.
        worker = (worker + self.skip_batches) % workers
        part, parts = self.rank * workers + worker, self.world * workers
        to_skip = len(range(worker, self.skip_batches, workers))  # batches this part already delivered
        faults = _Faults(part)

        epoch = 0
        while True:
            batch: list[tuple] = []
            full: list[tuple] | None = None  # held until the next sample is read, so its faults are current
            decoded = seen = 0
            for index, sample in enumerate(self._epoch_samples(epoch, part, parts, faults)):
                if full is not None:
                    yield self._collate(full, faults)
                    full = None
                seen += 1
                # skipped batches are decoded too (and draw their frames), so the stream stays aligned
                rng = random.Random(f"clip-{self.seed}-{epoch}-{part}-{index}") if self.frames else None
                item = self._decode(sample, rng)
                if isinstance(item, str):
                    setattr(faults, item, getattr(faults, item) + 1)
                    continue
                decoded += 1
                batch.append(item)
                if len(batch) == self.batch_size:
                    if to_skip > 0:
                        to_skip -= 1
                    else:
                        full = batch
                    batch = []
            if full is not None:  # the epoch is read to its end: every fault of it is counted
                yield self._collate(full, faults)
            if decoded == 0 and (self.infinite or seen or faults.bad):
                self._fail(part, parts, seen, faults)
            if not self.infinite:
                if batch and to_skip <= 0:
                    yield self._collate(batch, faults)
                return
            epoch += 1

    def _fail(self, part: int, parts: int, seen: int, faults: _Faults) -> None:
        where = f"data part {part} of {parts}" if parts > 1 else "the data"
        what = ("labelled " if self.need_labels else "") + ("clips" if self.frames else "images")
        found = _describe(faults.undecodable, faults.unlabelled, faults.lost, faults.bad)
        raise DataStreamError(f"no decodable samples ({what}) in {where}: {seen} read, faults: {found}; "
                              "check the shards, or rebuild them with python -m launch.make_shards")

    def _decode(self, sample: dict, rng: random.Random | None = None) -> tuple | str:
        """(image, (w, h), label, key), or why the sample is skipped: "undecodable" or "unlabelled"."""
        if self.frames:
            if not is_clip_sample(sample):
                return "undecodable"
            data = None
        else:
            data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if data is None:
                return "undecodable"
        try:
            label = _label(sample)
            if data is None:
                image, area = decode_clip_canvas(sample, frames=self.frames, stride=self.frame_stride,
                                                 size=self.image_size, rng=rng, decode_size=self.decode_size,
                                                 max_aspect=self.max_aspect)
            else:
                image, area = decode_canvas(data, self.image_size, self.decode_size, self.max_aspect)
        except Exception:  # undecodable image, clip or label: skipped and counted, never a crash
            return "undecodable"
        if label is None:
            if self.need_labels:
                return "unlabelled"
            label = -1
        return image, area, label, str(sample.get("__key__", ""))

    @staticmethod
    def _collate(batch: list, faults: _Faults) -> dict:
        images, areas, labels, keys = zip(*batch)
        box = torch.zeros(len(batch), 4)
        box[:, 2:] = torch.tensor(areas, dtype=torch.float32)
        return {"image": torch.stack(images), "box": box, "label": torch.tensor(labels, dtype=torch.long),
                "key": list(keys), "skipped": torch.tensor([faults.part, faults.skipped], dtype=torch.long),
                "faults": faults.as_dict()}


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


def iter_batches(loader: Iterable[dict]) -> Iterator[dict]:
    """The batches of a loader; a reader's DataStreamError (from a worker or not) comes out as one plain
    LaunchError line, without the worker traceback."""
    try:
        yield from loader
    except DataStreamError as err:
        raise LaunchError(str(err)) from None


class SkipCounter:
    """Aggregates the fault counts that batches carry (`update(batch)`): `total` samples skipped,
    `undecodable`, `unlabelled`, `lost`, `bad_shards` (URLs, sorted) and `summary()`, one line."""

    def __init__(self) -> None:
        self.by_part: dict[int, int] = {}
        self.faults: dict[int, dict[str, int]] = {}
        self.bad: dict[str, str] = {}

    def update(self, batch: dict) -> None:
        part, count = (int(v) for v in batch["skipped"])
        self.by_part[part] = max(count, self.by_part.get(part, 0))
        faults = batch.get("faults")
        if faults:  # counts from the start of each reader's stream: the largest seen is the latest
            seen = self.faults.setdefault(int(faults["part"]), {})
            for key in ("undecodable", "unlabelled", "lost"):
                seen[key] = max(int(faults[key]), seen.get(key, 0))
            self.bad.update(faults["bad_shards"])

    def _sum(self, key: str) -> int:
        return sum(f.get(key, 0) for f in self.faults.values())

    @property
    def total(self) -> int:
        return sum(self.by_part.values())

    @property
    def undecodable(self) -> int:
        return self._sum("undecodable")

    @property
    def unlabelled(self) -> int:
        return self._sum("unlabelled")

    @property
    def lost(self) -> int:
        return self._sum("lost")

    @property
    def bad_shards(self) -> list[str]:
        return sorted(self.bad)

    def summary(self) -> str:
        """"data faults: 3 undecodable samples, 54 lost in 1 bad shard: train-000003.tar unreadable after
        sample 46 of 100 (ReadError)", or "data faults: none"."""
        return "data faults: " + _describe(self.undecodable, self.unlabelled, self.lost, self.bad)
