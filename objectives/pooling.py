"""The pooled feature a masked-image objective trains, carried into the exported backbone.

MAE, SimMIM, MPP and MP3 put their losses on the final patch tokens (B, N, D); nothing trains a
class token's output, so a backbone that pools by its class token would hand the linear probe an
untrained feature (MAE's class token only joins the decoder's attention). These objectives declare
`trained_pool = "mean"`, the mean of the final patch tokens: the global average pooling that MAE's
official code fine-tunes with (`global_pool`), and with which "MAE works similarly well without
this token" (He et al. 2021, App. A.1). `export_backbone()` returns `with_pool(backbone, "mean")`.

`with_pool` works through the backbone's rebuild recipe (`ssl_vit.export.backbone_spec`: registry
name and overrides, or class and constructor arguments): for backbones whose constructor takes a
`pool` option (ViT, DeepViT, ParallelViT, SmallDatasetViT, T2T-ViT, ViT3D, ViViT) it returns a copy
with the same weights built with `pool=...` recorded in that recipe, so `ssl_vit.load_backbone` of
its export rebuilds it identically. Backbones that already pool that way, or that have no such
option (their pooling is part of the architecture: hierarchical models average their final map,
CaiT and XCiT use class attention), come back unchanged.

MP3 trains its encoder without positional embeddings (`use_pos=False`): `without_positions` returns a copy
whose learned positions are zero, so that its plain `forward_features(x)` is the trained one.
"""

from __future__ import annotations

import logging
from copy import deepcopy as copy_module

import torch
from torch import nn

from ssl_vit import BadArgument
from ssl_vit.export import backbone_spec, build_from_meta
from ssl_vit.token_backbone import TokenBackbone

__all__ = ["with_pool", "without_positions"]

logger = logging.getLogger(__name__)
_warned: set[str] = set()  # warnings given, once per process: a backbone class, or "<class> positions"


def with_pool(backbone: nn.Module, pool: str) -> nn.Module:
    """`backbone`, or a copy that pools its final tokens by `pool` ("cls" or "mean").

    The copy has the same weights, mode, device and dtype; building it leaves the global random
    state untouched (the launcher's exact resume relies on that).
    """
    if not isinstance(backbone, TokenBackbone) or backbone.pool == pool:
        return backbone
    try:
        spec = backbone_spec(backbone)
    except ValueError:  # built from arguments an export cannot record (a module): nothing to rebuild from
        return backbone
    if "registry_name" in spec:
        spec["overrides"] = {**spec["overrides"], "pool": pool}
    else:
        spec["init_config"] = {**spec["init_config"], "pool": pool}
    try:
        with torch.random.fork_rng(devices=[]):
            copy = build_from_meta(spec)
    except BadArgument:
        name = type(backbone).__name__
        if name not in _warned:
            _warned.add(name)
            logger.warning("%s has no pool option: its export keeps its own pooling (%s), which the objective "
                           "does not train; read patch tokens for a probe", name, backbone.pool)
        return backbone
    copy.load_state_dict(backbone.state_dict())
    param = next(backbone.parameters(), None)
    if param is not None:
        copy.to(device=param.device, dtype=param.dtype)
    return copy.train(backbone.training)


def without_positions(backbone: nn.Module, copy: bool = True) -> nn.Module:
    """A copy of `backbone` whose `forward_features(x)` equals `backbone.forward_features(x, use_pos=False)`:
    its learned patch and class-token positions set to zero (adding zeros changes nothing, at any grid size).
    `copy=False` zeroes them in `backbone` itself, for a module the caller has just copied.

    The features of an encoder trained without positions (MP3) shift when untrained positions are added
    back. Backbones without a `TokenBackbone`'s learned position table (sin-cos positions: SimpleViT; CrossViT's
    per-branch positions) come back unchanged, with one warning.
    """
    if not isinstance(backbone, TokenBackbone) or backbone.pos != "learned":
        name = type(backbone).__name__
        if f"{name} positions" not in _warned:
            _warned.add(f"{name} positions")
            logger.warning("%s has no learned position table to zero (sin-cos or its own positions): its export adds "
                           "positions to an encoder trained without them; read it with forward_features(x, "
                           "use_pos=False)", name)
        return backbone
    out = copy_module(backbone) if copy else backbone
    with torch.no_grad():
        out.pos_embed.weight.zero_()
        if out.prefix_pos is not None:
            out.prefix_pos.zero_()
    return out
