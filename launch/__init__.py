"""The launcher: the Accelerate pretraining loop, WebDataset streaming, Kornia views on the
accelerator, checkpoints, logging and the `pretrain.py` command.

`python pretrain.py --help` (or `accelerate launch pretrain.py ...`) is the entry point; the pieces
here are importable on their own (`launch.data.ShardStream`, `launch.export_backbone.export_backbone`).
"""

from __future__ import annotations

from .errors import LaunchError

__all__ = ["LaunchError"]
