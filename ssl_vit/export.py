"""The export format, written and read here only: a folder with `backbone.safetensors` and `backbone.json`.

`backbone.json` says how to rebuild the module (its registry name and overrides, or its class name
and recorded constructor arguments), which objective trained it, at which step, and the resolved
config. Weights are safetensors, never pickle.

`format="timm"` writes ViT / SimpleViT weights in timm's `VisionTransformer` key layout (one
`pos_embed` table holding class-token and patch positions; blocks are already named like timm's),
so `timm.create_model(meta["timm"]["model"], num_classes=0, **meta["timm"]["kwargs"])` loads them
with `strict=True`. `load_backbone` reads both layouts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import Backbone
from .errors import IncompatibleBackbone, UnknownNameError
from .registry import create_backbone, load_plugins

__all__ = ["WEIGHTS_FILE", "META_FILE", "save_backbone", "load_backbone", "read_meta", "backbone_spec",
           "timm_counterpart", "to_timm_state_dict", "from_timm_state_dict"]

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
    name = getattr(module, "registry_name", None)
    if name is not None:
        return {"registry_name": name,
                "overrides": _jsonable(getattr(module, "registry_overrides", {}), "overrides")}
    config = getattr(module, "init_config", None)
    if config is None or not isinstance(module, Backbone):
        raise ValueError(
            f"cannot export a {type(module).__name__}: only ssl_vit.Backbone subclasses (which record their "
            "constructor arguments) or models from ssl_vit.create_backbone can be rebuilt"
        )
    return {"class_name": type(module).__name__, "init_config": _jsonable(config, "init_config")}


# ---- timm layout ------------------------------------------------------------------------------

# timm names whose shapes our presets share: (embed_dim, depth, heads) at patch 16, 224 px.
_TIMM_NAMES = {
    (192, 12, 3): "vit_tiny_patch16_224",
    (384, 12, 6): "vit_small_patch16_224",
    (768, 12, 12): "vit_base_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
}
_TIMM_DEFAULTS = dict(img_size=224, patch_size=16, in_chans=3, mlp_ratio=4.0, qkv_bias=True, qk_norm=False,
                      init_values=None, class_token=True, global_pool="token")


def timm_counterpart(module: nn.Module) -> tuple[str, dict[str, Any]]:
    """The timm model `(name, kwargs)` that `to_timm_state_dict(module)` loads into strictly.

    Raises IncompatibleBackbone for every backbone but plain ViT and SimpleViT (timm's
    VisionTransformer needs one head width `dim / heads` and a stack of standard blocks).
    """
    cls = type(module).__name__
    cfg = getattr(module, "init_config", None)
    if cls not in ("ViT", "SimpleViT") or cfg is None:
        raise IncompatibleBackbone(
            f"{cls} has no timm counterpart: --format timm covers ViT and SimpleViT only; export it in the "
            "native format and load it with ssl_vit.load_backbone"
        )
    if cfg.get("transformer") is not None:
        raise IncompatibleBackbone("a ViT with a custom `transformer` module has no timm counterpart")
    dim, depth, heads = cfg["dim"], cfg["depth"], cfg["heads"]
    dim_head = cfg.get("dim_head", 64)
    if heads * dim_head != dim:
        raise IncompatibleBackbone(
            f"{cls} with heads * dim_head = {heads} * {dim_head} != dim = {dim} has no timm counterpart "
            "(timm's attention width is the model width)"
        )
    patch = tuple(module.mask_unit)
    size = tuple(module.default_size)
    mean_pool = getattr(module, "pool", "cls") == "mean"
    want = dict(
        img_size=size[0] if size[0] == size[1] else list(size),
        patch_size=patch[0] if patch[0] == patch[1] else list(patch),
        in_chans=module.in_channels,
        mlp_ratio=cfg["mlp_dim"] / dim,
        qkv_bias=bool(cfg.get("qkv_bias", False)),
        qk_norm=bool(cfg.get("qk_norm", False)),
        init_values=cfg.get("layer_scale"),
        class_token=module.cls_token is not None,
        global_pool="avg" if mean_pool else "token",
    )
    name = _TIMM_NAMES.get((dim, depth, heads))
    kwargs = {k: v for k, v in want.items() if v != _TIMM_DEFAULTS[k]}
    if name is None:  # any other shape: the generic VisionTransformer under a base name, all set by kwargs
        name = "vit_base_patch16_224"
        kwargs.update(embed_dim=dim, depth=depth, num_heads=heads)
    if mean_pool:
        kwargs["fc_norm"] = False  # our norm runs on the tokens before pooling, as timm's final norm does
    return name, kwargs


def _grid(module: nn.Module) -> tuple[int, int]:
    return tuple(s // p for s, p in zip(module.default_size, module.mask_unit))


def to_timm_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Our ViT / SimpleViT state dict in timm's key layout (the mask token, which timm lacks, is left out)."""
    timm_counterpart(module)  # raises for anything else
    out: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        if key in ("mask_token", "prefix_pos", "pos_embed.weight"):
            continue
        if key.startswith("transformer.blocks."):
            key = key.removeprefix("transformer.")
        elif not key.startswith(("patch_embed.", "norm.", "head.", "cls_token")):
            raise IncompatibleBackbone(f"parameter '{key}' has no place in timm's VisionTransformer")
        out[key] = value
    if module.prefix_pos is not None:  # learned: class-token positions first, as in timm's one table
        out["pos_embed"] = torch.cat([module.prefix_pos, module.pos_embed.weight], dim=1).detach()
    elif hasattr(module.pos_embed, "weight"):
        out["pos_embed"] = module.pos_embed.weight.detach()
    else:  # sin-cos: timm keeps the computed table as a (learnable) parameter
        out["pos_embed"] = module.pos_embed(_grid(module), dtype=module.mask_token.dtype)
    return out


