"""Byte flips, truncation and deletion of each file of a checkpoint and of an export, opened by every tool:
one line naming the file, exit status 2 (`ssl_vit.CorruptCheckpoint` from `ssl_vit.load_backbone`), nothing
written; `--resume` names the newest intact checkpoint when an older one is intact."""

from __future__ import annotations

import shutil

import pytest

import ssl_vit
from launch import checkpoint as ckpt
from launch.export_run import main as export_main
from launch.probe import main as probe_main
from launch.visualize import main as visualize_main
from ssl_vit.errors import ExportNotFound

from .common import call, one_error_line, pretrain, tiny, tree_hash

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CHECKPOINT_FILES = ["objective.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.yaml", "checksums.json"]
EXPORT_FILES = ["backbone.safetensors", "backbone.json", "config.yaml", "checksums.json"]
DAMAGES = ["flip", "truncate", "delete"]


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":  # one byte in the middle (tensor data in the weight files)
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.unlink()


def run_args(cache, out, *extra: str) -> list[str]:
    return tiny(cache, "--steps", "2", "--set", "train.checkpoint_every=1", "--out", str(out), *extra)


@pytest.fixture(scope="module")
def good_run(cache, tmp_path_factory):
    """2 steps, a checkpoint after each (step_0000001, step_0000002) and the export."""
    out = tmp_path_factory.mktemp("corrupt") / "run"
    rc, err, _ = pretrain(run_args(cache, out))
    assert rc == 0, err
    assert [p.name for p in ckpt.step_folders(out)] == ["step_0000002", "step_0000001"]
    return out


@pytest.fixture
def run_copy(good_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    return out


def checkpoint_tool(tool: str, cache, run, tmp_path) -> tuple[int, list[str]]:
    if tool == "resume":
        rc, err, _ = pretrain(run_args(cache, run, "--resume"))
    elif tool == "export.py":
        rc, err, _ = call(export_main, [str(run), str(tmp_path / "exported")])
    else:
        rc, err, _ = call(visualize_main, [str(run), "--cache", str(cache)])
    return rc, err


@pytest.mark.parametrize("tool", ["resume", "export.py", "visualize"])
@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_damaged_checkpoint_is_one_line(name, how, tool, run_copy, cache, tmp_path):
    damage(run_copy / "checkpoints" / "step_0000002" / name, how)
    before = tree_hash(run_copy)
    rc, err = checkpoint_tool(tool, cache, run_copy, tmp_path)
    assert rc == 2, err
    word = {"flip": "sha256", "truncate": "truncated", "delete": "missing"}[how]
    if name == "checksums.json" and how != "delete":
        word = "unreadable"
    elif name == "checksums.json":
        word = "has no checksums.json"
    line = one_error_line(err, name, "step_0000002", word)
    assert "step_0000001" in line  # the newest intact checkpoint, offered by name
    assert tree_hash(run_copy) == before
    assert not (tmp_path / "exported").exists()


def test_no_intact_checkpoint_left_says_so(run_copy, cache):
    damage(run_copy / "checkpoints" / "step_0000002" / "rng.pt", "truncate")
    damage(run_copy / "checkpoints" / "step_0000001" / "optimizer.pt", "flip")
    before = tree_hash(run_copy)
    rc, err, _ = pretrain(run_args(cache, run_copy, "--resume"))
    assert rc == 2
    one_error_line(err, "rng.pt", "no intact checkpoint is left")
    assert tree_hash(run_copy) == before


@pytest.mark.parametrize("pointer", ["deleted", "garbage", "names_a_missing_folder"])
def test_damaged_latest_pointer_falls_back_to_the_newest_intact(pointer, run_copy, cache):
    latest = run_copy / "checkpoints" / "latest"
    if pointer == "deleted":
        latest.unlink()
    else:
        latest.write_text("\x00\xff garbage" if pointer == "garbage" else "step_0000009\n")
    damage(run_copy / "checkpoints" / "step_0000002" / "objective.safetensors", "flip")
    assert ckpt.find_checkpoint(run_copy).name == "step_0000001"
    rc, err, _ = pretrain(run_args(cache, run_copy, "--resume"))
    assert rc == 0, err  # resumed from step 1, trained step 2 again, wrote an intact checkpoint over the damaged one
    ckpt.verified(run_copy / "checkpoints" / "step_0000002")


def export_tool(tool: str, cache, export, tmp_path) -> tuple[int, list[str], type | None]:
    if tool == "export.py":
        rc, err, _ = call(export_main, [str(export), str(tmp_path / "exported")])
    elif tool == "visualize":
        rc, err, _ = call(visualize_main, [str(export), "--cache", str(cache)])
    elif tool == "linear_probe":
        rc, err, _ = call(probe_main, ["--weights", str(export), "--cache", str(cache), "--epochs", "1", "--no-knn",
                                       "--workers", "0"])
    else:
        with pytest.raises(ssl_vit.SslVitError) as info:
            ssl_vit.load_backbone(export)
        return 2, [f"error: {info.value}"], type(info.value)
    return rc, err, None


@pytest.mark.parametrize("tool", ["export.py", "visualize", "linear_probe", "load_backbone"])
@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", EXPORT_FILES)
def test_damaged_export_is_one_line(name, how, tool, good_run, cache, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(good_run / "export", export)
    damage(export / name, how)
    before = tree_hash(export)
    rc, err, raised = export_tool(tool, cache, export, tmp_path)
    assert rc == 2, err
    if name in ("backbone.safetensors", "backbone.json") and how == "delete":
        one_error_line(err, name, "missing")  # not an export at all any more
        assert raised in (None, ExportNotFound)
    else:
        assert raised in (None, ssl_vit.CorruptCheckpoint)
        word = {"flip": "sha256", "truncate": "truncated", "delete": "missing"}[how]
        if name == "checksums.json":
            word = "has no checksums.json" if how == "delete" else "unreadable"
        one_error_line(err, name, word)
    assert tree_hash(export) == before
    assert not (tmp_path / "exported").exists()



def test_checkpoint_and_export_files_follow_the_umask(good_run):
    """A shared file system: what a run writes is as readable as the umask allows (not 0600)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    modes = {str(p.relative_to(good_run)): p.stat().st_mode & 0o777
             for folder in (good_run / "export", good_run / "checkpoints" / "step_0000002") for p in folder.iterdir()}
    assert all(mode == want for mode in modes.values()), modes
