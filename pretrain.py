"""Pretrain a backbone with a self-supervised objective.

    accelerate launch pretrain.py --objective dino --backbone cvt     # the demo on the embedded digits
    python pretrain.py --help                                         # options, objectives, backbones

A thin entry point: everything lives in launch/ (launch.cli.main).
"""

from __future__ import annotations

import sys

from launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
