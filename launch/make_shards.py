"""Image (or clip) folder -> WebDataset tar shards with a manifest.

    python -m launch.make_shards IMAGE_DIR OUT_DIR [--shard-size N] [--prefix train] [--video]

Class subfolders become integer labels (sorted names -> 0, 1, ...); a flat folder has no labels.
Files are visited in sorted order, so the shards are the same on every run. Each sample is
`__key__`, the image bytes under its own extension (`jpg`, `png`, `webp`) and `cls` when labelled.
Unreadable files are reported and skipped. `manifest.json` records the sample count per shard (the
loader counts the samples a truncated shard lost from it), the classes and the skipped files.

Bad input (a missing or empty folder, no readable image, an output path that is a file or cannot be
written) is one line on stderr and exit status 2. Shards are written to a hidden folder inside the
output folder and moved into place, manifest last, only when all of them are complete
(`ssl_vit.files.merge_dir`): a failed or interrupted run leaves nothing behind, and the folder's
other files stay.

Video: a folder of clips (`.npy` uint8 (T, H, W, C) files, or subfolders of numbered frame images;
class subfolders become labels) is written by `launch.video.write_clip_shards`, one clip per sample.
A folder holding `.npy` files and no images is taken for a clip folder; `--video` forces it (needed
for clips stored as numbered frames, which look like class folders of images otherwise).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image

from ssl_vit.files import merge_dir

from .args import ArgumentParser
from .errors import LaunchError
from .video import write_clip_shards

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
CONVERT_EXTS = {".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}  # re-encoded as png


class ShardWriter:
    """Writes samples into `<prefix>-000000.tar`, `<prefix>-000001.tar`, ... of `shard_size` samples.

    Deterministic bytes: fixed mtime, owner and order, so the same input gives the same shards.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "train", shard_size: int = 1000) -> None:
        if shard_size < 1:
            raise LaunchError(f"--shard-size must be at least 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.shard_size = prefix, shard_size
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "samples": 0})

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if self._tar is None or self.shards[-1]["samples"] >= self.shard_size:
            self.close_shard()
            self._open()
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.shards[-1]["samples"] += 1
        self._count += 1

    def close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> int:
        self.close_shard()
        return self._count


def pattern(prefix: str, count: int) -> str:
    """The brace pattern naming `count` shards: `train-{000000..000007}.tar`."""
    return f"{prefix}-{{000000..{count - 1:06d}}}.tar" if count > 1 else f"{prefix}-000000.tar"


