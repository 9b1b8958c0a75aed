"""The backbone interface every architecture implements (see shared/DESIGN.md).

A backbone turns images (B, C, H, W) (video: (B, C, T, H, W)) into a `BackboneOutput`: final
patch tokens in row-major grid order, prefix tokens, a pooled vector and the token grid.
Objectives talk to backbones only through this interface and its `capabilities`.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import IncompatibleBackbone, InputShapeError

TOKEN_DROP = "token_drop"      # the encoder runs on a subset of patch tokens (`keep`)
MASK_TOKEN = "mask_token"      # hidden cells are replaced by a learned mask token
EXTRA_TOKENS = "extra_tokens"  # extra prefix tokens can be passed in (distillation token)
POS_FREE = "pos_free"          # positions can be switched off (`use_pos=False`, `kv_mask`)
VIDEO = "video"                # inputs are (B, C, T, H, W)
CAPABILITIES = frozenset({TOKEN_DROP, MASK_TOKEN, EXTRA_TOKENS, POS_FREE, VIDEO})


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
    capabilities: frozenset[str] = frozenset()

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
            if "init_config" not in self.__dict__:  # the outermost constructor records
                bound = signature.bind(self, *args, **kw)
                config = {k: v for k, v in bound.arguments.items() if k != "self"}
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
        """Validate channels and size of x; returns its spatial size."""
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
                      extra_tokens: torch.Tensor | None, use_pos: bool) -> tuple[int, ...]:
        """Validate a `forward_features` call; returns the mask grid of x."""
        size = self.check_input(x)
        grid = self.mask_grid(size)
        if mask is not None:
            self.require(MASK_TOKEN, "a `mask`")
            if tuple(mask.shape) != (x.shape[0], *grid) or mask.dtype != torch.bool:
                raise InputShapeError(
                    f"mask must be bool of shape {(x.shape[0], *grid)} for input {tuple(x.shape)}, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
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
