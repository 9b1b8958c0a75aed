"""Every architecture of the collection, built from the shared layers in ssl_vit and registered.

One file per family; each registers its presets on import and lists its public classes in
`__all__`, which this package re-exports: `from backbones import ViT, SimpleViT, CvT, ...`.
"""

from __future__ import annotations

from ssl_vit.plugins import import_submodules

__all__ = import_submodules(__name__, __path__, globals())
