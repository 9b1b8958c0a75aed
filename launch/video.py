"""Video clips in WebDataset shards: decoding clips to fixed-size uint8 tensors, and clip folders to shards.

A clip sample in a shard is `__key__`, optionally `cls`, and either
  - `npy`: a uint8 array (T, H, W, C) (C = 3; 1 is repeated to 3, 4 drops alpha; (T, H, W) is grey), or
  - numbered frames: `000.jpg`, `001.jpg`, ... or `frame000.png` style keys (jpg, jpeg, png, webp),
    ordered by their number.

`decode_clip` samples `frames` frames `stride` apart (random start with an rng, else the centre
window), fits each to the fixed canvas exactly as `launch.data.decode_image` does (`fit_canvas`: the
centre square by default, or the whole frame on a padded canvas with `decode_size`), repeats the last
frame to pad short clips, and returns uint8 (3, frames, size, size); `decode_clip_canvas` also returns
the valid area (w, h) shared by every frame (the `batch["box"]` of a clip). Per-sample video crops and
colour work happen later, on the accelerator.

`write_clip_shards` turns a folder of clips (`.npy` files, or subfolders of numbered frame images;
class subfolders become labels) into tar shards and a `manifest.json` in the format of
`launch.make_shards`.

This module imports neither `launch.data` nor `launch.make_shards`, so both can import it.
"""

from __future__ import annotations

import io
import json
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import LaunchError

__all__ = [
    "ClipDecodeError", "FRAME_EXTS", "decode_clip", "decode_clip_canvas", "fit_canvas", "is_clip_sample",
    "is_clip_member", "frame_keys",
    "clip_indices", "list_clips", "clip_folder_samples", "write_clip_shards",
]

FRAME_EXTS = ("jpg", "jpeg", "png", "webp")
_FRAME_KEY = re.compile(r"^[a-z_\-]*?(\d+)\.(jpg|jpeg|png|webp)$")  # "000.jpg", "frame000.png", "frame_12.jpg"
_FRAME_FILE = re.compile(r"(\d+)\.([A-Za-z]+)$")  # frame files in a clip folder
_FRAME_FILE_EXTS = {*FRAME_EXTS, "bmp", "gif", "tif", "tiff", "ppm", "pgm"}  # the last six re-encoded as png


class ClipDecodeError(ValueError):
    """A clip sample that cannot be decoded (bad npy, bad frame, no frames); the loader counts and skips it."""


# ---- decoding ------------------------------------------------------------------------------------

def frame_keys(sample: dict) -> list[str]:
    """The numbered-frame keys of a sample, in frame order: ["000.jpg", "001.jpg", ...]."""
    found = []
    for key in sample:
        if key.startswith("__"):
            continue
        m = _FRAME_KEY.match(key.lower())
        if m:
            found.append((int(m.group(1)), key))
    return [k for _, k in sorted(found)]


def is_clip_sample(sample: dict) -> bool:
    """True for a clip sample (an `npy` member or numbered frame members), False for an image sample."""
    return "npy" in sample or bool(frame_keys(sample))


def is_clip_member(name: str) -> bool:
    """True for a tar member name that belongs to a clip: `<key>.npy` or `<key>.000.jpg` / `<key>.frame000.png`."""
    base = name.rsplit("/", 1)[-1]
    _, dot, suffix = base.partition(".")
    return bool(dot) and (suffix.lower() == "npy" or bool(_FRAME_KEY.match(suffix.lower())))


def clip_indices(length: int, frames: int, stride: int, rng: random.Random | None) -> list[int]:
    """Indices of `frames` frames `stride` apart in a clip of `length`: a random start with `rng`,
    else the centred window; past the end the last frame repeats."""
    if frames < 1 or stride < 1:
        raise ValueError(f"frames and stride must be at least 1, got frames={frames}, stride={stride}")
    if length < 1:
        raise ClipDecodeError("clip has no frames")
    span = (frames - 1) * stride + 1
    room = length - span
    if room <= 0:
        start = 0
    elif rng is not None:
        start = rng.randint(0, room)
    else:
        start = room // 2
    return [min(start + i * stride, length - 1) for i in range(frames)]


