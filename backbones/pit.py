"""PiT: Rethinking Spatial Dimensions of Vision Transformers (Heo et al. 2021, arXiv:2103.16302).

A ViT whose token grid shrinks between stages: a pooling layer (depth-wise 3x3 convolution at
stride 2, then a point-wise one) halves the grid and doubles the width, while the class token
goes through a linear map to the new width.

Differences to the seed, all towards the paper and the backbone contract: any (H, W), square or
not (learned positions are resampled to the grid); the overlapping patch embedding (kernel p,
stride p // 2) is padded by p - p // 2 pixels so the grid is exactly (H, W) / (p // 2), which
keeps every stage aligned with the mask grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ssl_vit import register_presets
from ssl_vit.embed import LearnedPosEmbed, to_pair
from ssl_vit.layers import Block, drop_path_rates

from ._hierarchy import HierarchicalBackbone, StageOutput

__all__ = ["PiT"]


class PoolingLayer(nn.Module):
    """Tokens (B, D, h, w) -> (B, 2D, h/2, w/2) by depth-wise conv; class tokens (B, R, D) -> (B, R, 2D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim * 2, 3, stride=2, padding=1, groups=dim)
        self.pw = nn.Conv2d(dim * 2, dim * 2, 1)
        self.cls_ff = nn.Linear(dim, dim * 2)

    def forward(self, fmap: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pw(self.dw(fmap)), self.cls_ff(cls)


class PiT(HierarchicalBackbone):
    """PiT: (B, C, H, W) -> logits (B, num_classes), or the normed class token (B, dim * 2^(stages-1)).

    `depth` is a tuple: the number of blocks of each stage (a pooling layer between stages).
    `heads` one value or one per stage. Mask unit and size multiple: (patch_size // 2) * 2^(stages-1).
    """

    num_prefix_tokens = 1  # the class token

    def __init__(
        self,
        *,
        image_size,
        patch_size: int,
        num_classes: int,
        dim: int,
        depth: tuple[int, ...],
        heads,
        mlp_dim: int,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        channels: int = 3,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(depth, (tuple, list)):
            raise ValueError("depth must be a tuple of integers: the number of blocks before each downsizing")
        if patch_size < 2:
            raise ValueError(f"PiT needs patch_size >= 2 (its stride is patch_size // 2), got {patch_size}")
        stages = len(depth)
        heads = tuple(heads) if isinstance(heads, (tuple, list)) else (heads,) * stages
        stride = patch_size // 2
        self.patch_size = patch_size
        pad = patch_size - stride
        self.stem_pad = (pad // 2, pad - pad // 2) * 2  # left, right, top, bottom
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=stride)
        size = to_pair(image_size)
        self.pos_embed = LearnedPosEmbed((size[0] // stride, size[1] // stride), dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.cls_token, std=0.02)
        self.pos_drop = nn.Dropout(emb_dropout)
        total = sum(depth)
        rates = iter(drop_path_rates(drop_path, total))  # rises over the whole net
        self.stages = nn.ModuleList()
        self.pools = nn.ModuleList()
        for i, (d, h) in enumerate(zip(depth, heads)):
            self.stages.append(nn.Sequential(*(
                Block(dim, h, dim_head, mlp_dim, dropout=dropout, drop_path=next(rates)) for _ in range(d)
            )))
            if i < stages - 1:
                self.pools.append(PoolingLayer(dim))
                dim *= 2
        self.norm = nn.LayerNorm(dim)
        self.build_hierarchy(image_size=size, channels=channels, embed_dim=dim,
                             stem_dim=self.pos_embed.weight.shape[-1], stem_stride=stride,
                             final_stride=stride * 2 ** (stages - 1), num_classes=num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(F.pad(x, self.stem_pad))

    def run_stages(self, feat: torch.Tensor, image: torch.Tensor) -> StageOutput:
        b, _, h, w = feat.shape
        x = feat.flatten(2).transpose(1, 2) + self.pos_embed((h, w))
        cls = self.cls_token.expand(b, -1, -1)
        for i, stage in enumerate(self.stages):
            x = stage(torch.cat([cls, self.pos_drop(x) if i == 0 else x], dim=1))
            cls, x = x[:, :1], x[:, 1:]
            if i < len(self.pools):
                fmap, cls = self.pools[i](x.transpose(1, 2).reshape(b, -1, h, w), cls)
                h, w = fmap.shape[-2:]
                x = fmap.flatten(2).transpose(1, 2)
        x = self.norm(torch.cat([cls, x], dim=1))
        cls = x[:, :1]
        return StageOutput(x[:, 1:].transpose(1, 2).reshape(b, -1, h, w), prefix=cls, pooled=cls[:, 0])


_SEED = dict(image_size=224, patch_size=14, dim=256, depth=(3, 3, 3), heads=16, mlp_dim=2048, dropout=0.1,
             emb_dropout=0.1)
# Tiny: stride 2 stem, final stride 8 (32 px -> 4x4 grid).
_TINY = dict(image_size=32, patch_size=4, dim=32, depth=(1, 1, 1), heads=(1, 2, 4), dim_head=16, mlp_dim=64)

register_presets(PiT, {"pit": _SEED, "pit_tiny": _TINY})
