"""The YAML configuration files of `pretrain.py` (see launch/config.py for the merge order)."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent

__all__ = ["CONFIG_DIR"]
