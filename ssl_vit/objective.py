"""The objective contract: a pluggable pretraining strategy over the backbone interface.

An objective is an `nn.Module` built from a backbone. It declares the views it needs
(`view_specs`), checks the backbone's capabilities (`requires`), returns the scalar loss when called,
keeps its last metrics in `metrics`, updates teachers and schedules in `on_step_end`, and says which
module gets exported (`export_backbone`).

Called on a plain image batch (`loss = mae(images)`, as in the seed README) it builds its views
itself; the launcher instead passes the list of views it already made on the accelerator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .backbone import Backbone
from .errors import IncompatibleBackbone


@dataclass(frozen=True)
class ViewSpec:
    """`count` random views of `size` (H, W) with these augmentations (per-sample parameters).

    Probabilities are per sample; `jitter` is (brightness, contrast, saturation, hue).
    `frames`: for video backbones, how many frames each view samples (None: all).
    """

    name: str
    count: int
    size: tuple[int, int]
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.0
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale: float = 0.0
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0
    frames: int | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)


class Objective(nn.Module):
    """Base class of every objective.

    `requires`: alternatives, each a set of capabilities; the backbone must have every capability
    of at least one of them (MAE: token_drop, or mask_token as a fallback).
    """

    requires: tuple[frozenset[str], ...] = (frozenset(),)
    # Declared capabilities the launcher reads (never probed with getattr/hasattr):
    needs_labels: bool = False  # the launcher passes `labels=` (B,) long when True (distillation)
    can_reconstruct: bool = False  # `reconstruct(images)` gives pictures (MAE, SimMIM)
    exports_teacher: bool = False  # `export_backbone()` is an EMA teacher, `backbone` the student (DINO family)
    # The pooling of the final tokens the loss trains ("mean": MAE, SimMIM, MPP, MP3), which the exported
    # backbone uses; None: the backbone's own (DINO trains the class token it pools).
    trained_pool: str | None = None
    # False: the loss trains the backbone without positional embeddings (`use_pos=False`, MP3); the export has
    # them switched off and the monitors read the backbone that way.
    trained_positions: bool = True

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.check_backbone(backbone)
        self.metrics: dict[str, float] = {}
        # What the launcher normalised its views with (`set_input_normalization`); None: views are
        # raw pixels in [0, 1] (standalone use). Objectives whose targets are pixel statistics (MPP's
        # colour bins) un-normalise with it.
        self.input_mean: tuple[float, ...] | None = None
        self.input_std: tuple[float, ...] | None = None

    def set_input_normalization(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        """Called once by the launcher: its views are `(pixels - mean) / std` per channel."""
        self.input_mean = None if mean is None else tuple(float(m) for m in mean)
        self.input_std = None if std is None else tuple(float(s) for s in std)

    def collapse_loss(self) -> float | None:
        """The loss value of a collapsed run (DINO-family: ln K, a uniform output), or None when the
        objective has no such level. The launcher warns when the loss stays near it."""
        return None

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Objectives with `can_reconstruct`: images (B, C, H, W) -> (masked input, reconstruction
        (B, C, H, W), mask (B, h, w))."""
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct images")

    @classmethod
    def compatible(cls, backbone: nn.Module) -> bool:
        caps = getattr(backbone, "capabilities", frozenset())
        return any(req <= caps for req in cls.requires)

    @classmethod
    def check_backbone(cls, backbone: nn.Module) -> None:
        """Raise IncompatibleBackbone naming what is missing and which objectives would work."""
        if not isinstance(backbone, Backbone):
            raise IncompatibleBackbone(
                f"{cls.__name__} needs an ssl_vit.Backbone, got {type(backbone).__name__}; build it with "
                "ssl_vit.create_backbone(...) or a class from `backbones`"
            )
        if cls.compatible(backbone):
            return
        from .registry import OBJECTIVES  # late: the registry imports plugins lazily

        caps = backbone.capabilities
        missing = " or ".join("+".join(sorted(req - caps)) for req in cls.requires)
        working = [n for n in OBJECTIVES.names() if getattr(OBJECTIVES.get(n), "compatible", None)
                   and OBJECTIVES.get(n).compatible(backbone)]
        raise IncompatibleBackbone(
            f"{cls.__name__} cannot train {type(backbone).__name__}: it needs the capability {missing}; "
            f"objectives that work with this backbone: {', '.join(working) or 'none'}"
        )

    def view_specs(self) -> Sequence[ViewSpec]:
        """The views this objective trains on, in the order `forward` receives them."""
        raise NotImplementedError

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Teacher EMA, momentum and temperature schedules. Nothing by default."""

    def on_resume(self, step: int, total_steps: int) -> None:
        """Called once after a checkpoint is loaded, before training continues at `step` (the next
        step to run, counting from 0) of `total_steps`: recompute schedule values that the state dict
        does not hold (DINO's teacher temperature). Nothing by default."""

    def on_before_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after backward, before the optimizer step (DINO cancels last-layer gradients)."""

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this objective) of parameters excluded from weight decay."""
        names = {n for n, p in self.named_parameters() if p.ndim <= 1}
        backbone = getattr(self, "backbone", None)
        if isinstance(backbone, Backbone):
            prefix = next((n for n, m in self.named_children() if m is backbone), "backbone")
            names |= {f"{prefix}.{n}" for n in backbone.no_weight_decay()}
        return names

    def export_backbone(self) -> nn.Module:
        """The module that gets exported (the student by default; DINO and EsViT: the teacher)."""
        return self.backbone

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """images: a plain batch (B, C, H, W) -> the objective makes its views itself (no
        normalisation); or the list of views the launcher made, one tensor (B, C, h, w) per view in
        `view_specs()` order (each spec expanded `count` times), already normalised.
        Returns the scalar loss and fills `self.metrics`."""
        raise NotImplementedError
