"""Atomic folder writes and the sha256 manifest (ssl_vit.files)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import ssl_vit
from ssl_vit.files import (
    MANIFEST,
    atomic_dir,
    atomic_write_text,
    merge_dir,
    remove_stale_temps,
    verify_manifest,
    write_manifest,
)


def _write_folder(final: Path, payload: bytes = b"weights") -> None:
    with atomic_dir(final) as tmp:
        (tmp / "a.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text('{"x": 1}')
        write_manifest(tmp)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_text_replaces(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [q.name for q in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_dir_replaces_whole_folder(tmp_path):
    final = tmp_path / "export"
    _write_folder(final, b"old")
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".export.tmp-")
        (tmp / "new.bin").write_bytes(b"new")
    assert sorted(p.name for p in final.iterdir()) == ["new.bin"]  # replaced whole, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp or old folder left


def test_crash_inside_atomic_dir_keeps_old_folder(tmp_path):
    final = tmp_path / "export"
    _write_folder(final, b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as tmp:
            (tmp / "a.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    assert (final / "a.bin").read_bytes() == b"old"
    verify_manifest(final)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_crash_on_first_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "x"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_manifest_lists_every_file(tmp_path):
    _write_folder(tmp_path / "e")
    files = json.loads((tmp_path / "e" / MANIFEST).read_text())["files"]
    assert sorted(files) == ["a.bin", "sub/b.json"]
    assert files["a.bin"]["bytes"] == len(b"weights")


@pytest.mark.parametrize("rel", ["a.bin", "sub/b.json"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damage_is_detected_and_named(tmp_path, rel, damage):
    final = tmp_path / "e"
    _write_folder(final)
    verify_manifest(final)
    path = final / rel
    data = path.read_bytes()
    if damage == "flip":
        path.write_bytes(bytes([data[0] ^ 0x01]) + data[1:])
        word = "sha256"
    elif damage == "truncate":
        path.write_bytes(data[:-1])
        word = "truncated"
    else:
        path.unlink()
        word = "missing"
    with pytest.raises(ssl_vit.CorruptCheckpoint, match=word) as info:
        verify_manifest(final, what="export")
    msg = str(info.value)
    assert rel in msg and str(final) in msg and msg.startswith("export") and "\n" not in msg


def test_missing_or_unreadable_manifest(tmp_path):
    final = tmp_path / "e"
    _write_folder(final)
    (final / MANIFEST).write_text("{not json")
    with pytest.raises(ssl_vit.CorruptCheckpoint, match="unreadable"):
        verify_manifest(final)
    (final / MANIFEST).unlink()
    with pytest.raises(ssl_vit.CorruptCheckpoint, match=MANIFEST):
        verify_manifest(final)
    assert issubclass(ssl_vit.CorruptCheckpoint, ssl_vit.SslVitError)


def test_manifest_cannot_point_outside(tmp_path):
    final = tmp_path / "e"
    _write_folder(final)
    (tmp_path / "secret").write_text("x")
    (final / MANIFEST).write_text(json.dumps({"files": {"../secret": {"sha256": "0", "bytes": 1}}}))
    with pytest.raises(ssl_vit.CorruptCheckpoint, match="outside"):
        verify_manifest(final)


def test_permissions_follow_umask(tmp_path, umask022):
    final = tmp_path / "e"
    _write_folder(final)
    for p in [final, final / "sub"]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == 0o755, oct(mode)
    for p in [final / "a.bin", final / MANIFEST]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o044 == 0o044, oct(mode)
    atomic_write_text(tmp_path / "t.txt", "x")
    assert stat.S_IMODE((tmp_path / "t.txt").stat().st_mode) == 0o644


def test_private_files_are_opened_up_to_the_umask(tmp_path, umask022):
    """Writers such as safetensors create 0600 files; what lands in place follows the umask."""
    with atomic_dir(tmp_path / "e") as tmp:
        fd = os.open(tmp / "w.bin", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        (tmp / "d").mkdir(mode=0o700)
    assert stat.S_IMODE((tmp_path / "e" / "w.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "e" / "d").stat().st_mode) == 0o755


def test_remove_stale_temps(tmp_path):
    (tmp_path / ".ckpt.tmp-abc").mkdir()
    (tmp_path / ".ckpt.old-def").mkdir()
    (tmp_path / ".meta.json.tmp-x").write_text("")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / ".hidden").write_text("")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".ckpt.old-def", ".ckpt.tmp-abc", ".meta.json.tmp-x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "ckpt"]
    assert remove_stale_temps(tmp_path / "absent") == []


def test_atomic_dir_keep_existing_lets_the_first_writer_win(tmp_path):
    """Two processes building one cache: the folder that is there first is kept, the later one discarded."""
    from ssl_vit.files import atomic_dir

    final = tmp_path / "cache"
    with atomic_dir(final, keep_existing=True) as a:
        (a / "who").write_text("first")
        with atomic_dir(final, keep_existing=True) as b:  # finishes first
            (b / "who").write_text("second")
    assert (final / "who").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


# ---- merge_dir: files published into a folder that keeps its other files (make_shards) ------------------------
def _user_folder(folder: Path) -> None:
    """A folder someone else owns: a file of theirs, an old shard and the manifest that lists it."""
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("mine")
    (folder / "a.tar").write_bytes(b"old shard")
    (folder / "manifest.json").write_text('{"shards": ["a.tar"]}')


def test_merge_dir_publishes_into_an_existing_folder_manifest_last(tmp_path, monkeypatch, umask022):
    """New files land beside the folder's own (a same-named one replaced); the old manifest goes before any file
    moves and the new one comes after all of them; no staging folder is left; permissions follow the umask."""
    import ssl_vit.files as files

    final = tmp_path / "shards"
    _user_folder(final)
    moves: list[tuple[str, bool, set[str]]] = []  # (name moved, manifest present, files in place) per os.replace
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).parent == final:
            moves.append((Path(dst).name, (final / "manifest.json").exists(), {p.name for p in final.iterdir()}))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with merge_dir(final, last=("manifest.json",)) as stage:
        assert stage.parent == final and stage.name.startswith(".merge.tmp-")
        (stage / "manifest.json").write_text('{"shards": ["a.tar", "b.tar"]}')
        (stage / "a.tar").write_bytes(b"new shard")
        fd = os.open(stage / "b.tar", os.O_WRONLY | os.O_CREAT, 0o600)  # a private file, as some writers make
        os.write(fd, b"second shard")
        os.close(fd)
    assert [m[0] for m in moves] == ["a.tar", "b.tar", "manifest.json"]
    assert not any(present for _, present, _ in moves)  # the old manifest left before the first move
    assert {"a.tar", "b.tar"} <= moves[-1][2]  # every file was in place when the manifest came
    assert sorted(p.name for p in final.iterdir()) == ["a.tar", "b.tar", "keep.txt", "manifest.json"]
    assert (final / "keep.txt").read_text() == "mine" and (final / "a.tar").read_bytes() == b"new shard"
    assert json.loads((final / "manifest.json").read_text()) == {"shards": ["a.tar", "b.tar"]}
    assert stat.S_IMODE((final / "b.tar").stat().st_mode) == 0o644


def test_merge_dir_crash_in_the_block_leaves_the_folder_as_it_was(tmp_path):
    final = tmp_path / "shards"
    _user_folder(final)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        with merge_dir(final) as stage:
            (stage / "a.tar").write_bytes(b"half")
            raise KeyboardInterrupt
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    # a folder it had to make (and its missing parents) goes again, a parent that was there stays
    with pytest.raises(RuntimeError, match="boom"):
        with merge_dir(tmp_path / "new" / "deep" / "out") as stage:
            (stage / "x").write_text("x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_merge_dir_failing_half_way_through_publishing_leaves_no_stale_manifest(tmp_path, monkeypatch):
    """A move that fails after the first: some shards changed, so the old manifest (which listed the old ones)
    must not be left describing them; the staging folder is removed and the error propagates."""
    import ssl_vit.files as files

    final = tmp_path / "shards"
    _user_folder(final)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        with merge_dir(final, last=("manifest.json",)) as stage:
            for name in ("a.tar", "b.tar", "manifest.json"):
                (stage / name).write_bytes(b"new")
    assert calls == ["a.tar", "b.tar"]
    assert sorted(p.name for p in final.iterdir()) == ["a.tar", "keep.txt"]  # a.tar changed: no stale manifest
    assert (final / "a.tar").read_bytes() == b"new" and (final / "keep.txt").read_text() == "mine"


def test_remove_stale_temps_clears_a_killed_merge(tmp_path):
    final = tmp_path / "shards"
    _user_folder(final)
    (final / ".merge.tmp-dead").mkdir()
    (final / ".merge.tmp-dead" / "a.tar").write_bytes(b"half")
    assert [p.name for p in remove_stale_temps(final)] == [".merge.tmp-dead"]
    assert sorted(p.name for p in final.iterdir()) == ["a.tar", "keep.txt", "manifest.json"]
