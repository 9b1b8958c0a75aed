"""The export format, written and read here only: a folder with `backbone.safetensors`, `backbone.json`
and `checksums.json`.

`backbone.json` says how to rebuild the module (its registry name and overrides, or its class name
and recorded constructor arguments), which objective trained it, at which step, and the resolved
config. Weights are safetensors, never pickle. `checksums.json` (ssl_vit.files) holds the sha256 of
every file; it is written last and checked before anything is read.

`format="timm"` writes the weights in timm's `VisionTransformer` key layout, for families that
declare one (`Backbone.timm_counterpart`: ViT, SimpleViT, timm: models), so
`timm.create_model(meta["timm"]["model"], num_classes=0, **meta["timm"]["kwargs"])` loads them
with `strict=True`. `load_backbone` reads both layouts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import Backbone
from .errors import (
    CorruptCheckpoint,
    ExportNotFound,
    IncompatibleBackbone,
    MalformedExport,
    OverwriteRefused,
    UnknownNameError,
    WeightsMismatch,
)
from .files import MANIFEST, atomic_dir, verify_manifest, write_manifest
from .registry import create_backbone, load_plugins

__all__ = ["WEIGHTS_FILE", "META_FILE", "save_backbone", "load_backbone", "read_meta", "build_from_meta",
           "check_meta", "backbone_spec", "timm_counterpart", "to_timm_state_dict", "from_timm_state_dict"]

WEIGHTS_FILE = "backbone.safetensors"
META_FILE = "backbone.json"
FORMAT_VERSION = 1
FORMATS = ("native", "timm")


def _jsonable(value: Any, where: str) -> Any:
    """Tuples to lists, and a clear error for anything JSON cannot hold (e.g. a module argument)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    raise ValueError(
        f"cannot export: constructor argument {where} is a {type(value).__name__}, which backbone.json cannot "
        "record; build the backbone from plain arguments (or a registry name) to export it"
    )


def backbone_spec(module: nn.Module) -> dict[str, Any]:
    """How to rebuild `module`: {"registry_name", "overrides"} for registry models (made by
    `create_backbone`), else {"class_name", "init_config"} from the recorded constructor arguments."""
    if not isinstance(module, Backbone):
        raise ValueError(
            f"cannot export a {type(module).__name__}: only ssl_vit.Backbone subclasses (which record their "
            "constructor arguments) or models from ssl_vit.create_backbone can be rebuilt"
        )
    if module.registry_name is not None:
        return {"registry_name": module.registry_name,
                "overrides": _jsonable(module.registry_overrides, "overrides")}
    return {"class_name": type(module).__name__, "init_config": _jsonable(module.init_config, "init_config")}


# ---- timm layout: declared by each family (Backbone.timm_counterpart and friends) -------------------

def _backbone(module: nn.Module) -> Backbone:
    if not isinstance(module, Backbone):
        raise IncompatibleBackbone(f"{type(module).__name__} is not an ssl_vit.Backbone and has no timm counterpart")
    return module


def timm_counterpart(module: nn.Module) -> tuple[str, dict[str, Any]]:
    """The timm model `(name, kwargs)` that `to_timm_state_dict(module)` loads into strictly
    (`module.timm_counterpart()`); IncompatibleBackbone for families without timm's layout."""
    return _backbone(module).timm_counterpart()


def to_timm_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict in timm's `VisionTransformer` key layout (`module.timm_state_dict()`)."""
    return _backbone(module).timm_state_dict()


def from_timm_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `to_timm_state_dict` for `module`'s architecture (`module.state_dict_from_timm(state)`)."""
    return _backbone(module).state_dict_from_timm(state)


# ---- writing and reading ------------------------------------------------------------------------

def save_backbone(
    module: nn.Module,
    out_dir: str | os.PathLike,
    *,
    objective: str | None = None,
    step: int | None = None,
    config: dict[str, Any] | None = None,
    format: str = "native",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `module` to `out_dir` as backbone.safetensors + backbone.json (+ config.yaml when a
    config is given) + checksums.json (sha256 of each file, written last). `format="timm"` uses
    timm's key layout (families that declare it). The folder is written under a temporary name and
    renamed, so an existing export is replaced whole or not at all. Returns out_dir.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    module = getattr(module, "module", module)  # unwrap DDP / accelerate wrappers
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "format": format, **backbone_spec(module),
                            "class": type(module).__name__, "objective": objective, "step": step}
    meta.update(embed_dim=module.embed_dim, default_size=list(module.default_size), in_channels=module.in_channels,
                num_prefix_tokens=module.num_prefix_tokens)
    if format == "timm":
        name, kwargs = timm_counterpart(module)
        meta["timm"] = {"model": name, "kwargs": _jsonable(kwargs, "timm kwargs")}
        state = to_timm_state_dict(module)
    else:
        state = module.state_dict()
    if extra:
        meta.update(_jsonable(extra, "extra"))
    if config is not None:
        meta["config"] = _jsonable(config, "config")
    # safetensors wants contiguous tensors that share no storage (tied weights would otherwise fail)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not ((out / META_FILE).is_file() or (out / MANIFEST).is_file()):
        raise OverwriteRefused(
            f"{out} exists and is not a backbone export; it would be replaced whole: choose a new or empty folder"
        )
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "layout": format})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        if config is not None:
            (tmp / "config.yaml").write_text(yaml.safe_dump(meta["config"], sort_keys=False), encoding="utf-8")
        write_manifest(tmp)
    return out


