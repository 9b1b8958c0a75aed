"""Patch embeddings and positional embeddings, written once for every backbone.

Positional embeddings adapt to the input size: learned ones are resampled (bicubic, as timm
does) to the grid at hand, sin-cos ones are computed for it. So one backbone serves 224 px global
crops and 96 px local crops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

Pair = int | Sequence[int]


def to_pair(x: Pair) -> tuple[int, int]:
    """7 -> (7, 7); (7, 5) -> (7, 5)."""
    if isinstance(x, int):
        return (x, x)
    a, b = x
    return (int(a), int(b))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: (B, C, H, W) -> (B, h*w, D), with grid (h, w).

    A strided convolution, equivalent to a linear map on flattened patches (Dosovitskiy et al.
    2021). Patches may be non-square, `patch_size=(ph, pw)`. Named like timm's (`proj`).
    """

    def __init__(self, patch_size: Pair, in_channels: int, dim: int, norm: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = to_pair(patch_size)
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


class PatchEmbed3d(nn.Module):
    """Tubelets to tokens: (B, C, T, H, W) -> (B, t*h*w, D), patch (pt, ph, pw) (Arnab et al. 2021)."""

    def __init__(self, patch_size: Sequence[int], in_channels: int, dim: int, norm: bool = False) -> None:
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        x = self.proj(x)
        grid = (x.shape[-3], x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


def sincos_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(N,) positions -> (N, dim) as [sin, cos] of geometric frequencies (Vaswani et al. 2017)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, (h*w, dim), row-major; x then y halves (Simple ViT)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos_1d(x.flatten(), dim // 2, temperature), sincos_1d(y.flatten(), dim // 2, temperature)], 1)


def sincos_3d(t: int, h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 3-D sin-cos embedding, (t*h*w, dim): a third of the channels for each axis, padded."""
    each = (dim // 6) * 2
    z, y, x = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    pe = torch.cat([sincos_1d(a.flatten(), each, temperature) for a in (x, y, z)], 1)
    return F.pad(pe, (0, dim - pe.shape[1]))


class SinCosPosEmbed(nn.Module):
    """Computed sin-cos positions for any grid, (1, N, D); cached per grid and device."""

    def __init__(self, dim: int, temperature: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.temperature = dim, temperature
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(
        self, grid: Sequence[int], device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        key = (tuple(grid), device, dtype)
        if key not in self._cache:
            fn = sincos_3d if len(grid) == 3 else sincos_2d
            self._cache[key] = fn(*grid, self.dim, self.temperature).to(device=device, dtype=dtype).unsqueeze(0)
        return self._cache[key]


def resample_grid(pos: torch.Tensor, old: Sequence[int], new: Sequence[int]) -> torch.Tensor:
    """Interpolate a learned grid embedding (1, prod(old), D) to (1, prod(new), D).

    Bicubic in 2-D, trilinear in 3-D; identity when the grids agree.
    """
    old, new = tuple(old), tuple(new)
    if old == new:
        return pos
    d = pos.shape[-1]
    img = pos.reshape(1, *old, d).movedim(-1, 1).float()
    mode = "trilinear" if len(old) == 3 else "bicubic"
    img = F.interpolate(img, size=new, mode=mode, align_corners=False)
    return img.movedim(1, -1).reshape(1, math.prod(new), d).to(pos.dtype)


class LearnedPosEmbed(nn.Module):
    """Learned positions for a base grid, resampled to any other: grid -> (1, N, D).

    `weight` is (1, prod(grid), D), initialised with a normal of std `init_std` cut at +-2 (timm's
    `trunc_normal_`); 0.02 as in ViT, timm and DINO.
    """

    def __init__(self, grid: Sequence[int], dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        self.weight = nn.Parameter(torch.zeros(1, math.prod(self.grid), dim))
        trunc_normal_(self.weight, std=init_std)

    def forward(
        self, grid: Sequence[int], device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        return resample_grid(self.weight, self.grid, grid)
