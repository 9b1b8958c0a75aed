"""The `ssl-vit-pretrain` console script (pyproject) and `python -m launch.pretrain`: same as pretrain.py."""

from __future__ import annotations

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
