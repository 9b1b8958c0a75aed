"""Any timm `VisionTransformer` behind the ssl-vit backbone interface (registry prefix `timm:`).

`create_backbone("timm:vit_small_patch16_224")` builds timm's model (never pretrained: no downloads)
and wraps it, so MAE, SimMIM, DINO and the rest can pretrain timm's own architectures. The timm
model lives whole under `self.model` with timm's parameter names, so
`timm.create_model(name).load_state_dict(wrapper.model.state_dict())` loads the result back into
timm strictly. The wrapper adds only a mask token (outside `model`) and runs timm's pieces in the
interface's order: patch embedding, mask token, positions, `keep` gather, prefix (class, register
and extra) tokens, blocks, final norm, timm's own pooling.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssl_vit import (
    EXTRA_TOKENS,
    MASK_TOKEN,
    POS_FREE,
    TOKEN_DROP,
    Backbone,
    BackboneOutput,
    BadArgument,
    register_presets,
)
from ssl_vit.masking import gather_tokens, replace_masked
from ssl_vit.registry import BACKBONES

__all__ = ["TimmViT"]

# timm.create_model arguments that read files or fetch configs rather than describe the architecture.
_LOADING_KWARGS = frozenset({"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"})


class TimmViT(Backbone):
    """A timm VisionTransformer as a backbone: (B, C, H, W) -> BackboneOutput / logits.

    model_name: a timm model name (built with pretrained=False), or None to build
    `timm.models.vision_transformer.VisionTransformer(**model_kwargs)` directly.
    """

    def __init__(self, model_name: str | None = None, *, num_classes: int = 0, **model_kwargs: Any) -> None:
        super().__init__()
        if model_kwargs.pop("pretrained", False):
            raise ValueError("TimmViT builds timm models with pretrained=False (no downloads); load weights "
                             "afterwards with wrapper.model.load_state_dict(...)")
        loading = sorted(set(model_kwargs) & _LOADING_KWARGS)
        if loading:  # arguments may come from an export's backbone.json: they never name files to read
            raise BadArgument(f"TimmViT builds from architecture arguments only; {', '.join(loading)} would make "
                              "timm read weights or configs from elsewhere: load weights with "
                              "wrapper.model.load_state_dict(...)")
        if model_name is None:
            model = VisionTransformer(num_classes=num_classes, **model_kwargs)
        else:
            import timm

            if not timm.is_model(model_name):  # also refuses hf-hub: / local-dir: sources, which fetch configs
                raise BadArgument(f"timm:{model_name} is not a model in timm's registry (sources such as hf-hub: "
                                  "or local-dir: are not accepted); pick a name from timm.list_models('vit_*')")

            model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **model_kwargs)
        if type(model) is not VisionTransformer:
            raise ValueError(f"timm:{model_name} is a {type(model).__name__}; only timm VisionTransformer models "
                             "(vit_*, deit_*) can be wrapped")
        if not model.global_pool:
            raise ValueError("TimmViT needs a pooling model (global_pool 'token', 'avg', 'map', ...), got ''")
        self.model = model
        pe = model.patch_embed
        self.embed_dim, self.in_channels = model.embed_dim, pe.proj.in_channels
        self.default_size = tuple(pe.img_size) if pe.img_size is not None else (224, 224)
        self.mask_unit = tuple(pe.patch_size)
        self.size_multiple = math.lcm(*pe.patch_size)
        self.num_prefix_tokens = model.num_prefix_tokens
        self.num_registers = model.num_reg_tokens  # timm's `reg_token`, after its class token
        caps = {TOKEN_DROP, MASK_TOKEN, EXTRA_TOKENS}
        if model.pos_embed is not None:
            caps.add(POS_FREE)
        self.capabilities = frozenset(caps)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, model.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)

    def timm_counterpart(self) -> tuple[str, dict[str, Any]]:
        """The timm model this wraps: its name (the generic `vit_base_patch16_224` when built from
        kwargs alone, whose defaults are VisionTransformer's) and constructor kwargs."""
        cfg = dict(self.init_config)
        name = cfg.pop("model_name", None) or "vit_base_patch16_224"
        cfg.pop("num_classes", None)
        return name, cfg

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The wrapped model's weights in timm's key layout."""
        return self.model.state_dict()

    def state_dict_from_timm(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """timm-layout weights as this wrapper's state dict (the mask token, which timm lacks, is kept)."""
        return {**{f"model.{k}": v for k, v in state.items()}, "mask_token": self.mask_token.detach()}

    def _positions(self, grid: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """timm's learned positions split into (prefix part or None, patch part resampled to grid)."""
        m = self.model
        pos = m.pos_embed
        r = 0 if m.no_embed_class else m.num_prefix_tokens
        prefix, patch = (pos[:, :r], pos[:, r:]) if r else (None, pos)
        if tuple(grid) != tuple(m.patch_embed.grid_size):
            patch = resample_abs_pos_embed(patch, new_size=list(grid), old_size=list(m.patch_embed.grid_size),
                                           num_prefix_tokens=0)
        return prefix, patch

    def forward_features(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        extra_tokens: torch.Tensor | None = None,
        use_pos: bool = True,
    ) -> BackboneOutput:
        """x (B, C, H, W) -> BackboneOutput; without mask, keep or extra tokens the tokens equal
        timm's `forward_features` and `pooled` its `forward_head(pre_logits=True)`."""
        self.check_request(x, mask, keep, extra_tokens, use_pos)
        m = self.model
        pe = m.patch_embed
        feat = pe.proj(x)  # timm's PatchEmbed insists on its image size; the conv does not
        grid = (feat.shape[-2], feat.shape[-1])
        tokens = pe.norm(feat.flatten(2).transpose(1, 2))
        b = tokens.shape[0]
        if mask is not None:
            tokens = replace_masked(tokens, mask, self.mask_token[0, 0])
        prefix_pos = None
        if use_pos and m.pos_embed is not None:
            prefix_pos, patch_pos = self._positions(grid)
            tokens = tokens + patch_pos.to(tokens.dtype)
        if keep is not None:
            tokens = gather_tokens(tokens, keep)
        prefix = [t.expand(b, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        prefix = torch.cat(prefix, dim=1) if prefix else tokens[:, :0]
        if prefix_pos is not None:
            prefix = prefix + prefix_pos.to(prefix.dtype)
        if extra_tokens is not None:
            prefix = torch.cat([prefix, extra_tokens.to(prefix.dtype)], dim=1)
        r = prefix.shape[1]
        h = m.norm_pre(m.pos_drop(torch.cat([prefix, tokens], dim=1)))
        h = m.norm(m.blocks(h))
        own = torch.cat([h[:, : m.num_prefix_tokens], h[:, r:]], dim=1)  # timm's pooling ignores extras
        pooled = m.fc_norm(m.pool(own))
        return BackboneOutput(h[:, r:], h[:, :r], pooled, grid, keep)

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.head_drop(pooled))


def _timm_factory(name: str, **overrides: Any) -> TimmViT:
    return TimmViT(name, **overrides)


BACKBONES.register_prefix("timm", _timm_factory)
register_presets(TimmViT, {
    "timm_vit_tiny": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0),
})
