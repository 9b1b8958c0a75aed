"""3-D ViT and 3-D Simple ViT for video: tubelet embedding, then the plain ViT encoder.

Video (B, C, T, H, W) is cut into tubelets of `frame_patch_size` frames x `image_patch_size`
pixels (Arnab et al. 2021, "ViViT", uniform tubelet embedding); the mask grid is (t, h, w), so MAE
runs with tube masking (Tong et al. 2022, "VideoMAE") through the same objective as for images.
"""

from __future__ import annotations

from torch import nn

from ssl_vit import TokenBackbone, register_presets
from ssl_vit.layers import LN_EPS, Transformer

__all__ = ["ViT3D", "SimpleViT3D"]


class ViT3D(TokenBackbone):
    """ViT over tubelets: learned (t, h, w) positions, class token.

    (B, C, T, H, W) -> logits (B, num_classes), or pooled features with num_classes=0.
    """

    def __init__(
        self,
        *,
        image_size,
        image_patch_size,
        frames: int,
        frame_patch_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        pool: str = "cls",
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        qkv_bias: bool = False,
        drop_path: float = 0.0,
        num_registers: int = 0,
    ) -> None:
        super().__init__()
        self.build_tokens(image_size=image_size, patch_size=image_patch_size, dim=dim, channels=channels,
                          pos="learned", num_cls_tokens=1, pool=pool, emb_dropout=emb_dropout,
                          num_classes=num_classes, frames=frames, frame_patch_size=frame_patch_size,
                          num_registers=num_registers)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout=dropout,
                                       qkv_bias=qkv_bias, drop_path=drop_path)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)


class SimpleViT3D(TokenBackbone):
    """Simple ViT over tubelets: fixed 3-D sin-cos positions, mean pooling, no class token."""

    def __init__(
        self,
        *,
        image_size,
        image_patch_size,
        frames: int,
        frame_patch_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        channels: int = 3,
        dim_head: int = 64,
        num_registers: int = 0,
    ) -> None:
        super().__init__()
        self.build_tokens(image_size=image_size, patch_size=image_patch_size, dim=dim, channels=channels,
                          pos="sincos", num_cls_tokens=0, pool="mean", num_classes=num_classes,
                          frames=frames, frame_patch_size=frame_patch_size, num_registers=num_registers)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)


_SEED = dict(image_size=128, frames=16, image_patch_size=16, frame_patch_size=2, dim=1024, depth=6, heads=8,
             mlp_dim=2048)
_TINY = dict(image_size=32, frames=4, image_patch_size=8, frame_patch_size=2, dim=64, depth=2, heads=2,
             dim_head=32, mlp_dim=128)

register_presets(ViT3D, {"vit_3d": _SEED, "vit_3d_tiny": _TINY})
register_presets(SimpleViT3D, {"simple_vit_3d": _SEED, "simple_vit_3d_tiny": _TINY})
