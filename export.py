"""Export a run's backbone: `python export.py RUN_OR_CHECKPOINT OUT_DIR [--which ...] [--format native|timm]`.

A thin entry point: everything lives in launch/export_run.py (`--help` lists the options).
"""

from __future__ import annotations

import sys

from launch.export_run import main

if __name__ == "__main__":
    sys.exit(main())
