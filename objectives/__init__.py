"""Pretraining objectives as pluggable strategies over the backbone interface.

One file per objective; each registers itself on import and lists its public classes in
`__all__`, which this package re-exports: `from objectives import MAE, SimMIM, Dino, ...`.
"""

from __future__ import annotations

from ssl_vit.plugins import import_submodules

__all__ = import_submodules(__name__, __path__, globals())
