"""benchmarks/gpu.py --tiny: every code path of the GPU table runs on the CPU and prints finite numbers."""

from __future__ import annotations

import math

from benchmarks import gpu


def parse_table(text: str) -> list[dict[str, str]]:
    """The last markdown table in `text` as a list of {header: cell}."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| workload |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_tiny_run_prints_every_row_with_finite_numbers(capsys):
    returned = gpu.main(["--tiny", "--no-peers", "--steps", "1", "--warmup", "0"])
    rows = parse_table(capsys.readouterr().out)
    modes = [m for m in gpu.MODES]
    expected = [(w, m) for w in gpu.TINY.labels for m in modes]
    assert [(r["workload"], r["mode"]) for r in rows[:len(expected)]] == expected
    assert [r["workload"] for r in rows[len(expected):]] == ["data: decode", "data: decode + DINO views"]
    assert len(rows) == len(returned) and not any("error" in r for r in returned)
    for row in rows:
        numeric = ["img/s", "step ms"] if row["workload"].startswith("data") else \
            ["img/s", "step ms", "TFLOP/s", "MFU %", "peak mem GB"]
        for key in numeric:
            value = float(row[key])
            assert math.isfinite(value) and value > 0 or key == "MFU %" and value == 0.0, (row, key)
    for r in returned:
        if "mfu" in r:
            assert 0 < r["mfu"] < 100 and r["tflops"] > 0 and r["mem_gb"] > 0
