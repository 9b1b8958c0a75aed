"""Pretrain a backbone with a self-supervised objective.

    accelerate launch pretrain.py --objective dino --backbone cvt     # the demo on the embedded digits
    python pretrain.py --help                                         # options, objectives, backbones

A thin entry point: everything lives in launch/ (launch.cli.main; launch.cli.run ends the process).
"""

from __future__ import annotations

from launch.cli import run

if __name__ == "__main__":
    run()
