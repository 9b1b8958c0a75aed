"""Launcher data: make_shards, the digits dataset, WebDataset streaming (splits, skips, fast-forward),
data faults (truncated shards, undecodable streams) and the canvas layout."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from launch.data import (
    DataStreamError,
    ShardStream,
    SkipCounter,
    check_shards,
    decode_canvas,
    decode_image,
    expand_shards,
    iter_batches,
    make_loader,
)
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


# ---- faults: truncated shards, undecodable streams --------------------------------------------------
@pytest.fixture()
def three_shards(tmp_path):
    """60 flat images in 3 shards of 20 (keys 00000000..00000059), with a manifest."""
    root = tmp_path / "flat60"
    root.mkdir()
    for i in range(60):
        (root / f"{i:02d}.png").write_bytes(_png(i, (6, 5)))
    make_shards(root, tmp_path / "s60", shard_size=20)
    return tmp_path / "s60"


def _truncate(path, member):
    """Cut the shard in the middle of member `member`'s data: a read error there. The sample before it
    cannot be known complete (its members could go on), so `member - 1` samples are read."""
    with tarfile.open(path) as tar:
        info = tar.getmembers()[member]
    path.write_bytes(path.read_bytes()[: info.offset_data + info.size // 2])


def _run(stream, workers=0):
    counter, keys = SkipCounter(), []
    for batch in iter_batches(make_loader(stream, num_workers=workers)):
        counter.update(batch)
        keys.extend(batch["key"])
    return counter, keys


def test_truncated_shard_counts_the_samples_it_lost(three_shards):
    bad = three_shards / "train-000001.tar"
    _truncate(bad, 9)
    urls = expand_shards(str(three_shards))
    counter, keys = _run(ShardStream(urls, batch_size=7, image_size=8, infinite=False))
    read_from_bad = sum(20 <= int(k) < 40 for k in keys)
    assert read_from_bad == 8 and len(keys) == 48  # the other shards are read in full
    assert counter.lost == 20 - read_from_bad and counter.total == counter.lost
    assert counter.bad_shards == [str(bad)]
    line = counter.summary()
    assert "\n" not in line and f"{20 - read_from_bad} lost in 1 bad shard" in line
    assert "train-000001.tar unreadable after sample 8 of 20 (ReadError)" in line
    # two workers, and an infinite stream over three epochs: counted every epoch
    counter, keys = _run(ShardStream(urls, batch_size=5, image_size=8, infinite=False), workers=2)
    assert counter.lost == 20 - read_from_bad and len(keys) == 40 + read_from_bad
    stream = ShardStream(urls, batch_size=5, image_size=8)
    counter = SkipCounter()
    for _, batch in zip(range(3 * ((40 + read_from_bad) // 5)), stream):  # three epochs
        counter.update(batch)
    assert counter.lost in (2 * (20 - read_from_bad), 3 * (20 - read_from_bad))


def test_split_by_samples_shares_the_loss_exactly(three_shards):
    bad = three_shards / "train-000000.tar"
    _truncate(bad, 7)
    totals, keys = 0, []
    for rank in range(2):
        counter, got = _run(ShardStream([str(bad)], batch_size=3, image_size=8, rank=rank, world=2, infinite=False))
        totals += counter.lost
        keys += got
    assert len(keys) == 6 and totals == 14 and len(set(keys)) == 6


def test_truncation_without_manifest_or_at_a_member_boundary(three_shards):
    bad = three_shards / "train-000002.tar"
    with tarfile.open(bad) as tar:
        members = tar.getmembers()
    cut = members[10].offset  # a clean end after 10 samples (one member each): no read error
    bad.write_bytes(bad.read_bytes()[:cut])
    counter, keys = _run(ShardStream([str(bad)], batch_size=4, image_size=8, infinite=False))
    assert len(keys) == 10 and counter.lost == 10
    assert "train-000002.tar unreadable after sample 10 of 20" in counter.summary()
    (three_shards / "manifest.json").unlink()
    _truncate(bad, 6)
    counter, keys = _run(ShardStream([str(bad)], batch_size=4, image_size=8, infinite=False))
    assert len(keys) == 5 and counter.lost == 0 and counter.bad_shards == [str(bad)]
    assert counter.summary() == "data faults: 1 bad shard: train-000002.tar unreadable after sample 5 (ReadError)"


def _garbage_shard(path, n=4):
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = 7
            tar.addfile(info, io.BytesIO(b"garbage"))


def test_stream_without_a_decodable_sample_raises_one_line(tmp_path):
    _garbage_shard(tmp_path / "bad-0.tar")
    _garbage_shard(tmp_path / "bad-1.tar")
    urls = [str(tmp_path / "bad-0.tar"), str(tmp_path / "bad-1.tar")]
    for workers in (0, 2):
        loader = make_loader(ShardStream(urls, batch_size=2, image_size=8), num_workers=workers)
        with pytest.raises(LaunchError) as info:
            next(iter_batches(loader))
        text = str(info.value)
        assert "\n" not in text and "Traceback" not in text and type(info.value) is LaunchError
        assert "no decodable samples (images)" in text and "undecodable samples" in text
        with pytest.raises(DataStreamError) as raw:  # without the wrapper: still one line
            next(iter(make_loader(ShardStream(urls, batch_size=2, image_size=8), num_workers=workers)))
        assert "\n" not in str(raw.value) and "no decodable samples (images)" in str(raw.value)
    with pytest.raises(LaunchError, match=r"no decodable samples \(images\)"):  # a single pass too
        list(ShardStream(urls, batch_size=2, image_size=8, infinite=False))


def test_batches_carry_faults_and_boxes(tmp_path):
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tar:
        for key, data in [("a", _png(1, (12, 6))), ("b", b"garbage"), ("c", _png(2, (6, 12)))]:
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (batch,) = ShardStream([str(path)], batch_size=4, image_size=16, decode_size=8, infinite=False)
    assert batch["faults"]["undecodable"] == 1 and batch["faults"]["bad_shards"] == {}
    assert batch["box"].dtype == torch.float32 and batch["box"].tolist() == [[0, 0, 16, 8], [0, 0, 8, 16]]
    (plain,) = ShardStream([str(path)], batch_size=4, image_size=16, infinite=False)
    assert plain["box"].tolist() == [[0, 0, 16, 16]] * 2


# ---- canvas layout -------------------------------------------------------------------------------
def test_canvas_keeps_the_aspect_ratio_and_pads():
    wide = np.random.default_rng(0).integers(1, 255, (10, 25, 3), dtype=np.uint8)  # 25 x 10
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    image, area = decode_canvas(buf.getvalue(), 32, decode_size=12, max_aspect=2.5)
    assert area == (30, 12) and image.shape == (3, 32, 32)  # shorter side 12, 2.5 : 1 within max_aspect 2.5
    want = np.array(Image.fromarray(wide).resize((30, 12), Image.BICUBIC))
    assert torch.equal(image[:, :12, :30], torch.from_numpy(want).permute(2, 0, 1))
    assert image[:, 12:].eq(0).all() and image[:, :, 30:].eq(0).all()
    image, area = decode_canvas(buf.getvalue(), 32, decode_size=12, max_aspect=2.0)
    assert area == (24, 12)  # the centre 20 x 10 of the strip, scaled by 1.2
    image, area = decode_canvas(buf.getvalue(), 20, decode_size=16, max_aspect=2.5)
    assert area == (20, 8)  # the long side would pass the canvas: it sets the scale
    old = decode_image(buf.getvalue(), 16)
    centre = np.array(Image.fromarray(wide).resize((40, 16), Image.BICUBIC))[:, 12:28]  # the default layout
    assert torch.equal(old, torch.from_numpy(centre).permute(2, 0, 1))
    with pytest.raises(LaunchError, match="decode_size"):
        ShardStream(["x.tar"], batch_size=1, image_size=16, decode_size=24)


# ---- make_shards: bad input is one line, exit 2, nothing written ---------------------------------
def _main_fails(capsys, argv, match):
    assert make_shards_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and match in err[-1] and not any("Traceback" in e for e in err)


def test_make_shards_bad_input(tmp_path, capsys, image_folder, monkeypatch):
    out = tmp_path / "deep" / "out"
    _main_fails(capsys, [str(tmp_path / "missing"), str(out)], "does not exist")
    (tmp_path / "empty").mkdir()
    _main_fails(capsys, [str(tmp_path / "empty"), str(out)], "no images")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"not a png")
    _main_fails(capsys, [str(tmp_path / "junk"), str(out)], "no readable images")
    (tmp_path / "a_file").write_text("x")
    _main_fails(capsys, [str(image_folder), str(tmp_path / "a_file")], "is a file")
    _main_fails(capsys, [str(image_folder), str(tmp_path / "a_file" / "sub")], "cannot write")
    _main_fails(capsys, [str(tmp_path / "a_file"), str(out)], "is a file")
    _main_fails(capsys, [str(image_folder), str(out), "--prefix", "../x"], "--prefix")
    assert not (tmp_path / "deep").exists() and (tmp_path / "a_file").read_text() == "x"

    # interrupted half-way: neither shards nor manifest are left, nor the folders it made
    from launch import make_shards as module
    calls = []

    def encode(path):
        calls.append(path)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(path)

    real = module.encode
    monkeypatch.setattr(module, "encode", encode)
    with pytest.raises(KeyboardInterrupt):
        make_shards(image_folder, out, shard_size=2)
    assert not (tmp_path / "deep").exists()
    (out).mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        make_shards(image_folder, out, shard_size=2)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # what was there stays, nothing else


def test_digits_manifest_lists_shard_sizes(tmp_path):
    from launch.data import shard_sizes

    train, val = digits_shards(str(tmp_path))
    urls = expand_shards(train) + expand_shards(val)
    sizes = shard_sizes(urls)
    assert sorted(sizes) == sorted(urls) and sum(sizes.values()) == 1797