# Fields of backbone.json that are read back, and the types they must have (None is allowed for each).
_META_TYPES: dict[str, tuple[type, ...]] = {
    "registry_name": (str,), "overrides": (dict,), "class_name": (str,), "class": (str,),
    "init_config": (dict,), "format": (str,), "objective": (str,), "step": (int,), "timm": (dict,),
    "format_version": (int,),
}


def check_meta(meta: Any, where: str = META_FILE) -> dict[str, Any]:
    """`meta` if it is a backbone.json mapping with fields of the right types, else MalformedExport."""
    if not isinstance(meta, dict):
        raise MalformedExport(f"{where} must hold a JSON object, got {type(meta).__name__}")
    for key, types in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise MalformedExport(
                f"{where}: field {key!r} must be {' or '.join(t.__name__ for t in types)}, got "
                f"{type(value).__name__} {value!r:.60}; re-export the backbone"
            )
    if not (meta.get("registry_name") or meta.get("class_name") or meta.get("class")):
        raise MalformedExport(f"{where} names neither a registry_name nor a class_name to rebuild")
    if meta.get("format", "native") not in FORMATS:
        raise MalformedExport(f"{where}: unknown format {meta['format']!r} (known: {', '.join(FORMATS)})")
    if any(not isinstance(k, str) for k in (meta.get("overrides") or meta.get("init_config") or {})):
        raise MalformedExport(f"{where}: argument names must be strings")
    return meta


def read_meta(export_dir: str | os.PathLike) -> dict[str, Any]:
    """backbone.json of an export folder, after its files are checked against checksums.json.

    Raises ExportNotFound when the folder is not an export, CorruptCheckpoint when a file is missing,
    truncated or changed, MalformedExport when backbone.json is not what save_backbone writes.
    """
    d = Path(export_dir)
    for f in (META_FILE, WEIGHTS_FILE):
        if not (d / f).is_file():
            raise ExportNotFound(f"{d} is not a backbone export: {f} is missing (make one with export.py)")
    verify_manifest(d, what="export")
    try:
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MalformedExport(f"{d / META_FILE} is not valid JSON ({err}); re-export the backbone") from None
    return check_meta(meta, str(d / META_FILE))


def build_from_meta(meta: dict[str, Any]) -> nn.Module:
    """A freshly initialised backbone with the architecture `meta` describes.

    Names resolve through the backbone registry or the table of Backbone classes only; nothing from
    `meta` is imported or executed.
    """
    meta = check_meta(meta)
    if meta.get("registry_name"):
        return create_backbone(meta["registry_name"], **(meta.get("overrides") or {}))
    load_plugins()  # the class lives in a plugin package (backbones/...)
    name = meta.get("class_name") or meta.get("class")
    cls = Backbone._classes.get(name)
    if cls is None:
        raise UnknownNameError(f"backbone class '{name}' is not defined (is its plugin installed?)")
    return cls(**(meta.get("init_config") or {}))


def load_backbone(export_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
                  strict: bool = True) -> nn.Module:
    """Rebuild an exported backbone with its weights, in eval mode; `model.export_meta` holds backbone.json.

    Every file is checked against checksums.json first (CorruptCheckpoint names a bad one). Outputs
    equal those of the backbone that was exported (same architecture, same tensors).
    """
    meta = read_meta(export_dir)
    model = build_from_meta(meta)
    path = Path(export_dir) / WEIGHTS_FILE
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:  # the manifest matched, but the writer was broken
        raise CorruptCheckpoint(f"export {export_dir}: file {WEIGHTS_FILE} cannot be read ({err})") from None
    if meta.get("format") == "timm":
        state = from_timm_state_dict(model, state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise WeightsMismatch(
            f"{export_dir}: weights do not fit the architecture in {META_FILE}: {str(err).splitlines()[0]}"
        ) from None
    if strict and (missing or unexpected):
        raise WeightsMismatch(
            f"{export_dir}: weights do not fit the {type(model).__name__} described in {META_FILE} "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})"
        )
    model.to(device).eval()
    model.export_meta = meta
    return model
