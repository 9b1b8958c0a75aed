"""The learning-quality benchmark's core, end to end at smoke-test size: `--quick` (vit_tiny, a ~10 s
budget, a subset of the digits), one objective, no peers."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("sklearn")

import ssl_vit
from benchmarks import bench_quality  # noqa: E402


def test_quick_run_gives_finite_rows_and_distinct_baselines(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_VIT_CACHE", str(tmp_path / "cache"))
    args = bench_quality.parse_args(["--quick", "--objectives", "mae", "--datasets", "digits",
                                     "--out", str(tmp_path / "out")])
    assert args.budget == 10 and not args.peers
    rows = bench_quality.run(args)

    methods = [r.method for r in rows]
    assert methods == ["raw pixels", "random init (vit_tiny)", "mae"]
    for r in rows:
        assert r.dataset == "digits"
        for value in (r.probe, r.knn, r.patch_knn):
            assert math.isfinite(value) and 0 <= value <= 100
    raw, rand, mae = rows
    # the two baselines are different read-outs, not one computed twice
    assert (raw.probe, raw.knn) != (rand.probe, rand.knn)
    assert mae.steps >= 1 and mae.images_per_s > 0 and mae.verdict in ("PASS", "MISS")
    assert mae.baseline == {"probe": rand.probe, "knn": rand.knn, "rank": rand.rank}
    width = ssl_vit.create_backbone(bench_quality.QUICK_BACKBONE).embed_dim
    for r in rows:  # effective rank of the held-out features: between 1 and the feature width (raw pixels: 3 x 32 x 32)
        assert 1.0 <= r.rank <= (3 * 32 * 32 if r is raw else width)
    assert rand.rank != mae.rank
    probe_ratio, knn_ratio = mae.ratios()
    assert math.isfinite(probe_ratio) and math.isfinite(knn_ratio)

    assert len({raw.patch_knn, rand.patch_knn}) == 2  # pixels and tokens, not one read-out twice
    table = bench_quality.format_table(rows)
    assert "raw pixels" in table and "random init" in table and ("PASS" in table or "MISS" in table)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == methods


def test_patch_knn_reads_what_the_patches_carry():
    """Patch tokens that carry the label (in every 4x4 patch the pixel at position `label` is bright, plus
    noise) are read at ~100 %; patch tokens of noise images at about chance (10 classes)."""
    import torch

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(30)
    carry = torch.randint(0, 8, (300, 3, 32, 32), generator=g)
    cells = carry.view(300, 3, 8, 4, 8, 4)  # (image, channel, cell row, row in cell, cell column, column in cell)
    cells[torch.arange(300), :, :, labels // 4, :, labels % 4] = 255
    pure_noise = torch.randint(0, 256, (300, 3, 32, 32), generator=g)
    norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    tokens = bench_quality.pixel_patches(4)
    for images, low, high in ((carry, 99.0, 100.0), (pure_noise, 0.0, 25.0)):
        images = images.to(torch.uint8)
        split = bench_quality.Split(images[:200], labels[:200], images[200:], labels[200:])
        assert low <= bench_quality.patch_knn(tokens, split, *norm) <= high


def test_backbone_args_are_parsed_and_reach_the_pretrain_command(tmp_path, capsys):
    args = bench_quality.parse_args(["--backbone-arg", "pos_init_std=1", "--backbone-arg", "num_registers=2"])
    assert args.backbone_args == {"pos_init_std": 1, "num_registers": 2}
    cmd = bench_quality.pretrain_command("dino", "shards", 3, tmp_path, bench_quality.BACKBONE,
                                         {**bench_quality.BACKBONE_ARGS, **args.backbone_args}, 1)
    assert "backbone_args.pos_init_std=1" in cmd and "backbone_args.num_registers=2" in cmd
    with pytest.raises(SystemExit) as exit_info:
        bench_quality.parse_args(["--backbone-arg", "pos_init_std"])
    assert exit_info.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a value that is not YAML: one line, not a traceback
        bench_quality.parse_args(["--backbone-arg", "pos_init_std=["])
    assert exit_info.value.code == 2 and "not valid YAML" in capsys.readouterr().err


def test_settings_reach_the_pretrain_command_after_the_bench_defaults(tmp_path, capsys):
    args = bench_quality.parse_args(["--set", "optim.lr=2.5e-4", "--set", "objective_args.num_local_crops=2"])
    cmd = bench_quality.pretrain_command("dino", "shards", 3, tmp_path, bench_quality.BACKBONE,
                                         bench_quality.BACKBONE_ARGS, 1, args.settings)
    sets = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--set"]
    assert sets[-2:] == ["optim.lr=2.5e-4", "objective_args.num_local_crops=2"]  # last wins over profile=demo
    assert sets.index("profile=demo") < sets.index("optim.lr=2.5e-4")
    with pytest.raises(SystemExit) as exit_info:
        bench_quality.parse_args(["--set", "optim.lr"])
    assert exit_info.value.code == 2 and "--set wants KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("batch", [32, 128])
def test_step_times_use_the_runs_own_batch(tmp_path, batch):
    # a `--set data.batch_size=128` run at 32 images/s takes 4 s a step: the budget's step count depends on it
    (tmp_path / "config.yaml").write_text(f"data:\n  batch_size: {batch}\n")
    records = [{"step": 2, "train/images_per_s": 32.0}, {"step": 4, "train/images_per_s": 16.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench_quality.step_times(tmp_path) == pytest.approx([batch / 32] * 2 + [batch / 16] * 2)
