"""Linear probe and k-NN of an exported backbone: `accelerate launch linear_probe.py --weights OUT_DIR`.

See launch/probe.py; `--help` lists the options.
"""

from __future__ import annotations

import sys

from launch.probe import main

if __name__ == "__main__":
    sys.exit(main())
