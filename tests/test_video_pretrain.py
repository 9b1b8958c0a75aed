"""Video pretraining through the launcher: synthetic clips -> make_shards -> pretrain.py on a tiny video
backbone (MAE with tube masking, DINO), exact resume, and the clear refusals for mismatched data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import ssl_vit
from launch import make_shards
from launch.config import CONFIG_DIR
from launch.data import ShardStream, check_shards, expand_shards
from launch.errors import LaunchError

from .test_launch_run import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FRAMES, SIZE = 6, 32


def moving_square_clip(rng: np.random.Generator, direction: int) -> np.ndarray:
    """uint8 (T, H, W, 3): dark noise with a bright 8 px square moving left (-1) or right (+1)."""
    clip = rng.integers(0, 60, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    y, x = (int(v) for v in rng.integers(0, SIZE - 8, 2))
    for t in range(FRAMES):
        left = (x + direction * 3 * t) % (SIZE - 8)
        clip[t, y:y + 8, left:left + 8] = 255
    return clip


@pytest.fixture(scope="module")
def clip_shards(tmp_path_factory):
    """8 clips in 2 classes (square moving right / left), written to 2 shards by `launch.make_shards`."""
    root = tmp_path_factory.mktemp("video")
    rng = np.random.default_rng(0)
    for label, direction in (("right", 1), ("left", -1)):
        (root / "clips" / label).mkdir(parents=True)
        for i in range(4):
            np.save(root / "clips" / label / f"clip{i}.npy", moving_square_clip(rng, direction))
    # .npy clips are recognised without --video
    assert make_shards.main([str(root / "clips"), str(root / "shards"), "--shard-size", "4"]) == 0
    return root / "shards"


@pytest.fixture(scope="module")
def common(clip_shards):
    # the demo profile's small MAE decoder (the paper's 8 x 512 one triples the run time)
    return ["--objective", "mae", "--backbone", "vit_3d_tiny", "--data", str(clip_shards),
            "--config", str(CONFIG_DIR / "profiles" / "demo" / "mae.yaml"),
            "--set", "data.batch_size=4", "--set", "data.image_size=32", "--set", "data.num_workers=1",
            "--set", "data.shuffle_buffer=8", "--set", "train.log_every=1", "--set", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, common):
    """4 steps straight; the same stopped at 2 and resumed to 4."""
    root = tmp_path_factory.mktemp("video_runs")
    straight, split = root / "straight", root / "split"
    assert run([*common, "--steps", "4", "--out", str(straight)]) == 0
    assert run([*common, "--steps", "4", "--out", str(split), "--set", "train.stop_at=2"]) == 0
    assert run([*common, "--steps", "4", "--out", str(split), "--resume"]) == 0
    return straight, split


def test_clip_shards_and_stream(clip_shards):
    manifest = json.loads((clip_shards / "manifest.json").read_text())
    assert manifest["kind"] == "video" and manifest["samples"] == 8 and manifest["classes"] == ["left", "right"]
    urls = expand_shards(str(clip_shards))
    assert check_shards(urls) == "video"
    kw = dict(batch_size=4, image_size=16, frames=3, frame_stride=2, shuffle_buffer=8, seed=3)
    first = next(iter(ShardStream(urls, **kw)))
    again = next(iter(ShardStream(urls, **kw)))
    assert first["image"].dtype == torch.uint8 and first["image"].shape == (4, 3, 3, 16, 16)
    assert set(first["label"].tolist()) <= {0, 1}
    assert first["key"] == again["key"] and torch.equal(first["image"], again["image"])  # seeded frame starts
    # reading the clips as images finds none
    with pytest.raises(LaunchError, match="no decodable samples"):
        next(iter(ShardStream(urls, batch_size=2, image_size=16)))


def test_video_mae_run_outputs_and_export(runs):
    straight, _ = runs
    cfg = yaml.safe_load((straight / "config.yaml").read_text())
    assert cfg["backbone"] == "vit_3d_tiny" and cfg["profile"] == "none"
    ckpt = straight / "checkpoints" / "step_0000004"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4 and state["batches_consumed"] == 4 and state["backbone"] == "vit_3d_tiny"
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(np.isfinite(r["train/loss"]) for r in train)
    assert all(r["train/skipped_samples"] == 0 for r in train)
    assert all(0.85 < r["train/mask_ratio"] < 0.95 for r in train)  # VideoMAE's 90 % on a (2, 4, 4) grid
    model = ssl_vit.load_backbone(straight / "export")
    assert model.is_video and tuple(model.default_size) == (4, 32, 32)
    encoder = {k[len("encoder."):]: v for k, v in load_file(ckpt / "objective.safetensors").items()
               if k.startswith("encoder.")}
    for k, v in model.state_dict().items():
        assert torch.equal(v, encoder[k]), k
    assert model(torch.randn(1, 3, 4, 32, 32)).shape == (1, model.embed_dim)


def test_video_resume_gives_identical_weights(runs):
    straight, split = runs
    a = load_file(straight / "checkpoints" / "step_0000004" / "objective.safetensors")
    b = load_file(split / "checkpoints" / "step_0000004" / "objective.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    first = load_file(split / "checkpoints" / "step_0000002" / "objective.safetensors")
    assert not all(torch.equal(first[k], a[k]) for k in a)  # it did train after resuming


def test_video_dino_through_the_launcher(clip_shards, tmp_path):
    out = tmp_path / "dino"
    # backbone_size=tiny: the objective's small head and two local crops (configs/profiles/demo/dino.yaml)
    assert run(["--objective", "dino", "--backbone", "vivit_tiny", "--data", str(clip_shards), "--steps", "2",
                "--out", str(out), "--set", "backbone_size=tiny", "--set", "data.batch_size=4",
                "--set", "data.image_size=32", "--set", "data.num_workers=0", "--set", "data.frames=6",
                "--set", "train.log_every=1"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    assert ssl_vit.load_backbone(out / "export").is_video


def test_full_preset_with_data_skips_the_demo_profile(clip_shards, tmp_path):
    """`--backbone vit_3d --data ...` trains the named preset (here shrunk by backbone_args), not the demo."""
    out = tmp_path / "full"
    shrink = dict(image_size=32, frames=4, image_patch_size=16, frame_patch_size=2, dim=32, depth=1, heads=2,
                  dim_head=16, mlp_dim=64)
    sets = [a for k, v in shrink.items() for a in ("--set", f"backbone_args.{k}={v}")]
    assert run(["--objective", "mae", "--backbone", "vit_3d", "--data", str(clip_shards), "--steps", "1",
                "--out", str(out), "--set", "data.batch_size=2", "--set", "data.num_workers=0", *sets]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["profile"] == "none" and cfg["backbone"] == "vit_3d" and cfg["data"]["image_size"] == 128


@pytest.mark.parametrize("case", ["image_backbone_on_clips", "video_backbone_on_images", "too_few_frames"])
def test_mismatched_data_exits_2_with_one_line(case, clip_shards, tmp_path, capsys):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    make_shards.make_shards(tmp_path / "images", tmp_path / "image_shards")
    out = tmp_path / "out"
    base = ["--steps", "2", "--out", str(out), "--set", "data.num_workers=0"]
    args = {
        "image_backbone_on_clips": ["--objective", "mae", "--backbone", "vit_tiny", "--data", str(clip_shards)],
        "video_backbone_on_images": ["--objective", "mae", "--backbone", "vit_3d_tiny",
                                     "--data", str(tmp_path / "image_shards")],
        "too_few_frames": ["--objective", "mae", "--backbone", "vit_3d_tiny", "--data", str(clip_shards),
                           "--set", "data.frames=2"],
    }[case]
    capsys.readouterr()
    assert run([*args, *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    expect = {"image_backbone_on_clips": "holds video clips", "video_backbone_on_images": "is a video model",
              "too_few_frames": "set data.frames to at least 4"}[case]
    assert expect in err[0]
    assert not out.exists()


def test_make_shards_video_flag_for_frame_folders(tmp_path):
    """Numbered frame folders look like class folders of images: --video makes them clips."""
    from PIL import Image

    clip = tmp_path / "clips" / "walk"
    clip.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(clip / f"{i:03d}.png")
    assert make_shards.main([str(tmp_path / "clips"), str(tmp_path / "as_images")]) == 0
    assert "kind" not in json.loads((tmp_path / "as_images" / "manifest.json").read_text())
    assert make_shards.main([str(tmp_path / "clips"), str(tmp_path / "as_clips"), "--video"]) == 0
    manifest = json.loads((tmp_path / "as_clips" / "manifest.json").read_text())
    assert manifest["kind"] == "video" and manifest["samples"] == 1
    assert check_shards(expand_shards(str(tmp_path / "as_clips"))) == "video"
    batch = next(iter(ShardStream(expand_shards(str(tmp_path / "as_clips")), batch_size=1, image_size=8, frames=3,
                                  infinite=False)))
    assert batch["image"][0, 0, :, 0, 0].tolist() == [0, 60, 120]  # frames in order


def test_video_objectives_defaults():
    """MAE hides 90 % tubes on video unless told otherwise; DINO's views sample the backbone's frames."""
    from objectives import MAE, Dino

    backbone = ssl_vit.create_backbone("vit_3d_tiny")
    mae = MAE(backbone, decoder_dim=32, decoder_heads=2, decoder_dim_head=16)
    assert mae.masking_ratio == 0.9
    assert MAE(backbone, masking_ratio=0.5, decoder_dim=32).masking_ratio == 0.5
    assert MAE(ssl_vit.create_backbone("vit_tiny"), decoder_dim=32).masking_ratio == 0.75
    pred, mask, _ = mae._predict(torch.randn(2, 3, 4, 32, 32))
    assert mask.shape == (2, 2, 4, 4) and torch.equal(mask[:, 0], mask[:, 1])  # one spatial mask over time
    assert pred.shape == (2, 32, 2 * 8 * 8 * 3)  # (pt, p, p) tubelets of 3 channels
    dino = Dino(ssl_vit.create_backbone("vivit_tiny"), image_size=None, num_classes_K=64, projection_hidden_size=32,
                bottleneck_dim=16, num_local_crops=2)
    assert {(s.name, s.frames) for s in dino.view_specs()} == {("global_1", 4), ("global_2", 4), ("local", 4)}
