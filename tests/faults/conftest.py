"""Fixtures of the fault-injection suite (helpers: tests/faults/common.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """One embedded-digits shard cache for the whole suite."""
    return tmp_path_factory.mktemp("digits-cache")
