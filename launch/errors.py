"""The launcher's error: bad input that ends the command with one clear line and exit status 2."""

from __future__ import annotations

from ssl_vit.errors import SslVitError


class LaunchError(SslVitError):
    """Bad command-line input, config or data; `pretrain.py` prints it on one line and exits with 2."""
