"""ssl-vit core: the backbone interface, registries, shared layers and mask utilities."""

from __future__ import annotations

from .backbone import (
    CAPABILITIES,
    EXTRA_TOKENS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KV_MASK,
    MASK_TOKEN,
    POS_FREE,
    TOKEN_DROP,
    VIDEO,
    Backbone,
    BackboneOutput,
)
from .errors import (
    BadArgument,
    CorruptCheckpoint,
    ExportNotFound,
    IncompatibleBackbone,
    InputDtypeError,
    InputShapeError,
    MalformedExport,
    OverwriteRefused,
    SslVitError,
    UnknownNameError,
    WeightsMismatch,
)
from .export import load_backbone, save_backbone
from .inspect import Extractor, Recorder
from .objective import Objective, ViewSpec
from .registry import (
    create_backbone,
    create_objective,
    list_backbones,
    list_objectives,
    register_backbone,
    register_objective,
    register_presets,
)
from .token_backbone import TokenBackbone

__all__ = [
    "CAPABILITIES", "EXTRA_TOKENS", "KV_MASK", "MASK_TOKEN", "POS_FREE", "TOKEN_DROP", "VIDEO",
    "IMAGENET_MEAN", "IMAGENET_STD",
    "Backbone", "BackboneOutput", "TokenBackbone", "Objective", "ViewSpec",
    "IncompatibleBackbone", "InputShapeError", "InputDtypeError", "BadArgument", "CorruptCheckpoint",
    "MalformedExport", "ExportNotFound", "OverwriteRefused", "WeightsMismatch", "SslVitError", "UnknownNameError",
    "create_backbone", "create_objective", "list_backbones", "list_objectives",
    "register_backbone", "register_objective", "register_presets",
    "Recorder", "Extractor", "load_backbone", "save_backbone",
]
__version__ = "0.1.0"
