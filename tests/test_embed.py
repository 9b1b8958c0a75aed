"""`python -m launch.embed`: keys, labels and pooled features of shards through an export."""

from __future__ import annotations

import io
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import ssl_vit
from launch.data import ShardStream, expand_shards
from launch.embed import main
from launch.knn import normalizer
from launch.make_shards import make_shards


def _png(seed: int, size: tuple[int, int] = (20, 14)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def shards(tmp_path):
    root = tmp_path / "images"
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            (root / cls / f"{i}.png").write_bytes(_png(10 * c + i))
    make_shards(root, tmp_path / "shards", shard_size=3)  # 3 shards: 3 + 3 + 2 samples
    return str(tmp_path / "shards")


@pytest.fixture()
def export(tmp_path):
    torch.manual_seed(0)
    model = ssl_vit.create_backbone("vit_tiny")
    config = {"data": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}
    return ssl_vit.save_backbone(model, tmp_path / "export", objective="dino", step=3, config=config)


def _expected(export, shards, size=32):
    """Keys, labels and load_backbone(...)'s pooled features of the same images, one pass in shard order."""
    model = ssl_vit.load_backbone(export)
    prepare = normalizer([0.5, 0.4, 0.3], [0.2, 0.25, 0.3], size)
    keys, labels, feats = [], [], []
    for batch in ShardStream(expand_shards(shards), batch_size=8, image_size=size, infinite=False):
        keys += batch["key"]
        labels += batch["label"].tolist()
        with torch.no_grad():
            feats.append(model.forward_features(prepare(batch["image"])).pooled)
    return keys, labels, torch.cat(feats).numpy()


def test_npy_output_matches_shards_and_backbone(export, shards, tmp_path, capsys):
    out = tmp_path / "emb"
    assert main(["--weights", str(export), "--data", shards, "--out", str(out), "--batch-size", "3",
                 "--workers", "0", "--device", "cpu"]) == 0
    assert "embedded 8 samples" in capsys.readouterr().out
    features, labels = np.load(out / "features.npy"), np.load(out / "labels.npy")
    keys = json.loads((out / "keys.json").read_text())
    want_keys, want_labels, want = _expected(export, shards)
    assert features.shape == (8, 64) and features.dtype == np.float32 and labels.dtype == np.int64
    assert keys == want_keys and len(set(keys)) == 8
    assert labels.tolist() == want_labels and sorted(set(want_labels)) == [0, 1]
    np.testing.assert_allclose(features, want, rtol=0, atol=1e-5)
    info = json.loads((out / "embeddings.json").read_text())
    assert info["samples"] == 8 and info["dim"] == 64 and info["mean"] == [0.5, 0.4, 0.3]
    assert set(json.loads((out / "checksums.json").read_text())["files"]) == {
        "features.npy", "labels.npy", "keys.json", "embeddings.json"}


def test_image_size_changes_the_input(export, shards, tmp_path):
    out = tmp_path / "emb48"
    assert main(["--weights", str(export), "--data", shards, "--out", str(out), "--image-size", "48",
                 "--workers", "0", "--device", "cpu"]) == 0
    _, _, want = _expected(export, shards, size=48)
    np.testing.assert_allclose(np.load(out / "features.npy"), want, rtol=0, atol=1e-5)
    assert json.loads((out / "embeddings.json").read_text())["image_size"] == 48


def test_umap_picture_with_a_stand_in_umap(export, shards, tmp_path, monkeypatch):
    class FakeUMAP:  # umap-learn is optional; the drawing around it is what is tested here
        def __init__(self, **kwargs):
            assert kwargs["n_components"] == 2 and kwargs["n_neighbors"] <= 7

        def fit_transform(self, x):
            return np.asarray(x)[:, :2]

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    out = tmp_path / "emb"
    assert main(["--weights", str(export), "--data", shards, "--out", str(out), "--umap", "--workers", "0",
                 "--device", "cpu"]) == 0
    with Image.open(out / "umap.png") as picture:
        assert picture.size[0] > 300 and len(picture.getcolors(1 << 16) or range(1000)) > 3
    assert "umap.png" in json.loads((out / "checksums.json").read_text())["files"]


def test_parquet_output(export, shards, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "emb"
    assert main(["--weights", str(export), "--data", shards, "--out", str(out), "--format", "parquet",
                 "--workers", "0", "--device", "cpu"]) == 0
    table = pq.read_table(out / "embeddings.parquet").to_pydict()
    want_keys, want_labels, want = _expected(export, shards)
    assert table["key"] == want_keys and table["label"] == want_labels
    np.testing.assert_allclose(np.array(table["features"], dtype=np.float32), want, rtol=0, atol=1e-5)


def _fails(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert match in err, err
    return err


def test_bad_input_is_one_line_and_writes_nothing(export, shards, tmp_path, capsys, monkeypatch):
    out = tmp_path / "emb"
    _fails(capsys, ["--weights", str(export), "--out", str(out)], "--data")
    monkeypatch.setitem(sys.modules, "umap", None)  # umap-learn missing: import fails
    _fails(capsys, ["--weights", str(export), "--data", shards, "--out", str(out), "--umap"],
           "pip install umap-learn")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    _fails(capsys, ["--weights", str(export), "--data", shards, "--out", str(out), "--format", "parquet"],
           "pip install pyarrow")
    _fails(capsys, ["--weights", str(tmp_path / "nowhere"), "--data", shards, "--out", str(out)], "nowhere")
    _fails(capsys, ["--weights", str(export), "--data", str(tmp_path / "missing"), "--out", str(out)], "missing")
    weights = export / "backbone.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    _fails(capsys, ["--weights", str(export), "--data", shards, "--out", str(out), "--workers", "0"], "sha256")
    assert not out.exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    _fails(capsys, ["--weights", str(export), "--data", shards, "--out", str(tmp_path / "busy")], "replaced whole")


def test_video_export_embeds_clips(tmp_path):
    from launch.video import write_clip_shards

    rng = np.random.default_rng(0)
    for c in ("run", "walk"):
        (tmp_path / "clips" / c).mkdir(parents=True)
        for i in range(2):
            np.save(tmp_path / "clips" / c / f"{i}.npy", rng.integers(0, 255, (4, 24, 24, 3), dtype=np.uint8))
    write_clip_shards(tmp_path / "clips", tmp_path / "shards", shard_size=3)
    torch.manual_seed(0)
    export = ssl_vit.save_backbone(ssl_vit.create_backbone("vit_3d_tiny"), tmp_path / "export")
    out = tmp_path / "emb"
    assert main(["--weights", str(export), "--data", str(tmp_path / "shards"), "--out", str(out), "--workers", "0",
                 "--device", "cpu"]) == 0
    features, labels = np.load(out / "features.npy"), np.load(out / "labels.npy")
    model = ssl_vit.load_backbone(export)
    batch = next(iter(ShardStream(expand_shards(str(tmp_path / "shards")), batch_size=8, image_size=32,
                                  infinite=False, frames=4)))
    mean = torch.tensor(ssl_vit.IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(ssl_vit.IMAGENET_STD).view(1, 3, 1, 1, 1)
    with torch.no_grad():
        want = model.forward_features((batch["image"].float() / 255 - mean) / std).pooled.numpy()
    assert features.shape == (4, 64) and labels.tolist() == batch["label"].tolist()
    assert sorted(labels.tolist()) == [0, 0, 1, 1]
    np.testing.assert_allclose(features, want, rtol=0, atol=1e-5)
    assert json.loads((out / "keys.json").read_text()) == batch["key"]
