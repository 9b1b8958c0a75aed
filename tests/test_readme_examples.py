"""Every usage example of the seed README, with only its import lines changed, must run.

The examples live verbatim (indentation restored) in tests/readme_examples/*.py, one file per
README section. They run in a temporary folder (some save weights to ./) with `range` capped at
two iterations, so the README's 100- and 1000-step training loops run their body for real without
taking minutes; nothing else in them is touched. Lines `# expect: <python expression>` at the end of
an example are checks evaluated in the example's namespace afterwards.
"""

from __future__ import annotations

import builtins
import os
import runpy
from pathlib import Path

import pytest
import torch

EXAMPLES = sorted((Path(__file__).parent / "readme_examples").glob("*.py"))


def capped_range(*args):
    r = builtins.range(*args)
    return r[:2]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_readme_example_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    result = runpy.run_path(str(path), init_globals={"range": capped_range}, run_name="__readme__")
    assert result, "the example defined nothing"
    for line in path.read_text().splitlines():
        if line.startswith("# expect:"):
            expression = line.removeprefix("# expect:").strip()
            assert eval(expression, dict(result)), f"{path.name}: expected {expression}"
    saved = [f for f in os.listdir(tmp_path) if f.endswith(".pt")]
    for name in saved:  # weights the README saves must load back without pickle
        state = torch.load(tmp_path / name, weights_only=True)
        assert isinstance(state, dict) and state
