"""The launcher's errors: bad input (exit status 2) and a diverged run (exit status 3), each one clear line."""

from __future__ import annotations

from ssl_vit.errors import SslVitError


class LaunchError(SslVitError):
    """Bad command-line input, config or data; `pretrain.py` prints it on one line and exits with 2."""

    exit_code = 2


class DivergedError(LaunchError):
    """The run stopped because it diverged (non-finite losses, gradients or weights); exit status 3.
    Nothing non-finite was written: the last good checkpoint is intact."""

    exit_code = 3
