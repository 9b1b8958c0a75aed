"""CCT (Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact Transformers").

A convolutional tokenizer (conv, ReLU, max-pool, repeated) instead of patches, a transformer with
CCT's block (pre-norm attention, then a LayerNorm on the stream, then the MLP) and sequence
pooling: a learned softmax weighting of the output tokens instead of a class token.
`cct_2` ... `cct_16` are the seed's size functions.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from ssl_vit import EXTRA_TOKENS, MASK_TOKEN, Backbone, BackboneOutput, register_backbone, register_presets
from ssl_vit.backbone import make_head
from ssl_vit.embed import LearnedPosEmbed, SinCosPosEmbed, to_pair
from ssl_vit.layers import Attention, DropPath, Mlp, drop_path_rates
from ssl_vit.masking import hide_pixels, replace_masked

from .t2t import check_window

__all__ = ["CCT", "cct_2", "cct_4", "cct_6", "cct_7", "cct_8", "cct_14", "cct_16"]


class ConvTokenizer(nn.Module):
    """(conv k/s/p, ReLU, max-pool) x n: (B, C, H, W) -> tokens (B, h*w, D) and grid (h, w)."""

    def __init__(self, channels: int, dim: int, n_layers: int, kernel_size: int, stride: int, padding: int,
                 pool_kernel: int, pool_stride: int, pool_padding: int, planes: int = 64) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_conv_layers must be at least 1, got {n_layers}")
        check_window(kernel_size, stride, padding, "the tokenizer convolution")
        check_window(pool_kernel, pool_stride, pool_padding, "the tokenizer pooling")
        widths = [channels] + [planes] * (n_layers - 1) + [dim]
        layers = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
            nn.init.kaiming_normal_(conv.weight)
            layers += [conv, nn.ReLU(), nn.MaxPool2d(pool_kernel, pool_stride, pool_padding)]
        self.layers = nn.Sequential(*layers)
        self.stride = (stride * pool_stride) ** n_layers

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.layers(x)
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


class CCTBlock(nn.Module):
    """CCT's encoder layer, (B, N, D) -> (B, N, D): x + attn(LN x), then LN, then + MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, dropout: float, attn_drop: float,
                 drop_path: float) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim // heads, attn_drop=attn_drop, proj_drop=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop_path(self.attn(self.pre_norm(x))))
        return x + self.drop_path(self.mlp(x))


