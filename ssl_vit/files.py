"""Atomic writes and the integrity manifest of checkpoint and export folders: the one home of the project's
staged writes.

A folder is written under a temporary name next to its final place and renamed into place only when complete,
so a crash never leaves a half-written folder under the final name (`atomic_dir`). Files added to a folder that
holds others (shards made into a user's folder) are staged inside it and moved in, manifest last (`merge_dir`).
`write_manifest` records the sha256 and byte size of every file, written last; `verify_manifest` checks them
before anything in the folder is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import CorruptCheckpoint

MANIFEST = "checksums.json"
_CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries to disk (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically: a temp file in the same folder, fsync, `os.replace`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; follow the umask like open() would
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _settle(folder: Path) -> None:
    """Permissions of everything below `folder` to the umask (folders 0o777, files 0o666, execute bits kept),
    then every file and folder flushed to disk. Symbolic links are left alone."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not Path(root, name).is_symlink():
                os.chmod(Path(root, name), 0o777 & ~mask)
        for name in files:
            path = Path(root, name)
            if path.is_symlink():
                continue
            os.chmod(path, (0o666 & ~mask) | (path.stat().st_mode & 0o111 & ~mask))
            _fsync_file(path)
        _fsync_dir(Path(root))


def _remove_empty(folders: Sequence[Path]) -> None:
    """rmdir each of `folders` (innermost first) that is empty; the others stay."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


@contextmanager
def atomic_dir(final: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `final`; rename it to `final` on normal exit.

    `keep_existing`: a `final` that exists when the new folder is complete wins and the new one is discarded
    (several processes building the same cache: the first to finish is kept). Otherwise an existing `final` is
    replaced whole: it is renamed aside to `.{name}.old-<random>` and deleted after the new
    folder is in place. On an exception the temporary folder is removed and the old `final` is untouched.
    Permissions follow the umask (folders 0o777 & ~umask, files 0o666 & ~umask, whatever the writer used:
    safetensors makes 0600 files), so other users can read what was written.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _settle(tmp)
        old: Path | None = None
        if keep_existing:
            try:
                os.rename(tmp, final)  # fails when another writer's folder is already there
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            return
        if final.exists() or final.is_symlink():
            old = final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:  # put the previous folder back
                os.replace(old, final)
            raise
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextmanager
def merge_dir(final: str | Path, *, last: Sequence[str] = (MANIFEST,)) -> Iterator[Path]:
    """Yield a fresh hidden folder `final/.merge.tmp-<random>` to write into; on normal exit its entries are
    published into `final`, which keeps its other files: the one place that adds files to an existing folder
    (shards made into a user's folder), where `atomic_dir` replaces a folder whole.

    Publishing: permissions and flushes as `atomic_dir`; then each name of `last` (a manifest) already in
    `final` is removed, every other entry is moved in with `os.replace` (replacing a file of the same name),
    and the `last` entries are moved in after them. Each file lands whole, the set of them does not, so the
    manifest is removed first and written last: a manifest in `final` never lists files that were changed
    after it, and readers that trust only what the manifest lists never see a half-published set.
    On an exception in the block the staging folder is removed and `final` is untouched; folders this call
    created (`final` and missing parents) are removed again when left empty. `remove_stale_temps(final)`
    clears the staging folder of a killed process.
    """
    final = Path(final)
    created = [p for p in (final, *final.parents) if not p.exists()]  # innermost first
    try:
        final.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=final, prefix=".merge.tmp-"))
    except BaseException:
        _remove_empty(created)
        raise
    try:
        os.chmod(stage, 0o777 & ~_umask())
        yield stage
        _settle(stage)
        names = sorted(p.name for p in stage.iterdir())
        late = [n for n in last if n in names]
        for name in late:
            (final / name).unlink(missing_ok=True)
        _fsync_dir(final)
        for name in [n for n in names if n not in late] + late:
            os.replace(stage / name, final / name)
        _fsync_dir(final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(created)
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _listed_files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and p.relative_to(folder).as_posix() != MANIFEST
    )


def write_manifest(folder: Path) -> None:
    """Write `folder/checksums.json`: sha256 and byte size of every regular file below `folder` (posix paths).

    Call it last, after every other file is written; the manifest itself is written atomically.
    """
    folder = Path(folder)
    files = {rel: {"sha256": _sha256(folder / rel), "bytes": (folder / rel).stat().st_size}
             for rel in _listed_files(folder)}
    atomic_write_text(folder / MANIFEST, json.dumps({"algorithm": "sha256", "files": files}, indent=1) + "\n")


def _read_manifest(folder: Path, what: str) -> dict[str, dict]:
    path = folder / MANIFEST
    if not path.is_file():
        raise CorruptCheckpoint(f"{what} {folder} has no {MANIFEST}: it is incomplete or was not written by "
                                f"ssl-vit; write it again")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
            for v in files.values()
        ):
            raise TypeError("entries must be {'sha256': str, 'bytes': int}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{what} {folder}: {MANIFEST} is unreadable ({type(e).__name__}: {e}); "
                                f"write it again") from None
    return files


def verify_manifest(folder: Path, *, what: str = "checkpoint") -> None:
    """Check every file listed in `folder/checksums.json`; raise `CorruptCheckpoint` naming the first bad one."""
    folder = Path(folder)
    for rel, entry in _read_manifest(folder, what).items():
        path = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise CorruptCheckpoint(f"{what} {folder}: {MANIFEST} lists a path outside the folder: {rel!r}")
        if not path.is_file():
            raise CorruptCheckpoint(f"{what} {folder}: file {rel} is missing; the folder is incomplete")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CorruptCheckpoint(f"{what} {folder}: file {rel} is truncated or resized ({size} bytes, "
                                    f"expected {entry['bytes']}); restore it or write the {what} again")
        if _sha256(path) != entry["sha256"]:
            raise CorruptCheckpoint(f"{what} {folder}: file {rel} fails its sha256 check (the bytes changed); "
                                    f"restore it or write the {what} again")


def remove_stale_temps(parent: Path) -> list[Path]:
    """Remove leftovers of interrupted atomic writes (`.*.tmp-*`, `.*.old-*`) directly in `parent`."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for p in sorted(parent.iterdir()):
        name = p.name
        if not name.startswith(".") or (".tmp-" not in name and ".old-" not in name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
