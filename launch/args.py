"""The command lines' argument parser: a usage error is one line (`LaunchError`, exit status 2), not
argparse's usage block."""

from __future__ import annotations

import argparse

from .errors import LaunchError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with `error` raising LaunchError("<message> (<prog> --help)")."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise LaunchError(f"{message} ({self.prog} --help)")