def from_timm_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `to_timm_state_dict` for `module`'s architecture (missing mask token: `module`'s own)."""
    own = module.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "pos_embed":
            if "pos_embed.weight" in own:
                r = own["prefix_pos"].shape[1] if "prefix_pos" in own else 0
                if r:
                    out["prefix_pos"] = value[:, :r]
                out["pos_embed.weight"] = value[:, r:]
            continue  # sin-cos positions are computed, not loaded
        out["transformer." + key if key.startswith("blocks.") else key] = value
    if "mask_token" in own and "mask_token" not in out:
        out["mask_token"] = own["mask_token"]
    return out


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
    config is given). `format="timm"` uses timm's key layout (ViT / SimpleViT only). Files are
    written under temporary names and renamed, so a reader never sees half a file. Returns out_dir.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    module = getattr(module, "module", module)  # unwrap DDP / accelerate wrappers
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "format": format, **backbone_spec(module),
                            "class": type(module).__name__, "objective": objective, "step": step}
    for attr in ("embed_dim", "default_size", "in_channels", "num_prefix_tokens"):
        if hasattr(module, attr):
            meta[attr] = _jsonable(getattr(module, attr), attr)
    if format == "timm":
        name, kwargs = timm_counterpart(module)
        meta["timm"] = {"model": name, "kwargs": kwargs}
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
    out.mkdir(parents=True, exist_ok=True)
    tmp_weights, tmp_meta = out / f".{WEIGHTS_FILE}.tmp", out / f".{META_FILE}.tmp"
    save_file(tensors, str(tmp_weights), metadata={"format": "pt", "layout": format})
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    os.replace(tmp_weights, out / WEIGHTS_FILE)
    os.replace(tmp_meta, out / META_FILE)
    if config is not None:
        (out / "config.yaml").write_text(yaml.safe_dump(meta["config"], sort_keys=False))
    return out


def read_meta(export_dir: str | os.PathLike) -> dict[str, Any]:
    """backbone.json of an export folder, with a clear error when the folder is not an export."""
    d = Path(export_dir)
    for f in (META_FILE, WEIGHTS_FILE):
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d} is not a backbone export: {f} is missing (make one with export.py)")
    try:
        meta = json.loads((d / META_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{d / META_FILE} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or not (meta.get("registry_name") or meta.get("class_name") or meta.get("class")):
        raise ValueError(f"{d / META_FILE} names neither a registry_name nor a class_name to rebuild")
    return meta


def build_from_meta(meta: dict[str, Any]) -> nn.Module:
    """A freshly initialised backbone with the architecture `meta` describes."""
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

    Outputs equal those of the backbone that was exported (same architecture, same tensors).
    """
    meta = read_meta(export_dir)
    model = build_from_meta(meta)
    state = load_file(str(Path(export_dir) / WEIGHTS_FILE), device=str(device))
    if meta.get("format") == "timm":
        state = from_timm_state_dict(model, state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{export_dir}: weights do not fit the architecture in {META_FILE}: {err}") from None
    if strict and (missing or unexpected):
        raise ValueError(
            f"{export_dir}: weights do not fit the {type(model).__name__} described in {META_FILE} "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})"
        )
    model.to(device).eval()
    model.export_meta = meta
    return model

