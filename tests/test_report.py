"""`python -m launch.report RUN`: one self-contained HTML page of a tiny MAE run, checked for content."""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RUN_NAME = 'run_<i>&"x"'  # a folder name that must come out escaped in the config and the title


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    """A 4-step MAE run, a probe results.json and a UMAP picture next to it, and its report."""
    tmp = tmp_path_factory.mktemp("report")
    run = tmp / RUN_NAME
    _run([str(ROOT / "pretrain.py"), "--objective", "mae", "--backbone", "vit", "--steps", "4",
          "--set", "data.batch_size=4", "--set", "data.num_workers=0", "--set", "train.val_batches=0",
          "--set", "train.log_every=1", "--set", f"data.cache={tmp / 'cache'}", "--out", str(run)], tmp)
    results = {"backbone": "<script>alert(1)</script>", "random_init": False, "features": "pooled",
               "train_samples": 100, "val_samples": 50, "num_classes": 10,
               "knn": {"k": 20, "temperature": 0.07, "top1": 81.25, "top5": 97.5},
               "linear": [{"lr": 0.01, "top1": 77.5, "top5": 96.0}, {"lr": 0.1, "top1": 88.75, "top5": 99.0}],
               "best": {"lr": 0.1, "top1": 88.75, "top5": 99.0}}
    (run / "export" / "results.json").write_text(json.dumps(results))
    (run / "embeddings").mkdir()
    umap = np.full((120, 160, 3), 255, np.uint8)
    umap[20:100, 30:130] = np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)
    Image.fromarray(umap).save(run / "embeddings" / "umap.png")
    out = tmp / "out" / "report.html"
    proc = _run(["-m", "launch.report", str(run), "--out", str(out), "--cache", str(tmp / "cache"), "--images", "3"],
                tmp)
    assert str(out) in proc.stdout
    return run, out.read_text(encoding="utf-8")


def test_every_section_is_there(report):
    from launch.report import SECTIONS

    _, page = report
    assert page.startswith("<!DOCTYPE html>")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    for heading in ("Resolved config", "Training curves", "Probe and k-NN results", "Attention maps",
                    "Reconstructions", "Embeddings (UMAP)"):
        assert f"<h2>{heading}</h2>" in page
    assert "objective: mae" in page and "norm_pix_loss" in page  # the resolved config of the checkpoint
    assert "88.75" in page and "81.25" in page  # best linear and k-NN top-1
    assert 'class="note"' not in page  # every section has its content, none says it is missing


def test_every_picture_is_an_embedded_png_with_content(report):
    _, page = report
    sources = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)
    assert len(sources) == 4  # curves, attention, reconstruction, UMAP
    assert len(re.findall(r"<img\b", page)) == len(sources)
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:60]
        try:
            raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        except binascii.Error as err:
            pytest.fail(f"not base64: {err}")
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(raw)) as img:
            assert img.format == "PNG"
            pixels = np.asarray(img.convert("L"), dtype=np.float32)
        assert img.width > 100 and img.height > 100
        assert pixels.std() > 10, "a blank picture"
        assert (pixels < 250).mean() > 0.02, "a mostly white picture"


def test_no_network_and_no_scripts(report):
    _, page = report
    assert not re.search(r"https?://", page)
    assert not re.search(r"<script|<link\b|@import|\burl\(|<iframe|<object|<embed", page, re.IGNORECASE)
    references = re.findall(r"\b(?:src|href|action|poster)\s*=\s*[\"']?([^\"' >]*)", page, re.IGNORECASE)
    assert references and all(r.startswith("data:image/png;base64,") for r in references)


def test_values_are_escaped(report):
    _, page = report
    assert "<i>" not in page and "alert(1)</script>" not in page
    assert "&lt;i&gt;&amp;" in page  # the run folder's name, in the config's `out:` and in the title
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # a value of results.json


def test_bad_input_is_one_line(report, tmp_path):
    run, _ = report
    for args in ([str(tmp_path / "missing")], [str(tmp_path)], [str(run), "--probe", str(tmp_path / "no.json")]):
        proc = _run(["-m", "launch.report", *args], tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("report: error:"), proc.stderr
    assert not (tmp_path / "report.html").exists()
