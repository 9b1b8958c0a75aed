"""ViT (Dosovitskiy et al. 2021) and Simple ViT (Beyer et al. 2022).

Both are `TokenBackbone`s: everything but the choice of positions, class token and pooling lives
in ssl_vit. The seed README's keyword arguments are accepted unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ssl_vit import IncompatibleBackbone, TokenBackbone, WeightsMismatch, register_presets
from ssl_vit.layers import LN_EPS, Transformer

__all__ = ["ViT", "SimpleViT"]

# timm names whose shapes our presets share: (embed_dim, depth, heads) at patch 16, 224 px.
_TIMM_NAMES = {
    (192, 12, 3): "vit_tiny_patch16_224",
    (384, 12, 6): "vit_small_patch16_224",
    (768, 12, 12): "vit_base_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
}
_TIMM_DEFAULTS = dict(img_size=224, patch_size=16, in_chans=3, mlp_ratio=4.0, qkv_bias=True, qk_norm=False,
                      init_values=None, class_token=True, reg_tokens=0, global_pool="token")


class _TimmLayout:
    """timm's `VisionTransformer` key layout for ViT and SimpleViT (Dosovitskiy et al. 2021; timm).

    timm keeps class-token and patch positions in one `pos_embed` table (1, R+N, D) and names the
    blocks `blocks.<i>....` as ours are named under `transformer.`; sin-cos positions are written as
    timm's (learnable) table. The mask token has no place in timm and is left out.

    Register tokens (Darcet et al. 2024) are timm's `reg_token` (1, num_registers, D) with
    `reg_tokens=num_registers`: timm orders the prefix class token, then registers, as we do, and
    its table gives them positions, which ours lack, so they are written as zero rows. Read back,
    any register rows of a table are folded into `reg_token` (a constant added to a constant).
    """

    def timm_counterpart(self) -> tuple[str, dict[str, Any]]:
        cls, cfg = type(self).__name__, self.init_config
        if cfg.get("transformer") is not None:
            raise IncompatibleBackbone(f"a {cls} with a custom `transformer` module has no timm counterpart")
        dim, depth, heads = cfg["dim"], cfg["depth"], cfg["heads"]
        dim_head = cfg.get("dim_head", 64)
        if heads * dim_head != dim:
            raise IncompatibleBackbone(
                f"{cls} with heads * dim_head = {heads} * {dim_head} != dim = {dim} has no timm counterpart "
                "(timm's attention width is the model width)"
            )
        patch, size = tuple(self.mask_unit), tuple(self.default_size)
        mean_pool = self.pool == "mean"
        want = dict(
            img_size=size[0] if size[0] == size[1] else list(size),
            patch_size=patch[0] if patch[0] == patch[1] else list(patch),
            in_chans=self.in_channels,
            mlp_ratio=cfg["mlp_dim"] / dim,
            qkv_bias=bool(cfg.get("qkv_bias", False)),
            qk_norm=bool(cfg.get("qk_norm", False)),
            init_values=cfg.get("layer_scale"),
            class_token=self.cls_token is not None,
            reg_tokens=self.num_registers,
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

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        self.timm_counterpart()  # raises for shapes timm cannot hold
        out: dict[str, torch.Tensor] = {}
        for key, value in self.state_dict().items():
            if key in ("mask_token", "prefix_pos", "pos_embed.weight"):
                continue
            if key.startswith("transformer.blocks."):
                key = key.removeprefix("transformer.")
            elif not key.startswith(("patch_embed.", "norm.", "head.", "cls_token", "reg_token")):
                raise IncompatibleBackbone(f"parameter '{key}' has no place in timm's VisionTransformer")
            out[key] = value
        if self.pos == "learned":
            patch_pos = self.pos_embed.weight.detach()
        else:  # sin-cos: timm keeps the computed table as a parameter (1, N, D)
            grid = tuple(s // p for s, p in zip(self.default_size, self.mask_unit))
            patch_pos = self.pos_embed(grid, dtype=self.mask_token.dtype)
        # timm's one table: class-token positions, zero rows for the registers, then the patches.
        parts = [] if self.prefix_pos is None else [self.prefix_pos.detach()]
        if self.reg_token is not None:
            parts.append(patch_pos.new_zeros(1, self.num_registers, patch_pos.shape[-1]))
        out["pos_embed"] = torch.cat([*parts, patch_pos], dim=1) if parts else patch_pos
        return out

    def state_dict_from_timm(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        own = self.state_dict()
        out: dict[str, torch.Tensor] = {}
        reg_pos = None
        for key, value in state.items():
            if key == "pos_embed":
                c = own["prefix_pos"].shape[1] if "prefix_pos" in own else 0
                r = value.shape[1] - math.prod(s // p for s, p in zip(self.default_size, self.mask_unit))
                if r not in (0, c + self.num_registers):
                    raise WeightsMismatch(f"timm pos_embed {tuple(value.shape)} has {r} prefix rows; this "
                                          f"{type(self).__name__} has {c} class and {self.num_registers} "
                                          "register tokens")
                if r > c:  # the table's register rows: folded into reg_token below
                    reg_pos = value[:, c:r]
                if "pos_embed.weight" in own:
                    if c:  # a table without prefix rows (timm's no_embed_class) gives the class token none
                        out["prefix_pos"] = value[:, :c] if r else torch.zeros_like(own["prefix_pos"])
                    out["pos_embed.weight"] = value[:, r:]
                continue  # sin-cos patch positions are computed, not loaded
            out["transformer." + key if key.startswith("blocks.") else key] = value
        if reg_pos is not None and "reg_token" in out:
            out["reg_token"] = out["reg_token"] + reg_pos
        if "mask_token" not in out:  # timm has none: keep this model's own
            out["mask_token"] = own["mask_token"]
        return out


class ViT(_TimmLayout, TokenBackbone):
    """The original Vision Transformer: learned positions, class token, pre-norm blocks.

    (B, C, H, W) -> logits (B, num_classes), or pooled features (B, dim) with num_classes=0.
    `image_size`/`patch_size` may be (H, W) pairs; any size divisible by the patch works.
    `transformer=module` plugs in another transformer over (B, L, dim) (e.g. Nystromformer).
    `num_registers`: register tokens after the class token (Darcet et al. 2024), never pooled.
    `pos_init_std`: std of the learned positions at initialisation (0.02 as in ViT and DINO; on small images
    that drowns position in patch content at random init, docs/recipes.md "Positions at initialisation").
    """

    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes: int,
        dim: int,
        depth: int | None = None,
        heads: int | None = None,
        mlp_dim: int | None = None,
        pool: str = "cls",
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        transformer: nn.Module | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        num_registers: int = 0,
        pos_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.build_tokens(image_size=image_size, patch_size=patch_size, dim=dim, channels=channels,
                          pos="learned", num_cls_tokens=1, pool=pool, emb_dropout=emb_dropout,
                          num_classes=num_classes, num_registers=num_registers, pos_init_std=pos_init_std)
        if transformer is None:
            if depth is None or heads is None or mlp_dim is None:
                raise ValueError("ViT needs depth, heads and mlp_dim (or a `transformer` module)")
            transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout=dropout, qkv_bias=qkv_bias,
                                      qk_norm=qk_norm, drop_path=drop_path, layer_scale=layer_scale)
        self.transformer = transformer
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)


class SimpleViT(_TimmLayout, TokenBackbone):
    """Simple ViT: fixed 2-D sin-cos positions, no class token, mean pooling, no dropout.

    `num_registers`: register tokens before the patches (Darcet et al. 2024), left out of the mean.
    """

    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        channels: int = 3,
        dim_head: int = 64,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        drop_path: float = 0.0,
        num_registers: int = 0,
    ) -> None:
        super().__init__()
        self.build_tokens(image_size=image_size, patch_size=patch_size, dim=dim, channels=channels,
                          pos="sincos", num_cls_tokens=0, pool="mean", num_classes=num_classes,
                          num_registers=num_registers)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, qkv_bias=qkv_bias,
                                       qk_norm=qk_norm, drop_path=drop_path)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)


_SEED = dict(image_size=256, patch_size=32, dim=1024, depth=6, heads=16, mlp_dim=2048)
_TINY = dict(image_size=32, patch_size=8, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128)


def _timm_like(dim: int, depth: int, heads: int) -> dict:
    # timm's vit_*_patch16_224 shapes, so exports load into timm (qkv bias on, dim_head = dim / heads).
    return dict(image_size=224, patch_size=16, dim=dim, depth=depth, heads=heads, dim_head=dim // heads,
                mlp_dim=4 * dim, qkv_bias=True)


register_presets(ViT, {
    "vit": _SEED,
    "vit_tiny": _TINY,
    "vit_tiny_patch16": _timm_like(192, 12, 3),
    "vit_small_patch16": _timm_like(384, 12, 6),
    "vit_base_patch16": _timm_like(768, 12, 12),
})
register_presets(SimpleViT, {
    "simple_vit": _SEED,
    "simple_vit_tiny": _TINY,
    "simple_vit_small_patch16": _timm_like(384, 12, 6),
    "simple_vit_base_patch16": _timm_like(768, 12, 12),
})
