"""ViT for small datasets (Lee, Lee and Song 2021, "Vision Transformer for Small-Size Datasets",
arXiv:2112.13492): Shifted Patch Tokenization (SPT) and Locality Self-Attention (LSA).

SPT: the image is shifted by half a patch in the four diagonal directions (left-up, right-up,
left-down, right-down; zero fill), the four copies are stacked with the original along channels,
and the patches of that 5C-channel image are flattened, layer-normed and projected. (The seed
shifts by one pixel along the axes; the paper shifts by half a patch diagonally, which is what this
does.) LSA: attention with a learned temperature (initialised at 1/sqrt(d_head)) and each token's
attention to itself masked out, so the softmax is sharper and looks at other tokens.

SPT makes a token see its neighbours' pixels, so hidden or dropped cells are zeroed in pixel space
first (`hide_pixels`): masked cells cannot leak into visible tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ssl_vit import BackboneOutput, TokenBackbone, register_presets
from ssl_vit.embed import to_pair
from ssl_vit.layers import Attention, Transformer
from ssl_vit.masking import hide_pixels, keep_to_mask

__all__ = ["SmallDatasetViT", "SPT", "LSA"]


def diagonal_shifts(x: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """x (B, C, H, W) -> (B, 5C, H, W): x and its four diagonal shifts by (sy, sx) pixels, zero fill."""
    sy, sx = shift
    h, w = x.shape[-2:]
    padded = F.pad(x, (sx, sx, sy, sy))
    # The copy cropped at offset (oy, ox) shows x moved by (sy - oy, sx - ox).
    views = [padded[..., oy:oy + h, ox:ox + w] for oy in (0, 2 * sy) for ox in (0, 2 * sx)]
    return torch.cat([x, *views], dim=1)


class SPT(nn.Module):
    """Shifted Patch Tokenization: (B, C, H, W) -> tokens (B, h*w, dim).

    `return_grid=True` also returns the grid (h, w). The shift is half the patch size.
    """

    def __init__(self, *, dim: int, patch_size, channels: int = 3) -> None:
        super().__init__()
        self.patch_size = to_pair(patch_size)
        ph, pw = self.patch_size
        self.shift = (ph // 2, pw // 2)
        patch_dim = 5 * channels * ph * pw
        self.norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)

    def forward(self, x: torch.Tensor, return_grid: bool = False):
        ph, pw = self.patch_size
        grid = (x.shape[-2] // ph, x.shape[-1] // pw)
        patches = rearrange(diagonal_shifts(x, self.shift), "b c (h p) (w q) -> b (h w) (p q c)", p=ph, q=pw)
        tokens = self.proj(self.norm(patches))
        return (tokens, grid) if return_grid else tokens


class LSA(Attention):
    """Locality Self-Attention, (B, N, D) -> (B, N, D): learned temperature, diagonal masked.

    The temperature multiplies the queries (SDPA is then called with scale 1), so it is learned
    through the fused kernel; the diagonal goes in as a bool attn_mask.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, **kwargs) -> None:
        super().__init__(dim, heads, dim_head, proj_drop=dropout, attn_drop=dropout, **kwargs)
        self.temperature = nn.Parameter(torch.tensor(dim_head ** -0.5).log())
        self._eye: dict[tuple, torch.Tensor] = {}

    def off_diagonal(self, n: int, device: torch.device) -> torch.Tensor:
        key = (n, device)
        if key not in self._eye:
            # index comparison, not ~eye: ONNX runtimes lack a bool EyeLike
            idx = torch.arange(n, device=device)
            self._eye[key] = idx[:, None] != idx[None, :]
        return self._eye[key]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            raise ValueError("LSA is self-attention; it takes no context")
        q, k, v = rearrange(self.qkv(x), "b n (s h d) -> s b h n d", s=3, h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = self.off_diagonal(x.shape[1], x.device)
        mask = mask if attn_mask is None else mask & attn_mask
        out = self._attend(q * self.temperature.exp(), k, v, attn_mask=mask, scale=1.0)
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))


class SmallDatasetViT(TokenBackbone):
    """The seed's `vit_pytorch.vit_for_small_dataset.ViT`: SPT stem, LSA blocks, class token,
    learned positions. (B, C, H, W) -> logits (B, num_classes)."""

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
        pool: str = "cls",
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        drop_path: float = 0.0,
        num_registers: int = 0,
    ) -> None:
        super().__init__()
        self.build_tokens(image_size=image_size, patch_size=patch_size, dim=dim, channels=channels,
                          pos="learned", num_cls_tokens=1, pool=pool, emb_dropout=emb_dropout,
                          num_classes=num_classes, num_registers=num_registers)
        del self.patch_embed  # replaced by the shifted tokenizer
        self.spt = SPT(dim=dim, patch_size=patch_size, channels=channels)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout=dropout, drop_path=drop_path)
        for block in self.transformer.blocks:
            block.attn = LSA(dim, heads, dim_head, dropout)
        self.norm = nn.LayerNorm(dim)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return self.spt(x, return_grid=True)

    def forward_features(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        extra_tokens: torch.Tensor | None = None,
        use_pos: bool = True,
        kv_mask: torch.Tensor | None = None,
    ) -> BackboneOutput:
        """x (B, C, H, W) -> BackboneOutput, as TokenBackbone; hidden and dropped cells are zeroed
        in pixel space first because SPT's shifted copies cross cell borders."""
        grid = self.check_request(x, mask, keep, extra_tokens, use_pos, kv_mask)
        hidden = mask
        if keep is not None:
            dropped = keep_to_mask(keep, grid)
            hidden = dropped if hidden is None else hidden | dropped
        if hidden is not None:
            x = hide_pixels(x, hidden)
        return super().forward_features(x, mask=mask, keep=keep, extra_tokens=extra_tokens, use_pos=use_pos,
                                        kv_mask=kv_mask)


_SEED = dict(image_size=256, patch_size=16, dim=1024, depth=6, heads=16, mlp_dim=2048)
_TINY = dict(image_size=32, patch_size=8, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128)
register_presets(SmallDatasetViT, {"small_dataset_vit": _SEED, "small_dataset_vit_tiny": _TINY})
