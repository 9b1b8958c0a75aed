"""Video data and CCT3D: clip folders to shards and back, frame sampling, padding, bad clips, the canvas
layout of clips; CCT3D grids."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import ssl_vit
from backbones import CCT3D
from launch.data import ShardStream, decode_canvas, decode_image
from launch.errors import LaunchError
from launch.video import (
    ClipDecodeError,
    clip_indices,
    decode_clip,
    decode_clip_canvas,
    is_clip_member,
    is_clip_sample,
    list_clips,
    write_clip_shards,
)
from ssl_vit import masking


def numbered_clip(length: int, h: int, w: int, channels: int = 3) -> np.ndarray:
    """uint8 (T, H, W, C) whose frame i is the constant 10 * i, so decoded frames reveal their index."""
    values = (np.arange(length, dtype=np.uint8) * 10)[:, None, None, None]
    return np.broadcast_to(values, (length, h, w, channels)).copy()


def png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.fixture()
def clip_folder(tmp_path):
    """Two classes: npy clips, a folder of numbered PNG frames, and three unreadable clips."""
    root = tmp_path / "clips"
    (root / "a" / "walk").mkdir(parents=True)
    (root / "b" / "broken_frames").mkdir(parents=True)
    np.save(root / "a" / "run.npy", numbered_clip(10, 40, 48))
    for i in range(6):  # frame numbers 0, 2, ..., 10: the order is numeric, the gaps do not matter
        (root / "a" / "walk" / f"frame{2 * i:03d}.png").write_bytes(png(numbered_clip(6, 36, 30)[i]))
    np.save(root / "b" / "grey.npy", numbered_clip(5, 32, 32)[..., 0])  # (T, H, W): grey
    (root / "b" / "bad.npy").write_bytes(b"not an npy file")
    np.save(root / "b" / "floats.npy", np.zeros((4, 8, 8, 3), np.float32))
    (root / "b" / "broken_frames" / "000.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


def read_shards(out_dir, manifest) -> list[dict]:
    urls = [str(out_dir / s["name"]) for s in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_clip_folder_to_shards_and_back(clip_folder, tmp_path):
    clips, classes = list_clips(clip_folder)
    assert classes == ["a", "b"] and [p.name for p, _ in clips] == [
        "run.npy", "walk", "bad.npy", "broken_frames", "floats.npy", "grey.npy"]
    out = tmp_path / "shards"
    manifest = write_clip_shards(clip_folder, out, shard_size=2)
    assert manifest["samples"] == 3 and manifest["classes"] == ["a", "b"] and manifest["num_classes"] == 2
    assert [s["samples"] for s in manifest["shards"]] == [2, 1]
    assert manifest["pattern"] == "train-{000000..000001}.tar" and manifest["kind"] == "video"
    assert sorted(p.rsplit("/", 1)[-1] for p in manifest["skipped"]) == ["bad.npy", "broken_frames", "floats.npy"]
    assert json.loads((out / "manifest.json").read_text()) == manifest

    samples = read_shards(out, manifest)
    assert [s["__key__"] for s in samples] == ["00000000", "00000001", "00000005"]
    assert [int(s["cls"]) for s in samples] == [0, 0, 1]
    assert all(is_clip_sample(s) for s in samples)
    assert sorted(k for k in samples[1] if not k.startswith("_")) == ["000.png", "001.png", "002.png", "003.png",
                                                                        "004.png", "005.png", "cls"]
    for s in samples:
        video = decode_clip(s, frames=4, stride=1, size=16, rng=None)
        assert video.dtype == torch.uint8 and video.shape == (3, 4, 16, 16)
    # Centre window of frames 0..9 with stride 2: start (10 - 7) // 2 = 1 -> frames 1, 3, 5, 7.
    video = decode_clip(samples[0], frames=4, stride=2, size=16)
    assert video[0, :, 0, 0].tolist() == [10, 30, 50, 70]
    # Six frames, 4 frames 2 apart need 7: start 0, the last frame repeats -> 0, 2, 4, 5.
    video = decode_clip(samples[1], frames=4, stride=2, size=16)
    assert video[:, :, 5, 5].tolist() == [[0, 20, 40, 50]] * 3
    # The grey clip comes back with three equal channels.
    grey = decode_clip(samples[2], frames=2, stride=1, size=16)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])


def test_shards_are_deterministic(clip_folder, tmp_path):
    a = write_clip_shards(clip_folder, tmp_path / "a", shard_size=2)
    b = write_clip_shards(clip_folder, tmp_path / "b", shard_size=2)
    for sa, sb in zip(a["shards"], b["shards"]):
        assert (tmp_path / "a" / sa["name"]).read_bytes() == (tmp_path / "b" / sb["name"]).read_bytes()


def test_flat_folder_has_no_labels_and_empty_folder_is_refused(tmp_path):
    flat = tmp_path / "flat"
    (flat / "clip_x").mkdir(parents=True)
    np.save(flat / "one.npy", numbered_clip(3, 8, 8))
    for i in range(2):
        (flat / "clip_x" / f"{i}.png").write_bytes(png(numbered_clip(2, 8, 8)[i]))
    manifest = write_clip_shards(flat, tmp_path / "out", shard_size=10)
    assert manifest["samples"] == 2 and manifest["classes"] == []
    samples = read_shards(tmp_path / "out", manifest)
    assert all("cls" not in s for s in samples)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LaunchError, match="no readable clips"):
        write_clip_shards(tmp_path / "empty", tmp_path / "out2")


def test_random_start_stays_inside_and_varies():
    rng = random.Random(0)
    starts = set()
    for _ in range(50):
        idx = clip_indices(20, 4, 3, rng)
        assert idx == list(range(idx[0], idx[0] + 10, 3)) and 0 <= idx[0] <= 20 - 10
        starts.add(idx[0])
    assert len(starts) > 3
    assert clip_indices(20, 4, 3, None) == [5, 8, 11, 14]
    assert clip_indices(2, 3, 1, random.Random(0)) == [0, 1, 1]


def test_frame_geometry_matches_the_image_path():
    """An npy frame and the same frame as an image file decode to identical pixels."""
    frame = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    video = decode_clip({"npy": npy(frame[None])}, frames=1, stride=1, size=32)
    framed = decode_clip({"000.png": png(frame)}, frames=1, stride=1, size=32)
    image = decode_image(png(frame), 32)
    assert torch.equal(video[:, 0], image) and torch.equal(framed[:, 0], image)


def test_frame_keys_are_ordered_by_number():
    frames = numbered_clip(12, 8, 8)
    sample = {"__key__": "k", "cls": b"3", **{f"frame{i:d}.png": png(frames[i]) for i in (0, 2, 10, 11)}}
    video = decode_clip(sample, frames=4, stride=1, size=8)
    assert video[0, :, 0, 0].tolist() == [0, 20, 100, 110]  # frame10 after frame2, not after frame0


def test_undecodable_clips_raise_a_specific_error():
    cases = [
        {"npy": b"garbage"},
        {"npy": npy(np.zeros((2, 8, 8, 3), np.float32))},
        {"npy": npy(np.zeros((2, 8, 8, 2), np.uint8))},
        {"000.jpg": b"\xff\xd8 truncated"},
        {"__key__": "k", "jpg": png(np.zeros((8, 8, 3), np.uint8))},  # an image, not a clip
    ]
    for sample in cases:
        with pytest.raises(ClipDecodeError):
            decode_clip(sample, frames=2, stride=1, size=8)
    assert issubclass(ClipDecodeError, ValueError)
    assert not is_clip_sample({"__key__": "k", "jpg": b"", "cls": b"1"})
    assert is_clip_member("00000001.npy") and is_clip_member("d/00000001.frame012.png")
    assert not is_clip_member("00000001.jpg") and not is_clip_member("00000001.cls")


# ---- CCT3D -----------------------------------------------------------------------------------------

TINY = dict(img_size=32, num_frames=4, embedding_dim=32, n_conv_layers=1, kernel_size=3, stride=1, padding=1,
            pooling_kernel_size=3, pooling_stride=2, pooling_padding=1, num_layers=1, num_heads=2,
            mlp_ratio=2.0, num_classes=5)


def test_cct3d_grid_with_temporal_stride_and_mask():
    m = CCT3D(**TINY, frame_pooling_kernel_size=2, frame_pooling_stride=2).eval()
    assert ssl_vit.VIDEO in m.capabilities and m.mask_unit == (2, 2, 2)
    x = torch.randn(2, 3, 4, 32, 48)
    out = m.forward_features(x)
    assert out.grid == (2, 16, 24) and out.patch_tokens.shape == (2, 2 * 16 * 24, 32)
    mask = masking.tube_mask(2, out.grid, 0.5)
    assert m.forward_features(x, mask=mask).patch_tokens.shape == out.patch_tokens.shape
    with pytest.raises(ssl_vit.InputShapeError, match="frames"):
        m(torch.randn(1, 3, 3, 32, 32))
    with pytest.raises(ssl_vit.InputShapeError, match="5-D"):
        m(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="exact grid"):
        CCT3D(**{**TINY, "padding": 2})


@pytest.mark.parametrize("pos", ["sine", "learnable"])
def test_cct3d_positions_adapt_to_clip_size(pos):
    torch.manual_seed(0)
    m = CCT3D(**TINY, positional_embedding=pos).eval()
    x = torch.randn(1, 3, 6, 16, 24)  # other frames and size than the build
    with torch.no_grad():
        with_pos = m.forward_features(x).patch_tokens
        m.pos_embed = None
        without = m.forward_features(x).patch_tokens
    assert with_pos.shape == (1, 6 * 8 * 12, 32)
    assert not torch.allclose(with_pos, without, atol=1e-4), "positions must reach the tokens"


def test_decoded_clips_feed_cct3d():
    sample = {"npy": npy(numbered_clip(9, 24, 40))}
    batch = torch.stack([decode_clip(sample, frames=4, stride=2, size=32, rng=random.Random(i)) for i in range(2)])
    m = CCT3D(**TINY)
    logits = m(batch.float() / 255)
    assert batch.shape == (2, 3, 4, 32, 32) and logits.shape == (2, 5)


def test_clip_canvas_keeps_the_aspect_ratio_like_images(tmp_path):
    """With decode_size, every frame is fitted as launch.data.decode_canvas fits an image; the batch box
    is the valid area shared by the clip's frames."""
    frames = np.random.default_rng(1).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    video, area = decode_clip_canvas({"npy": npy(frames)}, frames=3, stride=2, size=32, decode_size=24)
    image, image_area = decode_canvas(png(frames[0]), 32, decode_size=24)
    assert area == image_area == (29, 24) and video.shape == (3, 3, 32, 32)
    assert torch.equal(video[:, 0], image)  # centre window of 5 frames 2 apart: frames 0, 2, 4
    assert video[:, :, 24:].eq(0).all() and video[:, :, :, 29:].eq(0).all()
    assert torch.equal(decode_clip({"npy": npy(frames)}, frames=3, stride=2, size=32, decode_size=24), video)
    out = tmp_path / "clips"
    out.mkdir()
    np.save(out / "a.npy", frames)
    np.save(out / "b.npy", frames[:, :30])  # 48 x 30
    write_clip_shards(out, tmp_path / "shards")
    (batch,) = ShardStream([str(tmp_path / "shards" / "train-000000.tar")], batch_size=2, image_size=32, frames=2,
                           decode_size=24, infinite=False)
    assert batch["image"].shape == (2, 3, 2, 32, 32)
    assert batch["box"].tolist() == [[0, 0, 29, 24], [0, 0, 32, 20]]  # 48 x 30: the long side sets the scale