def fit_canvas(img: Image.Image, size: int, decode_size: int | None = None,
               max_aspect: float = 2.0) -> tuple[np.ndarray, tuple[int, int]]:
    """A PIL image -> (uint8 (size, size, 3) canvas, valid area (w, h) at its top-left corner).

    decode_size None: the shorter side resized to `size` (bicubic) and the centre square kept; the valid
    area is the whole canvas. decode_size D (at most `size`): the aspect ratio is kept: a long side beyond
    `max_aspect` times the short one is centre-cropped to it, the image is resized (bicubic, antialiased
    when shrinking) so its shorter side is D, or less when its longer side would exceed `size`, and
    placed top-left on a zero canvas.
    """
    img = img.convert("RGB")
    w, h = img.size
    if decode_size is None:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8), (size, size)
    if max(w, h) > max_aspect * min(w, h):  # an extreme strip: keep its centre
        if w > h:
            keep = max(1, round(h * max_aspect))
            img = img.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h))
        else:
            keep = max(1, round(w * max_aspect))
            img = img.crop((0, (h - keep) // 2, w, (h - keep) // 2 + keep))
        w, h = img.size
    scale = min(decode_size / min(w, h), size / max(w, h))
    nw, nh = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    canvas[:nh, :nw] = np.asarray(img, dtype=np.uint8)
    return canvas, (nw, nh)


def _to_rgb_frames(array: np.ndarray) -> np.ndarray:
    """A clip array (T, H, W[, C]) uint8 -> (T, H, W, 3)."""
    if array.dtype != np.uint8:
        raise ClipDecodeError(f"npy clip must be uint8 (T, H, W, C), got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise ClipDecodeError(f"npy clip must have shape (T, H, W, C) with C in 1, 3, 4, got {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    return array[..., :3]


def _load_npy(raw) -> np.ndarray:
    if isinstance(raw, np.ndarray):
        return raw
    if isinstance(raw, torch.Tensor):
        return raw.numpy()
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as err:  # truncated file, pickled object array, not an npy at all
        raise ClipDecodeError(f"undecodable npy clip: {type(err).__name__}: {err}") from None


def _open_frame(raw, size: int, decode_size: int | None, max_aspect: float) -> tuple[np.ndarray, tuple[int, int]]:
    if isinstance(raw, np.ndarray):
        return fit_canvas(Image.fromarray(_to_rgb_frames(raw[None])[0]), size, decode_size, max_aspect)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            draft = decode_size or size
            img.draft("RGB", (draft, draft))  # JPEG: decode at a reduced scale when it is much larger
            return fit_canvas(img, size, decode_size, max_aspect)
    except Exception as err:  # truncated or corrupt image
        raise ClipDecodeError(f"undecodable frame: {type(err).__name__}: {err}") from None


def decode_clip_canvas(sample: dict, *, frames: int, stride: int, size: int, rng: random.Random | None = None,
                       decode_size: int | None = None,
                       max_aspect: float = 2.0) -> tuple[torch.Tensor, tuple[int, int]]:
    """A clip sample -> (uint8 (3, frames, size, size), valid area (w, h) of every frame); see
    `fit_canvas` for `decode_size` and `max_aspect`, the module docstring for the rest.

    Only the sampled frames are decoded. Raises ClipDecodeError (a ValueError) when the sample
    holds no clip or the clip cannot be decoded.
    """
    if "npy" in sample:
        clip = _to_rgb_frames(_load_npy(sample["npy"]))
        idx = clip_indices(clip.shape[0], frames, stride, rng)
        out = [fit_canvas(Image.fromarray(clip[i]), size, decode_size, max_aspect) for i in idx]
    else:
        keys = frame_keys(sample)
        if not keys:
            raise ClipDecodeError(f"sample {sample.get('__key__', '?')!r} holds no clip (no npy, no numbered frames)")
        idx = clip_indices(len(keys), frames, stride, rng)
        decoded: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}  # a repeated (padding) frame is decoded once
        out = []
        for i in idx:
            if i not in decoded:
                decoded[i] = _open_frame(sample[keys[i]], size, decode_size, max_aspect)
            out.append(decoded[i])
    video = torch.from_numpy(np.stack([frame for frame, _ in out]))  # (T, S, S, 3)
    area = (min(a[0] for _, a in out), min(a[1] for _, a in out))  # frames of other sizes: the common part
    return video.permute(3, 0, 1, 2).contiguous(), area


def decode_clip(sample: dict, *, frames: int, stride: int, size: int, rng: random.Random | None = None,
                decode_size: int | None = None, max_aspect: float = 2.0) -> torch.Tensor:
    """A clip sample -> uint8 (3, frames, size, size); `decode_clip_canvas` without the valid area."""
    return decode_clip_canvas(sample, frames=frames, stride=stride, size=size, rng=rng, decode_size=decode_size,
                              max_aspect=max_aspect)[0]


# ---- folders to shards -----------------------------------------------------------------------------

def _frame_files(folder: Path) -> list[Path]:
    """The numbered frame images directly in `folder`, in frame order (empty if it is no clip folder).

    A frame's number is the digit run just before its extension: `000.jpg`, `frame_012.png`, `img7.bmp`.
    """
    found = []
    for f in folder.iterdir():
        m = _FRAME_FILE.search(f.name)
        if m and f.is_file() and m.group(2).lower() in _FRAME_FILE_EXTS:
            found.append((int(m.group(1)), f.name, f))
    return [f for _, _, f in sorted(found)]


def _clips_in(folder: Path) -> list[Path]:
    """Clips under `folder`, sorted: `.npy` files and folders of numbered frames (searched recursively)."""
    clips = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix.lower() == ".npy":
            clips.append(p)
        elif p.is_dir():
            clips.extend([p] if _frame_files(p) else _clips_in(p))
    return clips


def list_clips(folder: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(clip path, label) in sorted order and the class names; label -1 without classes.

    A subfolder holding numbered frame images is a clip; any other subfolder is a class (its clips
    are found recursively), as in `launch.make_shards`. With classes, clips lying directly in
    `folder` are ignored.
    """
    folder = Path(folder)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [d for d in subdirs if not _frame_files(d)]
    if classes:
        return [(c, label) for label, d in enumerate(classes) for c in _clips_in(d)], [d.name for d in classes]
    return [(c, -1) for c in _clips_in(folder)], []


def _encode_frame(path: Path) -> tuple[str, bytes]:
    """(extension, bytes) of a frame file, checked by decoding it; re-encoded as png if not jpg/png/webp."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        ext = path.suffix.lower().lstrip(".")
        if ext in FRAME_EXTS and img.format in ("JPEG", "PNG", "WEBP"):
            return ("jpg" if ext == "jpeg" else ext), data
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        return "png", buf.getvalue()


def clip_members(path: Path) -> dict[str, bytes]:
    """The tar members of one clip (without `cls`): {"npy": bytes} or {"000.jpg": bytes, ...}.

    Checked by decoding; raises ClipDecodeError for an unreadable clip.
    """
    if path.is_file():
        data = path.read_bytes()
        clip = _load_npy(data)
        _to_rgb_frames(clip)  # shape and dtype check
        return {"npy": data}
    files = _frame_files(path)
    if not files:
        raise ClipDecodeError(f"clip folder {path} holds no numbered frame images")
    width = max(3, len(str(len(files) - 1)))
    members = {}
    for i, f in enumerate(files):
        try:
            ext, data = _encode_frame(f)
        except Exception as err:  # any decoder error in one frame makes the clip unreadable
            raise ClipDecodeError(f"frame {f.name}: {type(err).__name__}: {err}") from None
        members[f"{i:0{width}d}.{ext}"] = data
    return members


def clip_folder_samples(folder: str | Path, *, skipped: list[str] | None = None,
                        classes: list[str] | None = None) -> Iterator[tuple[str, dict[str, bytes], int | None]]:
    """(key, tar members, label or None) for every readable clip of `folder`, in sorted order.

    Keys are the clip's index in the listing (`00000000`, ...), so they are stable across runs.
    Unreadable clips are reported on stderr, appended to `skipped` and left out. The class names
    are appended to `classes` when a list is given.
    """
    clips, names = list_clips(folder)
    if classes is not None:
        classes.extend(names)
    for index, (path, label) in enumerate(clips):
        try:
            members = clip_members(path)
        except Exception as err:  # unreadable file or frame: report, skip, go on
            if skipped is not None:
                skipped.append(str(path))
            print(f"skipping unreadable clip {path}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        yield f"{index:08d}", members, (label if label >= 0 else None)


def _pattern(prefix: str, count: int) -> str:
    return f"{prefix}-{{000000..{count - 1:06d}}}.tar" if count > 1 else f"{prefix}-000000.tar"


def write_clip_shards(folder: str | Path, out_dir: str | Path, shard_size: int = 1000, *,
                      prefix: str = "train") -> dict:
    """Write the clips of `folder` to `<prefix>-000000.tar`, ... of `shard_size` clips and
    `manifest.json`, in `launch.make_shards`' format plus `"kind": "video"`; returns the manifest.

    The same folder gives byte-identical shards (sorted order, fixed mtime and owner).
    """
    import webdataset as wds  # only needed here; decoding clips does not need it

    folder, out_dir = Path(folder), Path(out_dir)
    if not folder.is_dir():
        raise LaunchError(f"clip folder {folder} does not exist")
    if shard_size < 1:
        raise LaunchError(f"--shard-size must be at least 1, got {shard_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    classes: list[str] = []
    shards: list[dict] = []
    writer = None
    count = 0
    try:
        for key, members, label in clip_folder_samples(folder, skipped=skipped, classes=classes):
            if writer is None or shards[-1]["samples"] >= shard_size:
                if writer is not None:
                    writer.close()
                name = f"{prefix}-{len(shards):06d}.tar"
                writer = wds.TarWriter(str(out_dir / name), encoder=False, mtime=0, user="", group="",
                                       mode=0o644)
                shards.append({"name": name, "samples": 0})
            sample = {"__key__": key, **members}
            if label is not None:
                sample["cls"] = str(label).encode()
            writer.write(sample)
            shards[-1]["samples"] += 1
            count += 1
    finally:
        if writer is not None:
            writer.close()
    if count == 0:
        raise LaunchError(f"no readable clips (.npy files or folders of numbered frames) in {folder}"
                          + (f"; {len(skipped)} unreadable" if skipped else ""))
    manifest = {"samples": count, "shards": shards, "pattern": _pattern(prefix, len(shards)),
                "classes": classes, "num_classes": len(classes), "skipped": skipped,
                "source": str(folder), "kind": "video"}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