class CCT(Backbone):
    """Compact Convolutional Transformer. (B, C, H, W) -> logits (B, num_classes) or pooled (B, D).

    Grid (H/S, W/S) with S = (stride * pooling_stride) ** n_conv_layers; `img_size` may be (H, W).
    positional_embedding: 'learnable' (resampled to other sizes), 'sine' (2-D sin-cos computed for
    the grid at hand; the seed's 1-D version only fitted the build size) or 'none'.

    Capabilities: mask token (hidden cells' pixels are zeroed before the overlapping convolutions,
    then their tokens become the mask token) and extra tokens (prefix tokens, left out of the
    sequence pooling). No token drop: each token's convolution window reaches into the
    neighbouring cells, so the tokens of kept cells cannot be computed from those cells alone.
    Not pos_free: the convolutions' zero padding marks the borders.
    """

    capabilities = frozenset({MASK_TOKEN, EXTRA_TOKENS})

    def __init__(
        self,
        img_size=224,
        embedding_dim: int = 768,
        n_input_channels: int = 3,
        n_conv_layers: int = 1,
        kernel_size: int = 7,
        stride: int = 2,
        padding: int = 3,
        pooling_kernel_size: int = 3,
        pooling_stride: int = 2,
        pooling_padding: int = 1,
        dropout_rate: float = 0.0,
        attention_dropout: float = 0.1,
        stochastic_depth_rate: float = 0.1,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        positional_embedding: str = "sine",
        seq_pool: bool = True,
        in_planes: int = 64,
    ) -> None:
        super().__init__()
        dim = embedding_dim
        self.tokenizer = ConvTokenizer(n_input_channels, dim, n_conv_layers, kernel_size, stride, padding,
                                       pooling_kernel_size, pooling_stride, pooling_padding, in_planes)
        size = to_pair(img_size)
        s = self.tokenizer.stride
        if size[0] % s or size[1] % s:
            raise ValueError(f"img_size {size} must be divisible by the tokenizer's total stride {s}")
        self.in_channels, self.default_size = n_input_channels, size
        self.mask_unit = self.size_multiple = s
        self.build_encoder(dim, (size[0] // s, size[1] // s), positional_embedding=positional_embedding,
                           dropout_rate=dropout_rate, attention_dropout=attention_dropout,
                           stochastic_depth_rate=stochastic_depth_rate, num_layers=num_layers, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, num_classes=num_classes, seq_pool=seq_pool)

    def build_encoder(self, dim: int, grid: tuple[int, ...], *, positional_embedding: str, dropout_rate: float,
                      attention_dropout: float, stochastic_depth_rate: float, num_layers: int, num_heads: int,
                      mlp_ratio: float, num_classes: int, seq_pool: bool) -> None:
        """Everything after the tokenizer: positions over `grid` (2-D or 3-D), class or mask tokens,
        the CCT layers, sequence pooling and the head. Shared with the video CCT."""
        if positional_embedding not in ("learnable", "sine", "none"):
            raise ValueError(
                f"positional_embedding must be 'learnable', 'sine' or 'none', got {positional_embedding!r}"
            )
        if dim % num_heads:
            raise ValueError(f"embedding_dim {dim} must be divisible by num_heads {num_heads}")
        self.embed_dim = dim
        self.num_prefix_tokens = 0 if seq_pool else 1
        self.seq_pool = seq_pool
        if positional_embedding == "learnable":
            self.pos_embed = LearnedPosEmbed(grid, dim)
            trunc_normal_(self.pos_embed.weight, std=0.2)  # CCT's initialisation
        elif positional_embedding == "sine":
            self.pos_embed = SinCosPosEmbed(dim)
        else:
            self.pos_embed = None
        self.cls_token = None if seq_pool else nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.dropout = nn.Dropout(dropout_rate)
        rates = drop_path_rates(stochastic_depth_rate, num_layers)
        self.blocks = nn.ModuleList(
            CCTBlock(dim, num_heads, int(dim * mlp_ratio), dropout=dropout_rate, attn_drop=attention_dropout,
                     drop_path=r)
            for r in rates
        )
        self.norm = nn.LayerNorm(dim)
        self.attention_pool = nn.Linear(dim, 1) if seq_pool else None  # sequence pooling: a score per token
        self.head = make_head(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        extra_tokens: torch.Tensor | None = None,
        use_pos: bool = True,
    ) -> BackboneOutput:
        """x (B, C, H, W) (video CCT: (B, C, T, H, W)) -> BackboneOutput; patch tokens row-major over
        the token grid, pooled the sequence pooling of the patch tokens (or the class token)."""
        self.check_request(x, mask, keep, extra_tokens, use_pos)
        if mask is not None:
            x = hide_pixels(x, mask)
        tokens, grid = self.tokenizer(x)
        b = tokens.shape[0]
        if mask is not None:
            tokens = replace_masked(tokens, mask, self.mask_token[0, 0])
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed(grid, tokens.device, tokens.dtype)
        prefix = tokens.new_zeros(b, 0, self.embed_dim) if self.cls_token is None else self.cls_token.expand(b, -1, -1)
        if extra_tokens is not None:
            prefix = torch.cat([prefix, extra_tokens.to(prefix.dtype)], dim=1)
        r = prefix.shape[1]
        h = self.dropout(torch.cat([prefix, tokens], dim=1))
        for blk in self.blocks:
            h = blk(h)
        h = self.norm(h)
        prefix, patches = h[:, :r], h[:, r:]
        if self.seq_pool:
            weights = self.attention_pool(patches).softmax(dim=1)  # (B, N, 1)
            pooled = (weights * patches).sum(dim=1)
        else:
            pooled = prefix[:, 0]
        return BackboneOutput(patches, prefix, pooled, tuple(grid), None)


def _cct(num_layers: int, num_heads: int, mlp_ratio: float, embedding_dim: int, kernel_size: int = 3,
         stride: int | None = None, padding: int | None = None, **kwargs) -> CCT:
    # The seed's defaults: stride and padding follow the kernel size.
    stride = max(1, kernel_size // 2 - 1) if stride is None else stride
    padding = max(1, kernel_size // 2) if padding is None else padding
    return CCT(num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, embedding_dim=embedding_dim,
               kernel_size=kernel_size, stride=stride, padding=padding, **kwargs)


def cct_2(**kwargs) -> CCT:
    """CCT-2: 2 layers, 2 heads, mlp ratio 1, width 128."""
    return _cct(2, 2, 1, 128, **kwargs)


def cct_4(**kwargs) -> CCT:
    """CCT-4: 4 layers, 2 heads, mlp ratio 1, width 128."""
    return _cct(4, 2, 1, 128, **kwargs)


def cct_6(**kwargs) -> CCT:
    """CCT-6: 6 layers, 4 heads, mlp ratio 2, width 256."""
    return _cct(6, 4, 2, 256, **kwargs)


def cct_7(**kwargs) -> CCT:
    """CCT-7: 7 layers, 4 heads, mlp ratio 2, width 256."""
    return _cct(7, 4, 2, 256, **kwargs)


def cct_8(**kwargs) -> CCT:
    """CCT-8: 8 layers, 4 heads, mlp ratio 2, width 256."""
    return _cct(8, 4, 2, 256, **kwargs)


def cct_14(**kwargs) -> CCT:
    """CCT-14: 14 layers, 6 heads, mlp ratio 3, width 384."""
    return _cct(14, 6, 3, 384, **kwargs)


def cct_16(**kwargs) -> CCT:
    """CCT-16: 16 layers, 6 heads, mlp ratio 3, width 384."""
    return _cct(16, 6, 3, 384, **kwargs)


register_presets(CCT, {
    "cct": dict(img_size=(224, 448), embedding_dim=384, n_conv_layers=2, kernel_size=7, stride=2, padding=3,
                pooling_kernel_size=3, pooling_stride=2, pooling_padding=1, num_layers=14, num_heads=6,
                mlp_ratio=3.0, positional_embedding="learnable"),
    "cct_tiny": dict(img_size=32, embedding_dim=64, n_conv_layers=1, kernel_size=7, stride=2, padding=3,
                     pooling_kernel_size=3, pooling_stride=2, pooling_padding=1, num_layers=2, num_heads=2,
                     mlp_ratio=2.0, positional_embedding="learnable"),
})


def _paper_size(fn, **preset):
    def factory(**overrides) -> CCT:
        return fn(**{"num_classes": 0, **preset, **overrides})
    factory.preset = dict(preset)
    return factory


# The paper's named configurations: CCT-7/3x1 for 32 px CIFAR, CCT-14/7x2 for 224 px ImageNet.
register_backbone("cct_7_3x1_32", _paper_size(cct_7, img_size=32, kernel_size=3, n_conv_layers=1,
                                               positional_embedding="learnable"))
register_backbone("cct_14_7x2_224", _paper_size(cct_14, img_size=224, kernel_size=7, n_conv_layers=2,
                                                positional_embedding="learnable"))
