"""ViT (Dosovitskiy et al. 2021) and Simple ViT (Beyer et al. 2022).

Both are `TokenBackbone`s: everything but the choice of positions, class token and pooling lives
in ssl_vit. The seed README's keyword arguments are accepted unchanged.
"""

from __future__ import annotations

from torch import nn

from ssl_vit import TokenBackbone, register_presets
from ssl_vit.layers import LN_EPS, Transformer

__all__ = ["ViT", "SimpleViT"]


class ViT(TokenBackbone):
    """The original Vision Transformer: learned positions, class token, pre-norm blocks.

    (B, C, H, W) -> logits (B, num_classes), or pooled features (B, dim) with num_classes=0.
    `image_size`/`patch_size` may be (H, W) pairs; any size divisible by the patch works.
    `transformer=module` plugs in another transformer over (B, L, dim) (e.g. Nystromformer).
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
    ) -> None:
        super().__init__()
        self.build_tokens(image_size=image_size, patch_size=patch_size, dim=dim, channels=channels,
                          pos="learned", num_cls_tokens=1, pool=pool, emb_dropout=emb_dropout,
                          num_classes=num_classes)
        if transformer is None:
            if depth is None or heads is None or mlp_dim is None:
                raise ValueError("ViT needs depth, heads and mlp_dim (or a `transformer` module)")
            transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout=dropout, qkv_bias=qkv_bias,
                                      qk_norm=qk_norm, drop_path=drop_path, layer_scale=layer_scale)
        self.transformer = transformer
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)


class SimpleViT(TokenBackbone):
    """Simple ViT: fixed 2-D sin-cos positions, no class token, mean pooling, no dropout."""

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
    ) -> None:
        super().__init__()
        self.build_tokens(image_size=image_size, patch_size=patch_size, dim=dim, channels=channels,
                          pos="sincos", num_cls_tokens=0, pool="mean", num_classes=num_classes)
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
