"""The backbone interface every architecture implements (see shared/DESIGN.md).

A backbone turns images (B, C, H, W) (video: (B, C, T, H, W)) into a `BackboneOutput`: final
patch tokens in row-major grid order, prefix tokens, a pooled vector and the token grid.
Objectives talk to backbones only through this interface and its `capabilities`.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import BadArgument, IncompatibleBackbone, InputDtypeError, InputShapeError, closest
from .layers import Block, set_block_checkpointing

TOKEN_DROP = "token_drop"      # the encoder runs on a subset of patch tokens (`keep`)
MASK_TOKEN = "mask_token"      # hidden cells are replaced by a learned mask token
EXTRA_TOKENS = "extra_tokens"  # extra prefix tokens can be passed in (distillation token)
POS_FREE = "pos_free"          # positions can be switched off (`use_pos=False`)
VIDEO = "video"                # inputs are (B, C, T, H, W)
KV_MASK = "kv_mask"            # `forward_features(..., kv_mask=)` drops hidden cells from keys and values
CAPABILITIES = frozenset({TOKEN_DROP, MASK_TOKEN, EXTRA_TOKENS, POS_FREE, VIDEO, KV_MASK})

# ImageNet channel statistics (RGB, for pixels in [0, 1]): the launcher's default view normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- constructor argument types ----------------------------------------------------------------

def _accepts(hint: Any, value: Any) -> bool | None:
    """Whether `value` fits the resolved annotation `hint`; None when the annotation is not checked."""
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    if hint is type(None) or hint is None:
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        answers = [_accepts(h, value) for h in typing.get_args(hint)]
        return None if None in answers and not any(answers) else any(a for a in answers)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list, Sequence) or hint in (tuple, list, Sequence):
        return isinstance(value, (tuple, list))
    return None  # modules, callables, literals ...: left to the constructor


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    origin = typing.get_origin(hint)
    if origin in (tuple, list, Sequence) or hint in (tuple, list, Sequence):
        args = typing.get_args(hint)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            # the variable-length tuples of the constructors are per-stage (or per-layer) settings
            return "a list or tuple with one entry per stage (or layer)"
        return "a list or tuple"
    return getattr(hint, "__name__", str(hint))


@functools.cache
def _hints(init: Callable[..., Any]) -> dict[str, Any]:
    """The constructor's resolved annotations ({} when one cannot be resolved: nothing is then checked)."""
    try:
        return typing.get_type_hints(init)
    except Exception:  # noqa: BLE001 - e.g. a name imported only for type checkers
        return {}


