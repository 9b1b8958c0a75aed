"""Configuration of a pretraining run: YAML files merged in a fixed order, validated against the defaults.

Order (later wins): `configs/defaults.yaml` < `configs/objectives/<objective>.yaml` <
`configs/backbones/<backbone>.yaml` < `configs/profiles/<profile>.yaml` < `--config FILE` <
`--set key=value`. Every key must exist in the defaults (the error names the closest keys), except
inside `backbone_args` / `objective_args`, which are constructor keyword arguments. Files are read
with `yaml.safe_load` only.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import LaunchError

# configs/ sits next to launch/ in a checkout and in an installed wheel alike (both are top-level
# packages); found by path so that another `configs` module on sys.path cannot shadow it.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

FREE_KEYS = ("backbone_args", "objective_args")  # dicts whose keys are constructor arguments
# YAML 1.1 (PyYAML) reads `1e-3` as a string; numbers in exponent form without a dot are made floats.
_EXP_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
        return float(value)
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file (safe_load); LaunchError on a missing, malformed or non-mapping file."""
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise LaunchError(f"config file {path} is not valid YAML{at}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LaunchError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return _numbers(data)


def _flat_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        keys.append(key)
        if isinstance(v, Mapping) and k not in FREE_KEYS:
            keys.extend(_flat_keys(v, key + "."))
    return keys


def check_keys(update: Mapping[str, Any], schema: Mapping[str, Any], source: str, prefix: str = "",
               root: Mapping[str, Any] | None = None) -> None:
    """Raise LaunchError for the first key of `update` that the defaults do not have."""
    root = schema if root is None else root
    for k, v in update.items():
        key = f"{prefix}{k}"
        if k not in schema:
            full = key
            while isinstance(v, Mapping) and v:  # name the whole dotted key the user wrote
                k2, v = next(iter(v.items()))
                full = f"{full}.{k2}"
            known = _flat_keys(root)
            hint = difflib.get_close_matches(full, known, n=3, cutoff=0.5) or [
                s for s in known if str(k) in s][:3]
            raise LaunchError(f"unknown config key '{full}' in {source}"
                              + (f"; closest: {', '.join(hint)}" if hint else "")
                              + " (configs/defaults.yaml lists every key)")
        if isinstance(schema[k], Mapping) and k not in FREE_KEYS:
            if not isinstance(v, Mapping):
                raise LaunchError(f"config key '{key}' in {source} must be a mapping, got {v!r}")
            check_keys(v, schema[k], source, key + ".", root)
        elif k in FREE_KEYS and v is not None and not isinstance(v, Mapping):
            raise LaunchError(f"config key '{key}' in {source} must be a mapping of keyword arguments, got {v!r}")


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, everything else replaces."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """`["optim.lr=1e-3", "data.mean=[0.5,0.5,0.5]"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise LaunchError(f"--set expects key=value, got '{item}'")
        try:
            value = _numbers(yaml.safe_load(raw)) if raw.strip() else None
        except yaml.YAMLError:
            raise LaunchError(f"--set {key}: the value '{raw}' is not valid YAML") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LaunchError(f"--set {key}: '{part}' was already given a value")
        node[parts[-1]] = value
    return tree


def preset_file(kind: str, name: str) -> Path | None:
    """configs/<kind>/<name>.yaml, else the longest file whose name is a prefix of `name`
    (`cvt_tiny` uses `cvt.yaml`)."""
    folder = CONFIG_DIR / kind
    exact = folder / f"{name}.yaml"
    if exact.is_file():
        return exact
    stems = sorted((p.stem for p in folder.glob("*.yaml")), key=len, reverse=True)
    base = name.split(":", 1)[0]
    for stem in stems:
        if base.startswith(stem + "_") or base == stem:
            return folder / f"{stem}.yaml"
    return None


def resolve(objective: str | None, backbone: str | None, *, config_file: str | None = None,
            sets: Iterable[str] = (), cli: Mapping[str, Any] | None = None,
            profile_hint: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The resolved config and the list of files merged, in order.

    `cli` holds values from dedicated flags (`--data`, `--steps`, `--out`); they act like `--set`
    given before the explicit ones. `profile_hint`: the profile `auto` resolves to.
    """
    defaults = read_yaml(CONFIG_DIR / "defaults.yaml")
    user = read_yaml(config_file) if config_file else {}
    check_keys(user, defaults, str(config_file))
    set_tree = merge(parse_set([]), cli or {})
    set_tree = merge(set_tree, parse_set(sets))
    check_keys(set_tree, defaults, "--set")
    # The objective and backbone may themselves come from the user file or --set.
    picked = merge(merge({"objective": objective, "backbone": backbone}, _drop_none(user)), _drop_none(set_tree))
    objective, backbone = picked.get("objective"), picked.get("backbone")

    cfg = copy.deepcopy(defaults)
    sources = [str(CONFIG_DIR / "defaults.yaml")]
    for kind, name in (("objectives", objective), ("backbones", backbone)):
        path = preset_file(kind, name) if name else None
        if path is not None:
            layer = read_yaml(path)
            check_keys(layer, defaults, str(path))
            cfg = merge(cfg, layer)
            sources.append(str(path))
    profile = merge(merge(cfg, user), set_tree).get("profile", "auto")
    if profile == "auto":
        profile = profile_hint
    if profile and profile != "none":
        path = CONFIG_DIR / "profiles" / f"{profile}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in (CONFIG_DIR / "profiles").glob("*.yaml"))
            raise LaunchError(f"unknown profile '{profile}'; available: {', '.join(names)} or none")
        layer = read_yaml(path)
        check_keys(layer, defaults, str(path))
        cfg = merge(cfg, layer)
        sources.append(str(path))
        per_objective = profile_objective_file(profile, objective)
        if per_objective is not None:
            layer = read_yaml(per_objective)
            check_keys(layer, defaults, str(per_objective))
            cfg = merge(cfg, layer)
            sources.append(str(per_objective))
    cfg = merge(cfg, user)
    if config_file:
        sources.append(str(config_file))
    cfg = merge(cfg, set_tree)
    cfg["objective"], cfg["backbone"] = objective, backbone
    cfg["profile"] = profile or "none"
    for key in FREE_KEYS:
        cfg[key] = dict(cfg.get(key) or {})
    return cfg, sources


def profile_objective_file(profile: str, objective: str | None) -> Path | None:
    """`configs/profiles/<profile>/<objective>.yaml`: the profile's settings for one objective (the demo's
    small heads and crop counts), merged right after `configs/profiles/<profile>.yaml`; None if absent."""
    if not objective:
        return None
    path = CONFIG_DIR / "profiles" / profile / f"{objective}.yaml"
    return path if path.is_file() else None


def profile_objective_args(profile: str, objective: str) -> dict[str, Any]:
    """The `objective_args` a profile gives one objective ({} if none): what the tiny-preset sweeps use."""
    path = profile_objective_file(profile, objective)
    return dict(read_yaml(path).get("objective_args") or {}) if path is not None else {}


def _drop_none(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if k in ("objective", "backbone") and v is not None}


def dump(cfg: Mapping[str, Any], path: str | Path) -> None:
    """Write the resolved config as YAML (safe_dump: plain types only)."""
    Path(path).write_text(yaml.safe_dump(_plain(cfg), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- the typed config: parsed once, validated, read as attributes ---------------------------------
@dataclass(frozen=True)
class Check:
    """What one key accepts: `kind` (int, float, bool, str, "list", "mapping"), nullable, an inclusive `min`,
    an exclusive `gt`, `choices`, `length` for lists, `max`."""

    kind: Any
    nullable: bool = False
    min: float | None = None
    gt: float | None = None
    max: float | None = None
    choices: tuple | None = None
    length: int | None = None

    def allowed(self) -> str:
        kinds = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                 "list": "a list of numbers", "mapping": "a mapping"}
        words = [kinds[self.kind]]
        if self.choices:
            words = [" | ".join(map(str, self.choices))]
        if self.length:
            words = [f"a list of {self.length} numbers"]
        if self.min is not None:
            words.append(f">= {self.min:g}")
        if self.gt is not None:
            words.append(f"> {self.gt:g}")
        if self.max is not None:
            words.append(f"<= {self.max:g}")
        if self.nullable:
            words.append("or null")
        return " ".join(words)


def key(kind: Any, **limits: Any) -> Any:
    """A dataclass field whose metadata is the key's Check (no default: every value comes from the YAML)."""
    return field(metadata={"check": Check(kind, **limits)})


def _convert(value: Any, check: Check, name: str) -> Any:
    def bad() -> LaunchError:
        return LaunchError(f"config key '{name}' = {value!r} is not allowed: expected {check.allowed()}")

    if value is None:
        if check.nullable:
            return None
        raise bad()
    if check.kind is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if check.kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if check.kind is int and not float(value).is_integer():
            raise bad()
        value = check.kind(value)
        if not math.isfinite(value):
            raise bad()
    elif check.kind is str:
        if value is False and "no" in (check.choices or ()):
            value = "no"  # YAML reads a bare `no` (train.mixed_precision=no) as false
        if not isinstance(value, str):
            raise bad()
    elif check.kind == "list":
        if not isinstance(value, (list, tuple)) or (check.length and len(value) != check.length) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise bad()
        items = tuple(float(v) for v in value)
        lo_ok = all((check.min is None or v >= check.min) and (check.gt is None or v > check.gt)
                    and (check.max is None or v <= check.max) for v in items)
        if not lo_ok:
            raise bad()
        return items
    elif check.kind == "mapping":
        if not isinstance(value, Mapping):
            raise bad()
        return dict(value)
    if check.choices is not None and value not in check.choices:
        raise bad()
    if (check.min is not None and value < check.min) or (check.gt is not None and value <= check.gt) or (
            check.max is not None and value > check.max):
        raise bad()
    return value


@dataclass(frozen=True)
class DataConfig:
    train: str | None = key(str, nullable=True)
    val: str | None = key(str, nullable=True)
    image_size: int = key(int, min=1)
    decode_size: int | None = key(int, min=1, nullable=True)
    max_aspect: float = key(float, min=1)
    frames: int | None = key(int, min=1, nullable=True)
    frame_stride: int = key(int, min=1)
    view_size: int | None = key(int, min=1, nullable=True)
    batch_size: int = key(int, min=1)
    num_workers: int = key(int, min=0)
    shuffle_buffer: int = key(int, min=0)
    resampled: bool = key(bool)
    mean: tuple[float, float, float] = key("list", length=3)
    std: tuple[float, float, float] = key("list", length=3, gt=0)
    cache: str | None = key(str, nullable=True)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = key(float, gt=0)
    lr_scaling: str = key(str, choices=("linear", "sqrt", "none"))
    base_batch: int = key(int, min=1)
    min_lr: float = key(float, min=0)
    warmup: float = key(float, min=0)
    weight_decay: float = key(float, min=0)
    weight_decay_end: float = key(float, min=0)
    betas: tuple[float, float] = key("list", length=2, min=0, max=0.999999)
    eps: float = key(float, gt=0)
    clip_grad: float | None = key(float, min=0, nullable=True)
    clip_mode: str = key(str, choices=("global", "per_param"))
    grad_accum: int = key(int, min=1)
    fused: bool = key(bool)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = key(int, min=1)
    stop_at: int | None = key(int, min=1, nullable=True)
    seed: int = key(int, min=0)
    max_bad_steps: int = key(int, min=1)
    mixed_precision: str = key(str, choices=("auto", "no", "fp16", "bf16"))
    strategy: str = key(str, choices=("ddp", "fsdp"))
    compile: bool = key(bool)
    activation_checkpointing: bool = key(bool)
    find_unused_parameters: bool = key(bool)
    checkpoint_every: int = key(int, min=1)
    keep_checkpoints: int = key(int, min=1)
    log_every: int = key(int, min=1)
    val_every: int = key(int, min=1)
    val_batches: int = key(int, min=0)
    knn_every: int = key(int, min=0)
    knn_batches: int = key(int, min=1)
    online_probe_every: int = key(int, min=0)
    image_every: int = key(int, min=0)


@dataclass(frozen=True)
class RunConfig:
    """A resolved, validated run config: `cfg.data.batch_size`, `cfg.optim.lr`, ... (every key of
    configs/defaults.yaml, typed). `as_dict()` gives the plain tree that config.yaml holds."""

    objective: str = key(str)
    backbone: str = key(str)
    backbone_size: str | None = key(str, choices=("tiny", "none"), nullable=True)
    backbone_args: dict = key("mapping")
    objective_args: dict = key("mapping")
    out: str | None = key(str, nullable=True)
    init: str | None = key(str, nullable=True)
    profile: str = key(str)
    data: DataConfig = field(metadata={"section": DataConfig})
    optim: OptimConfig = field(metadata={"section": OptimConfig})
    train: TrainConfig = field(metadata={"section": TrainConfig})

    def as_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with top-level keys or `section={key: value}` changes, validated again."""
        tree = self.as_dict()
        for k, v in changes.items():
            tree[k] = {**tree[k], **v} if isinstance(tree.get(k), dict) and k not in FREE_KEYS else v
        return parse(tree)


def _build(cls: type, tree: Mapping[str, Any], prefix: str) -> Any:
    values = {}
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if f.name not in tree:
            raise LaunchError(f"config key '{name}' is missing (configs/defaults.yaml lists every key)")
        section = f.metadata.get("section")
        if section is not None:
            if not isinstance(tree[f.name], Mapping):
                raise LaunchError(f"config key '{name}' must be a mapping, got {tree[f.name]!r}")
            values[f.name] = _build(section, tree[f.name], name + ".")
        else:
            values[f.name] = _convert(tree[f.name], f.metadata["check"], name)
    return cls(**values)


def parse_stored(tree: Mapping[str, Any], source: str) -> RunConfig:
    """A config read back from a checkpoint or export folder (`source` names it in errors): keys that
    configs/defaults.yaml gained after the folder was written take their defaults, so older runs stay
    readable; a key the defaults do not know is an error, as anywhere."""
    defaults = read_yaml(CONFIG_DIR / "defaults.yaml")
    check_keys(tree, defaults, source)
    return parse(merge(defaults, tree))


def parse(tree: Mapping[str, Any]) -> RunConfig:
    """Validate a resolved config tree (types, ranges, choices of every key) into a RunConfig; LaunchError
    naming the key, the value and what is allowed. --objective and --backbone are required."""
    if not tree.get("objective"):
        raise LaunchError("--objective is required; python pretrain.py --help lists the objectives")
    if not tree.get("backbone"):
        raise LaunchError("--backbone is required; python pretrain.py --help lists the backbones")
    cfg = _build(RunConfig, tree, "")
    if cfg.train.stop_at is not None and cfg.train.stop_at > cfg.train.steps:
        raise LaunchError(f"config key 'train.stop_at' = {cfg.train.stop_at} is past train.steps = {cfg.train.steps}")
    return cfg
