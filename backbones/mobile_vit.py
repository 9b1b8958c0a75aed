"""MobileViT (Mehta & Rastegari 2022, "MobileViT: Light-weight, General-purpose, and
Mobile-friendly Vision Transformer").

MobileNetV2 inverted residuals (Sandler et al. 2018) down to stride 8, then three stages of
(strided MV2 block, MobileViT block). A MobileViT block: local n x n conv, 1x1 projection to the
transformer width, a transformer over the unfolded map (pixels at the same position inside each
ph x pw patch form one sequence), 1x1 projection back, and fusion with the block input by
concatenation and an n x n conv. The seed hard-coded 4 heads of width 8 and required
channels[2] == channels[3] (its fourth stem block read the wrong width) and equal widths around
each MobileViT block; here heads and dim_head are arguments and any 11-entry channel list works.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from ssl_vit import register_presets
from ssl_vit.embed import to_pair
from ssl_vit.layers import Attention, DropPath, Mlp, drop_path_rates

from ._hierarchy import HierarchicalBackbone, StageOutput

__all__ = ["MobileViT"]


def conv_bn(dim_in: int, dim_out: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    """Conv (no bias), BatchNorm, SiLU on (B, C, H, W)."""
    return nn.Sequential(nn.Conv2d(dim_in, dim_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(dim_out), nn.SiLU())


class MV2Block(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand, 3x3 depthwise (stride 1 or 2), 1x1 linear project."""

    def __init__(self, dim_in: int, dim_out: int, stride: int = 1, expansion: int = 4) -> None:
        super().__init__()
        hidden = int(dim_in * expansion)
        layers: list[nn.Module] = [] if expansion == 1 else [conv_bn(dim_in, hidden)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.SiLU(),
            nn.Conv2d(hidden, dim_out, 1, bias=False), nn.BatchNorm2d(dim_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and dim_in == dim_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileTransformerBlock(nn.Module):
    """Pre-norm attention + SiLU feed-forward (MobileViT uses Swish), (B', N, D) -> (B', N, D)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, attn_drop=dropout, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout, act=nn.SiLU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MobileViTBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H, W); H, W multiples of the patch (ph, pw)."""

    def __init__(self, dim: int, depth: int, dim_in: int, dim_out: int, kernel: int, patch: tuple[int, int],
                 mlp_dim: int, heads: int, dim_head: int, dropout: float, drop_path: float) -> None:
        super().__init__()
        self.ph, self.pw = patch
        self.local = nn.Sequential(conv_bn(dim_in, dim_in, kernel), conv_bn(dim_in, dim))
        self.transformer = nn.Sequential(*(MobileTransformerBlock(dim, heads, dim_head, mlp_dim, dropout, drop_path)
                                           for _ in range(depth)))
        self.project = conv_bn(dim, dim_in)
        self.fuse = conv_bn(2 * dim_in, dim_out, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        b, _, h, w = y.shape
        # Unfold: one sequence per intra-patch position, holding that pixel of every patch.
        seq = rearrange(y, "b d (h ph) (w pw) -> (b ph pw) (h w) d", ph=self.ph, pw=self.pw)
        seq = self.transformer(seq)
        y = rearrange(seq, "(b ph pw) (h w) d -> b d (h ph) (w pw)", b=b, ph=self.ph, pw=self.pw, h=h // self.ph)
        return self.fuse(torch.cat([self.project(y), x], dim=1))


class MobileViT(HierarchicalBackbone):
    """MobileViT: (B, 3, H, W) -> logits (B, num_classes), or pooled features (B, channels[-1]).

    `channels` lists 11 widths: stem conv, four MV2 stem blocks (c1, c2 (stride 2), c3, c3), then for
    each of the 3 stages the strided MV2 output and the MobileViT block output, then the final
    1x1 conv. `dims` and `depths` are the transformer width and depth of each stage. The final
    stride is 32; inputs must be multiples of 32 * patch_size. `in_channels` is the image's
    channel count (the seed's `channels` is the width list).
    """

    def __init__(
        self,
        image_size,
        dims,
        channels,
        num_classes: int,
        expansion: int = 4,
        kernel_size: int = 3,
        patch_size=(2, 2),
        depths=(2, 4, 3),
        heads: int = 4,
        dim_head: int = 8,
        in_channels: int = 3,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if len(dims) != 3 or len(depths) != 3:
            raise ValueError(f"MobileViT needs 3 dims and 3 depths (one per stage), got {dims!r} and {depths!r}")
        if len(channels) != 11:
            raise ValueError(f"MobileViT needs 11 channel widths, got {len(channels)}: {list(channels)}")
        c = list(channels)
        ph, pw = to_pair(patch_size)

        self.conv1 = conv_bn(in_channels, c[0], 3, stride=2)
        self.stem_blocks = nn.Sequential(
            MV2Block(c[0], c[1], 1, expansion), MV2Block(c[1], c[2], 2, expansion),
            MV2Block(c[2], c[3], 1, expansion), MV2Block(c[3], c[3], 1, expansion),
        )
        mlp_mults = (2, 4, 4)  # the paper's feed-forward widths: 2x in the first stage, 4x after
        rates = drop_path_rates(drop_path, 3)
        self.trunk = nn.ModuleList()
        dim_in = c[3]
        for i in range(3):
            down, out = c[4 + 2 * i], c[5 + 2 * i]
            self.trunk.append(nn.Sequential(
                MV2Block(dim_in, down, 2, expansion),
                MobileViTBlock(dims[i], depths[i], down, out, kernel_size, (ph, pw), int(dims[i] * mlp_mults[i]),
                               heads, dim_head, dropout, rates[i]),
            ))
            dim_in = out
        self.final_conv = conv_bn(dim_in, c[10])
        self.build_hierarchy(image_size=image_size, channels=in_channels, embed_dim=c[10], stem_dim=c[0],
                             stem_stride=2, final_stride=32, size_multiple=math.lcm(32 * ph, 32 * pw),
                             num_classes=num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # MobileNet-style init (ml-cvnets): He-normal fan-out convs keep activations from shrinking
        # through the 40-odd BN'ed convolutions (PyTorch's default leaves eval-mode outputs ~1e-3).
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def run_stages(self, feat: torch.Tensor, image: torch.Tensor) -> StageOutput:
        x = self.stem_blocks(feat)
        for stage in self.trunk:
            x = stage(x)
        return StageOutput(self.final_conv(x))


register_presets(MobileViT, {
    "mobile_vit": dict(image_size=(256, 256), dims=[96, 120, 144],
                       channels=[16, 32, 48, 48, 64, 64, 80, 80, 96, 96, 384]),
    "mobile_vit_tiny": dict(image_size=(64, 64), dims=[16, 16, 24], channels=[8, 8, 16, 16, 16, 16, 24, 24, 32, 32, 64],
                            depths=(1, 1, 1), heads=2, dim_head=8, expansion=2),
})
