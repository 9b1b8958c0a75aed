"""Import every module of a plugin package and lift its public names to the package.

`backbones/__init__.py` and `objectives/__init__.py` call this, so adding a model or an objective
is adding one file: it registers itself on import and its `__all__` becomes importable from the
package (`from backbones import CaiT`).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def import_submodules(package_name: str, package_path: list[str], namespace: dict[str, Any]) -> list[str]:
    """Import each non-private module of the package; returns the names lifted into `namespace`."""
    lifted: list[str] = []
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package_name}.{info.name}")
        for name in getattr(module, "__all__", ()):
            namespace[name] = getattr(module, name)
            lifted.append(name)
    return lifted
