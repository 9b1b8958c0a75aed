"""Continued pretraining: `--init PATH` loads weights into the backbone before the objective is built, so
teachers and decoders start from them too.

PATH is an export folder of ours (checksums verified; `ssl_vit.load_backbone`) or a `.safetensors` file in
timm's VisionTransformer key layout for backbones that have one (ViT, SimpleViT, timm: models). Loading is
strict: a mismatch is one line listing missing and unexpected keys (or the first shape that differs).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import ssl_vit

from .errors import LaunchError


def init_state(path: str | Path, backbone: ssl_vit.Backbone) -> dict[str, torch.Tensor]:
    """The state dict `--init PATH` gives `backbone` (in its own key layout)."""
    path = Path(path)
    if path.is_dir():
        return ssl_vit.load_backbone(path).state_dict()
    if path.is_file() and path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (OSError, SafetensorError) as err:
            raise LaunchError(f"--init {path}: cannot read it as safetensors: {err}") from None
        return backbone.state_dict_from_timm(state)
    raise LaunchError(f"--init {path}: give an export folder (backbone.json + backbone.safetensors) or a "
                      "timm-layout .safetensors file")


def load_init(path: str | Path, backbone: ssl_vit.Backbone) -> None:
    """Load `--init PATH` into `backbone`, strictly; LaunchError naming what does not fit."""
    state = init_state(path, backbone)
    own = backbone.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(own.keys() & state.keys())
              if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        more = lambda names: f"{names[:5]}{' ...' if len(names) > 5 else ''}"
        raise LaunchError(f"--init {path} does not fit backbone {type(backbone).__name__}: missing keys "
                          f"{more(missing)}, unexpected keys {more(unexpected)}"
                          + (f", other shapes: {shapes[:3]}" if shapes else ""))
    backbone.load_state_dict(state, strict=True)