def check_arguments(cls: type, init: Callable[..., Any], config: dict[str, Any]) -> None:
    """Raise BadArgument when a constructor argument does not fit its annotation (int, float, bool, str,
    sequences, unions with None); other annotations are left to the constructor."""
    hints = _hints(init)
    variadic = {p.name for p in inspect.signature(init).parameters.values()
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for name, value in config.items():
        hint = None if name in variadic else hints.get(name)
        if hint is None or _accepts(hint, value) is not False:
            continue
        raise BadArgument(
            f"{cls.__name__}: argument {name}={value!r} ({type(value).__name__}) must be {_describe(hint)}"
        )


def unexpected_argument(cls: type, signature: inspect.Signature, given: dict[str, Any], err: TypeError) -> BadArgument:
    """A BadArgument for a constructor call whose arguments do not bind (unknown or missing names)."""
    names = [p for p in signature.parameters if p != "self"]
    unknown = [k for k in given if k not in names]
    if unknown:
        hint = closest(unknown[0], names)
        return BadArgument(f"{cls.__name__} has no argument {unknown[0]!r}"
                           + (f"; did you mean: {', '.join(hint)}?" if hint else f" (it takes: {', '.join(names)})"))
    return BadArgument(f"{cls.__name__}: {err}")


@dataclass
class BackboneOutput:
    """What `forward_features` returns.

    patch_tokens: (B, N, D) final-stage tokens, row-major over `grid` (only the kept ones, in
        `keep` order, when `keep` was given).
    prefix_tokens: (B, R, D) class/register tokens, then any `extra_tokens` passed in.
    pooled: (B, D) what the classification head reads.
    grid: final token grid (h, w) or (t, h, w).
    keep: the `keep` indices the tokens correspond to, or None.
    """

    patch_tokens: torch.Tensor
    prefix_tokens: torch.Tensor
    pooled: torch.Tensor
    grid: tuple[int, ...]
    keep: torch.Tensor | None = None


class Backbone(nn.Module):
    """Base class of every architecture. Subclasses set the attributes below and implement
    `forward_features`; `forward` then gives logits (num_classes > 0) or pooled features.

    Constructor arguments are recorded in `init_config` (by `__init_subclass__`), so an exported
    backbone can be rebuilt from its class name and arguments alone.
    """

    embed_dim: int
    default_size: tuple[int, ...]
    in_channels: int = 3
    mask_unit: int | tuple[int, ...] = 16
    size_multiple: int = 16
    num_prefix_tokens: int = 0
    # register tokens among the prefix tokens, after the class token (Darcet et al. 2024, "Vision Transformers
    # Need Registers"): attention pictures and class-token readouts skip them
    num_registers: int = 0
    capabilities: frozenset[str] = frozenset()
    # Set by ssl_vit.create_backbone: what rebuilds this model from the registry (None: built from its class).
    registry_name: str | None = None
    registry_overrides: dict[str, Any] = {}
    init_config: dict[str, Any]  # the constructor's arguments, recorded by __init_subclass__
    # Attributes a forward writes for inspection after the call (never read back by a forward).
    inspection_attributes: frozenset[str] = frozenset()

    _classes: dict[str, type[Backbone]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        Backbone._classes[cls.__name__] = cls
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            if "init_config" not in self.__dict__:  # the outermost constructor records and checks
                try:
                    bound = signature.bind(self, *args, **kw)
                except TypeError as err:
                    raise unexpected_argument(cls, signature, kw, err) from None
                config = {k: v for k, v in bound.arguments.items() if k != "self"}
                check_arguments(cls, init, config)
                extra = config.pop(next((p.name for p in signature.parameters.values()
                                         if p.kind is p.VAR_KEYWORD), "__none__"), {})
                object.__setattr__(self, "init_config", {**config, **extra})
            init(self, *args, **kw)

        cls.__init__ = recording_init

    # ---- geometry -------------------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        return VIDEO in self.capabilities

    def _unit(self) -> tuple[int, ...]:
        unit = self.mask_unit
        dims = len(self.default_size)
        return tuple(unit) if isinstance(unit, Sequence) else (unit,) * dims

    def mask_grid(self, size: Sequence[int]) -> tuple[int, ...]:
        """The mask grid (h, w) (video: (t, h, w)) for an input size (H, W) / (T, H, W)."""
        size = tuple(int(s) for s in size)
        self.check_size(size)
        return tuple(s // u for s, u in zip(size, self._unit()))

    def num_cells(self, size: Sequence[int]) -> int:
        return math.prod(self.mask_grid(size))

    def check_size(self, size: Sequence[int]) -> None:
        """Raise InputShapeError unless height and width are multiples of `size_multiple`."""
        spatial = tuple(size)[-2:]
        m = self.size_multiple
        bad = [s for s in spatial if s % m or s <= 0]
        if bad:
            raise InputShapeError(
                f"{type(self).__name__}: input size {'x'.join(map(str, spatial))} is not a multiple of "
                f"size_multiple={m} ({bad[0]} % {m} = {bad[0] % m}); resize or crop to a multiple of {m}"
            )
        if len(size) == 3:
            frames_unit = self._unit()[0]
            if size[0] % frames_unit:
                raise InputShapeError(
                    f"{type(self).__name__}: {size[0]} frames is not a multiple of the frame patch size {frames_unit}"
                )

    def check_input(self, x: torch.Tensor) -> tuple[int, ...]:
        """Validate type, dtype, rank, channels and size of x (B, C, H, W) (video: (B, C, T, H, W)).

        Returns the size (H, W) / (T, H, W).

        Every `forward_features` runs it (through `check_request`) before touching x.
        """
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise InputDtypeError(f"{name} expects a torch.Tensor batch, got a {type(x).__name__}; "
                                  "convert it with torch.as_tensor(...)")
        if not x.is_floating_point():
            hint = (" (convert with x.float() / 255 and normalise)" if x.dtype == torch.uint8
                    else " (convert with x.float())")
            raise InputDtypeError(f"{name} expects a floating-point batch, got {x.dtype}{hint}")
        want = 5 if self.is_video else 4
        if x.dim() != want:
            layout = "(B, C, T, H, W)" if self.is_video else "(B, C, H, W)"
            raise InputShapeError(
                f"{type(self).__name__} expects a {want}-D batch {layout}, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise InputShapeError(
                f"{type(self).__name__} expects {self.in_channels} input channels, got {x.shape[1]} "
                f"(shape {tuple(x.shape)}); build it with channels={x.shape[1]} or convert the images"
            )
        size = tuple(x.shape[2:])
        self.check_size(size)
        return size

    def require(self, capability: str, why: str) -> None:
        """Raise IncompatibleBackbone unless this backbone has `capability`."""
        if capability not in self.capabilities:
            raise IncompatibleBackbone(
                f"{type(self).__name__} lacks the '{capability}' capability needed for {why} "
                f"(it has: {', '.join(sorted(self.capabilities)) or 'none'})"
            )

    def check_request(self, x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None,
                      extra_tokens: torch.Tensor | None, use_pos: bool,
                      kv_mask: torch.Tensor | None = None) -> tuple[int, ...]:
        """Validate a `forward_features` call; returns the mask grid of x."""
        size = self.check_input(x)
        grid = self.mask_grid(size)
        for what, m in (("mask", mask), ("kv_mask", kv_mask)):
            if m is None:
                continue
            self.require(MASK_TOKEN if what == "mask" else KV_MASK, f"a `{what}`")
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != (x.shape[0], *grid) or m.dtype != torch.bool:
                got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
                raise InputShapeError(
                    f"{what} must be bool of shape {(x.shape[0], *grid)} for input {tuple(x.shape)}, got {got}"
                )
        if keep is not None:
            self.require(TOKEN_DROP, "`keep`")
        if extra_tokens is not None:
            self.require(EXTRA_TOKENS, "`extra_tokens`")
        if not use_pos:
            self.require(POS_FREE, "use_pos=False")
        return grid

    # ---- forward ----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, *, mask: torch.Tensor | None = None,
                         keep: torch.Tensor | None = None, extra_tokens: torch.Tensor | None = None,
                         use_pos: bool = True) -> BackboneOutput:
        raise NotImplementedError

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        head = getattr(self, "head", None)
        return pooled if head is None else head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) when built with num_classes > 0, else pooled features (B, D)."""
        return self.forward_head(self.forward_features(x).pooled)

    # ---- timm's VisionTransformer layout (export format "timm") -------------------------------
    def timm_counterpart(self) -> tuple[str, dict[str, Any]]:
        """The timm model `(name, kwargs)` that `timm_state_dict()` loads into with `strict=True`:
        `timm.create_model(name, num_classes=0, **kwargs)`. Families with that layout override this;
        the default raises IncompatibleBackbone."""
        raise IncompatibleBackbone(
            f"{type(self).__name__} has no timm counterpart: its family has no timm VisionTransformer layout "
            "(format 'timm' covers ViT, SimpleViT and timm: models); export it in the native format and load it "
            "with ssl_vit.load_backbone"
        )

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights in the key layout of `timm_counterpart()` (default: raises)."""
        self.timm_counterpart()
        raise NotImplementedError(f"{type(self).__name__} declares a timm counterpart but no timm_state_dict")

    def state_dict_from_timm(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of `timm_state_dict`: a state dict for this module from timm-layout tensors."""
        self.timm_counterpart()
        raise NotImplementedError(f"{type(self).__name__} declares a timm counterpart but no state_dict_from_timm")

    # ---- activation checkpointing -------------------------------------------------------------
    @property
    def supports_grad_checkpointing(self) -> bool:
        """Whether `set_grad_checkpointing` has blocks to switch: True for every model built of the shared
        `ssl_vit.layers.Block` (directly or through `Transformer`). Families with their own blocks override
        this together with `set_grad_checkpointing`."""
        return any(isinstance(m, Block) for m in self.modules())

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each shared block's activations in backward (training with grad enabled only),
        trading about one extra block forward for not keeping its activations. Raises
        IncompatibleBackbone when enabling it on a model without shared blocks."""
        if set_block_checkpointing(self, enabled) == 0 and enabled:
            raise IncompatibleBackbone(
                f"{type(self).__name__} has no ssl_vit.layers blocks to checkpoint (its family builds its own "
                "layers); train it with train.activation_checkpointing=false"
            )

    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay: biases, norms, positions and special tokens."""
        special = ("pos", "token", "relative_position", "temperature", "gamma", "scale")
        return {
            name for name, p in self.named_parameters()
            if p.ndim <= 1 or any(s in name.rsplit(".", 1)[-1] or s in name for s in special)
        }


def make_head(dim: int, num_classes: int) -> nn.Module | None:
    """A linear classification head, or None for a feature extractor."""
    return nn.Linear(dim, num_classes) if num_classes > 0 else None
