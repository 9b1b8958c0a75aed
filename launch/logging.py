"""Run logging on the main process: a tqdm bar, TensorBoard scalars and `metrics.jsonl`.

Other processes get a `RunLogger(enabled=False)` whose methods do nothing, so the loop calls the
same methods everywhere and only rank 0 writes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tqdm.auto import tqdm


class RunLogger:
    """Progress bar (step, loss, lr, images/s, data-wait share), TensorBoard and JSONL metrics."""

    def __init__(self, out_dir: str | Path, *, total: int, initial: int = 0, enabled: bool = True,
                 tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        self._bar_args = dict(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True,
                              file=sys.stderr, mininterval=1.0)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception as err:  # TensorBoard missing or broken: JSONL still has every scalar
                print(f"TensorBoard logging off: {err}", file=sys.stderr)

    def start(self) -> None:
        """Open the progress bar (after the start-up summary is printed)."""
        if self.enabled and self.bar is None:
            self.bar = tqdm(**self._bar_args)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def progress(self, step: int, postfix: Mapping[str, str]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(postfix, refresh=False)

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{f"{prefix}/{k}": float(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
