"""The two registries: backbones and objectives, by snake-case name (timm's `create_model` style).

Plugins register themselves on import. The registries import the plugin packages lazily by module
name (`backbones`, `objectives`, and any `ssl_vit.plugins` entry point), so the core never imports
its siblings statically and third-party packages can add models the same way.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Any

from torch import nn

from .errors import BadArgument, UnknownNameError, closest

_DEFAULT_PLUGINS = ("backbones", "objectives")


class Registry:
    """name -> factory. `create(name, **overrides)` builds; unknown names list the closest ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}
        self._prefixes: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, factory: Callable[..., Any] | None = None):
        """Register `factory` under `name`; usable as a decorator. Re-registering replaces."""
        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._factories[name] = fn
            return fn
        return add if factory is None else add(factory)

    def register_prefix(self, prefix: str, factory: Callable[..., Any]) -> None:
        """Names `prefix:<anything>` go to `factory(<anything>, **overrides)` (e.g. `timm:`)."""
        self._prefixes[prefix] = factory

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., Any]:
        if not isinstance(name, str):
            raise BadArgument(f"a {self.kind} name must be a string, got {type(name).__name__} {name!r:.40}; "
                              f"ssl_vit.list_{self.kind}s() lists them")
        load_plugins()
        if name in self._factories:
            return self._factories[name]
        head, sep, rest = name.partition(":")
        if sep and head in self._prefixes:
            return lambda **kw: self._prefixes[head](rest, **kw)
        hint = closest(name, self._factories)
        raise UnknownNameError(
            f"unknown {self.kind} '{name}'"
            + (f"; did you mean: {', '.join(hint)}?" if hint else "")
            + f" (ssl_vit.list_{self.kind}s() lists all {len(self._factories)})"
        )

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._factories


BACKBONES = Registry("backbone")
OBJECTIVES = Registry("objective")
_loaded = False


def load_plugins() -> None:
    """Import the default plugin packages and `ssl_vit.plugins` entry points, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _DEFAULT_PLUGINS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # the package exists but something inside it is missing
                raise
    for ep in importlib.metadata.entry_points(group="ssl_vit.plugins"):
        ep.load()


def register_backbone(name: str, factory: Callable[..., nn.Module] | None = None):
    """Register a backbone factory (a class or function taking keyword overrides)."""
    return BACKBONES.register(name, factory)


def register_objective(name: str, factory: Callable[..., nn.Module] | None = None):
    """Register an objective class: `factory(backbone, **overrides)`."""
    return OBJECTIVES.register(name, factory)


def list_backbones(pattern: str = "") -> list[str]:
    """Registered backbone names containing `pattern`."""
    return [n for n in BACKBONES.names() if pattern in n]


def list_objectives() -> list[str]:
    return OBJECTIVES.names()


def create_backbone(name: str, **overrides: Any) -> nn.Module:
    """Build a registered backbone. Registry backbones default to `num_classes=0` (features).

    The name and overrides are kept on the model as `registry_name` / `registry_overrides`, which
    is all `load_backbone` needs to rebuild it.
    """
    factory = BACKBONES.get(name)
    model = factory(**overrides)
    model.registry_name = name
    model.registry_overrides = dict(overrides)
    return model


def create_objective(name: str, backbone: nn.Module | str, **overrides: Any) -> nn.Module:
    """Build a registered objective over a backbone (a module or a registry name)."""
    factory = OBJECTIVES.get(name)
    if isinstance(backbone, str):
        backbone = create_backbone(backbone)
    objective = factory(backbone, **overrides)
    objective.registry_name = name
    return objective


def _kind(value: Any) -> str | None:
    """The coarse kind of a preset value that an override must share (None: anything goes)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "sequence"
    return None


# An override of a number may be a sequence and the other way round (image_size=32 or (32, 48)).
_FITS = {"bool": {"bool"}, "number": {"number", "sequence"}, "sequence": {"number", "sequence"}, "str": {"str"}}


def check_overrides(name: str, preset: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Raise BadArgument when an override's kind differs from the preset value it replaces
    (a string for a number, a number for a flag ...). None is left to the constructor."""
    for key, value in overrides.items():
        want = _kind(preset.get(key))
        if want is None or value is None or _kind(value) in _FITS[want]:
            continue
        raise BadArgument(
            f"{name}: argument {key}={value!r} ({type(value).__name__}) does not fit the preset's {key}="
            f"{preset[key]!r} ({type(preset[key]).__name__}); pass a value of that kind"
        )


def register_presets(cls: Callable[..., nn.Module], presets: dict[str, dict[str, Any]]) -> None:
    """Register one factory per preset: `create_backbone(name, **overrides)` builds
    `cls(**{"num_classes": 0, **preset, **overrides})`; overrides must match the preset's value kinds."""
    for name, preset in presets.items():
        def factory(_preset: dict[str, Any] = preset, _name: str = name, **overrides: Any) -> nn.Module:
            check_overrides(_name, _preset, overrides)
            return cls(**{"num_classes": 0, **_preset, **overrides})
        factory.__name__ = name
        factory.preset = dict(preset)
        factory.backbone_class = cls
        BACKBONES.register(name, factory)
