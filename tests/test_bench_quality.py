"""The learning-quality benchmark's core, end to end at smoke-test size: `--quick` (vit_tiny, a ~10 s
budget, a subset of the digits), one objective, no peers."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("sklearn")

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
        for value in (r.probe, r.knn):
            assert math.isfinite(value) and 0 <= value <= 100
    raw, rand, mae = rows
    # the two baselines are different read-outs, not one computed twice
    assert (raw.probe, raw.knn) != (rand.probe, rand.knn)
    assert mae.steps >= 1 and mae.images_per_s > 0 and mae.verdict in ("PASS", "MISS")
    assert mae.baseline == {"probe": rand.probe, "knn": rand.knn}
    probe_ratio, knn_ratio = mae.ratios()
    assert math.isfinite(probe_ratio) and math.isfinite(knn_ratio)

    table = bench_quality.format_table(rows)
    assert "raw pixels" in table and "random init" in table and ("PASS" in table or "MISS" in table)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == methods
