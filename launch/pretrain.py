"""`python -m launch.pretrain`: same as pretrain.py (the `ssl-vit-pretrain` console script is launch.cli:run)."""

from __future__ import annotations

from .cli import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    run()