def list_images(image_dir: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(file, label) in sorted order and the class names; label -1 for a flat folder."""
    subdirs = sorted(p for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    allowed = set(IMAGE_EXTS) | CONVERT_EXTS
    if subdirs:
        files = [(f, label) for label, d in enumerate(subdirs) for f in sorted(d.rglob("*"))
                 if f.is_file() and f.suffix.lower() in allowed]
        return files, [d.name for d in subdirs]
    files = [(f, -1) for f in sorted(image_dir.iterdir()) if f.is_file() and f.suffix.lower() in allowed]
    return files, []


def encode(path: Path) -> tuple[str, bytes]:
    """(extension, bytes) of an image file, checked by decoding it; raises on an unreadable file."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        ext = IMAGE_EXTS.get(path.suffix.lower())
        if ext is None or img.format not in ("JPEG", "PNG", "WEBP"):
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
            return "png", buf.getvalue()
    return ext, data


@contextlib.contextmanager
def staged_output(out_dir: str | Path) -> Iterator[Path]:
    """A hidden folder inside `out_dir` to write into, published into `out_dir` (`manifest.json` last) when the
    block ends normally and removed either way, with any folder it created (`ssl_vit.files.merge_dir`).
    LaunchError when `out_dir` is a file or cannot be written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LaunchError(f"output {out_dir} is a file, not a folder: pass a folder for the shards")
    try:
        with merge_dir(out_dir, last=("manifest.json",)) as stage:
            yield stage
    except OSError as err:
        raise LaunchError(f"cannot write shards to {out_dir}: {err.strerror or err}") from None


def make_shards(image_dir: str | Path, out_dir: str | Path, *, shard_size: int = 1000, prefix: str = "train",
                log: Iterable | None = None, video: bool | None = None) -> dict:
    """Write the shards and `manifest.json`; returns the manifest.

    video: True writes a folder of clips (launch.video.write_clip_shards; the manifest has
    `"kind": "video"`), None decides with `looks_like_clips`, False reads images.
    LaunchError on bad input, with nothing written (module docstring)."""
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    if shard_size < 1:
        raise LaunchError(f"--shard-size must be at least 1, got {shard_size}")
    if not prefix or any(sep in prefix for sep in ("/", "\\")) or prefix.startswith("."):
        raise LaunchError(f"--prefix {prefix!r} must be a plain file name prefix (no folders, not hidden)")
    if not image_dir.is_dir():
        what = "is a file, not a folder" if image_dir.exists() else "does not exist"
        raise LaunchError(f"input folder {image_dir} {what}: pass the folder of images (or clips) to shard")
    if video or (video is None and looks_like_clips(image_dir)):
        with staged_output(out_dir) as stage:
            manifest = write_clip_shards(image_dir, stage, shard_size=shard_size, prefix=prefix)
        return manifest
    files, classes = list_images(image_dir)
    if not files:
        raise LaunchError(f"no images (jpg, png, webp, bmp, gif, tif) in {image_dir}")
    with staged_output(out_dir) as stage:
        writer = ShardWriter(stage, prefix, shard_size)
        skipped, reasons = [], []
        try:
            for index, (path, label) in enumerate(files):
                try:
                    ext, data = encode(path)
                except Exception as err:  # any decoder error: report (once something was readable), skip, go on
                    skipped.append(str(path))
                    reasons.append(f"{path}: {type(err).__name__}: {err}")
                    continue
                sample = {ext: data}
                if label >= 0:
                    sample["cls"] = str(label).encode()
                writer.write(f"{index:08d}", sample)
        finally:
            count = writer.close()
        if count == 0:
            raise LaunchError(f"no readable images in {image_dir} ({len(skipped)} unreadable files)")
        for line in reasons:
            print(f"skipping unreadable image {line}", file=sys.stderr)
        manifest = {"samples": count, "shards": writer.shards, "pattern": pattern(prefix, len(writer.shards)),
                    "classes": classes, "num_classes": len(classes), "skipped": skipped,
                    "source": str(image_dir)}
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def looks_like_clips(folder: str | Path) -> bool:
    """True when `folder` holds `.npy` files and no image files (searched recursively)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    allowed = set(IMAGE_EXTS) | CONVERT_EXTS
    has_npy = False
    for f in folder.rglob("*"):
        if not f.is_file() or any(part.startswith(".") for part in f.relative_to(folder).parts):
            continue
        suffix = f.suffix.lower()
        if suffix in allowed:
            return False
        has_npy = has_npy or suffix == ".npy"
    return has_npy


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m launch.make_shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("image_dir", help="folder of images (or of clips); class subfolders become labels")
    parser.add_argument("out_dir", help="where the .tar shards and manifest.json are written")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--prefix", default="train", help="shard file prefix (default train)")
    parser.add_argument("--video", action="store_true",
                        help="IMAGE_DIR is a folder of clips (.npy files or folders of numbered frames); "
                             "detected on its own for .npy clips")
    try:
        args = parser.parse_args(argv)
        video = args.video or looks_like_clips(args.image_dir)
        manifest = make_shards(args.image_dir, args.out_dir, shard_size=args.shard_size, prefix=args.prefix,
                               video=video)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{manifest['samples']} {'clips' if video else 'samples'} in {len(manifest['shards'])} shards: "
          f"{Path(args.out_dir) / manifest['pattern']} ({manifest['num_classes']} classes, "
          f"{len(manifest['skipped'])} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
