"""Launcher data: make_shards, the digits dataset, WebDataset streaming (splits, skips, fast-forward)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from launch.data import ShardStream, SkipCounter, check_shards, expand_shards, make_loader
from launch.digits import digits_shards
from launch.errors import LaunchError
from launch.make_shards import main as make_shards_main
from launch.make_shards import make_shards


def _png(seed: int, size=(12, 9)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def image_folder(tmp_path):
    root = tmp_path / "images"
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            (root / cls / f"{i}.png").write_bytes(_png(10 * c + i))
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")
    return root


def test_make_shards_labels_manifest_skips_and_determinism(image_folder, tmp_path, capsys):
    assert make_shards_main([str(image_folder), str(tmp_path / "a"), "--shard-size", "4"]) == 0
    assert "skipping unreadable image" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["samples"] == 10 and manifest["classes"] == ["cat", "dog"]
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["skipped"][0].endswith("broken.jpg")
    make_shards(image_folder, tmp_path / "b", shard_size=4)
    for shard in manifest["shards"]:
        assert (tmp_path / "a" / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()
    with tarfile.open(tmp_path / "a" / "train-000002.tar") as tar:
        assert tar.extractfile("00000009.cls").read() == b"1"


def test_flat_folder_has_no_labels(tmp_path):
    (tmp_path / "flat").mkdir()
    for i in range(3):
        (tmp_path / "flat" / f"{i}.png").write_bytes(_png(i))
    manifest = make_shards(tmp_path / "flat", tmp_path / "s")
    assert manifest["classes"] == [] and manifest["samples"] == 3
    batch = next(iter(ShardStream(expand_shards(str(tmp_path / "s")), batch_size=3, image_size=8, infinite=False)))
    assert batch["label"].tolist() == [-1, -1, -1]
    with pytest.raises(LaunchError, match="no images"):
        make_shards(tmp_path / "s", tmp_path / "t")  # a folder of tars holds no images


@pytest.fixture()
def shards(image_folder, tmp_path):
    make_shards(image_folder, tmp_path / "shards", shard_size=2)  # 5 shards of 2
    return str(tmp_path / "shards" / "train-{000000..000004}.tar")


def test_batch_format_and_pattern_folder_pipe(shards, tmp_path):
    urls = expand_shards(shards)
    assert len(urls) == 5 and expand_shards(str(tmp_path / "shards")) == urls
    batch = next(iter(ShardStream(urls, batch_size=4, image_size=16, infinite=False)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 16, 16)
    assert batch["label"].dtype == torch.long and len(batch["key"]) == 4
    piped = expand_shards(f"pipe:cat {urls[0]}")
    keys = [k for b in ShardStream(piped, batch_size=1, image_size=8, infinite=False) for k in b["key"]]
    assert keys == ["00000000", "00000001"]


def _keys(stream, n=None):
    out = []
    for i, batch in enumerate(stream):
        if n is not None and i >= n:
            break
        out.append(batch["key"])
    return out


def test_ranks_and_workers_read_disjoint_parts(shards):
    urls = expand_shards(shards)
    per_rank = [{k for b in _keys(ShardStream(urls, batch_size=1, image_size=8, rank=r, world=2, infinite=False))
                 for k in b} for r in range(2)]
    assert not per_rank[0] & per_rank[1] and len(per_rank[0] | per_rank[1]) == 10
    few = [{k for b in _keys(ShardStream(urls[:1], batch_size=1, image_size=8, rank=r, world=2, infinite=False))
            for k in b} for r in range(2)]  # fewer shards than readers: split by samples
    assert few[0] == {"00000000"} and few[1] == {"00000001"}
    loader = make_loader(ShardStream(urls, batch_size=2, image_size=8, world=1, infinite=False), num_workers=2)
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == sorted(per_rank[0] | per_rank[1])


def test_fast_forward_matches_uninterrupted_stream(shards):
    urls = expand_shards(shards)
    kw = dict(batch_size=3, image_size=8, shuffle_buffer=4, seed=7)
    it = iter(make_loader(ShardStream(urls, **kw), num_workers=2))
    full = [next(it)["key"] for _ in range(9)]  # three epochs: the order changes every epoch
    assert full[:3] != full[3:6] or full[3:6] != full[6:9]
    resumed = iter(make_loader(ShardStream(urls, skip_batches=5, **kw), num_workers=2))
    assert [next(resumed)["key"] for _ in range(4)] == full[5:]


def test_undecodable_and_unlabelled_samples_are_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tar:
        for key, files in [("a", {"png": _png(1), "cls": b"0"}), ("b", {"png": b"garbage", "cls": b"1"}),
                           ("c", {"png": _png(2)}), ("d", {"png": _png(3), "cls": b"1"}), ("e", {"txt": b"x"})]:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    counter = SkipCounter()
    batches = list(ShardStream([str(path)], batch_size=8, image_size=8, infinite=False, need_labels=True))
    for b in batches:
        counter.update(b)
    assert [k for b in batches for k in b["key"]] == ["a", "d"] and counter.total == 3
    plain = list(ShardStream([str(path)], batch_size=8, image_size=8, infinite=False))
    assert plain[0]["key"] == ["a", "c", "d"] and plain[0]["label"].tolist() == [0, -1, 1]


def test_bad_paths(tmp_path):
    with pytest.raises(LaunchError, match="does not exist"):
        expand_shards(str(tmp_path / "missing-{000..003}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LaunchError, match="no .tar shards"):
        expand_shards(str(tmp_path / "empty"))
    with pytest.raises(LaunchError, match="empty data path"):
        expand_shards("  ")
    with tarfile.open(tmp_path / "text.tar", "w") as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(LaunchError, match="hold no images"):
        check_shards([str(tmp_path / "text.tar")])


def test_digits_dataset(tmp_path):
    train, val = digits_shards(str(tmp_path))
    assert digits_shards(str(tmp_path)) == (train, val)  # built once
    manifest = json.loads((tmp_path / "digits-v1" / "manifest.json").read_text())
    assert manifest["train_samples"] + manifest["val_samples"] == 1797 and manifest["num_classes"] == 10
    assert len(expand_shards(train)) == 8 and len(expand_shards(val)) == 2
    labels = torch.cat([b["label"] for b in ShardStream(expand_shards(val), batch_size=64, image_size=32,
                                                        infinite=False)])
    assert len(labels) == manifest["val_samples"] and set(labels.tolist()) == set(range(10))
