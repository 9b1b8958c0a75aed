"""CCT for video (Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact Transformers").

The 2-D CCT with its convolutional tokenizer made 3-D: (conv3d, ReLU, max-pool3d) repeated turns a
clip (B, C, T, H, W) into a (t, h, w) grid of tokens, then CCT's encoder layers and sequence
pooling. Positions are learned over (t, h, w) (resampled to other clip sizes) or 3-D sin-cos.

Seed behaviour not reproduced: its 'sine' option was a 1-D embedding of the flattened sequence
built for one clip size only (ours is 3-D and computed for the clip at hand), and its learned
positions were a fixed-length vector that failed on any other clip size.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_vit import EXTRA_TOKENS, MASK_TOKEN, VIDEO, Backbone, register_presets
from ssl_vit.embed import to_pair

from .cct import CCT
from .t2t import check_window

__all__ = ["CCT3D"]


class ConvTokenizer3d(nn.Module):
    """(conv3d, ReLU, max-pool3d) x n: (B, C, T, H, W) -> tokens (B, t*h*w, D) and grid (t, h, w).

    Windows are (frame, spatial, spatial); each must map a multiple of its stride onto an exact
    grid, so the token grid is the input size divided by `stride` = (frame stride, stride, stride).
    """

    def __init__(self, channels: int, dim: int, n_layers: int, *, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], pool_kernel: tuple[int, int], pool_stride: tuple[int, int],
                 pool_padding: tuple[int, int], planes: int = 64) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_conv_layers must be at least 1, got {n_layers}")
        for axis, i in (("frame", 0), ("spatial", 1)):
            check_window(kernel[i], stride[i], padding[i], f"the tokenizer's {axis} convolution")
            check_window(pool_kernel[i], pool_stride[i], pool_padding[i], f"the tokenizer's {axis} pooling")
        widths = [channels] + [planes] * (n_layers - 1) + [dim]
        k3, s3, p3 = ((a[0], a[1], a[1]) for a in (kernel, stride, padding))
        pk3, ps3, pp3 = ((a[0], a[1], a[1]) for a in (pool_kernel, pool_stride, pool_padding))
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            conv = nn.Conv3d(c_in, c_out, k3, s3, p3, bias=False)
            nn.init.kaiming_normal_(conv.weight)
            layers += [conv, nn.ReLU(), nn.MaxPool3d(pk3, ps3, pp3)]
        self.layers = nn.Sequential(*layers)
        self.stride = ((stride[0] * pool_stride[0]) ** n_layers, (stride[1] * pool_stride[1]) ** n_layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        x = self.layers(x)
        return x.flatten(2).transpose(1, 2), (x.shape[-3], x.shape[-2], x.shape[-1])


class CCT3D(CCT):
    """Compact Convolutional Transformer for video. (B, C, T, H, W) -> logits (B, num_classes) or pooled (B, D).

    Token grid (T/St, H/S, W/S) with S = (stride * pooling_stride) ** n_conv_layers and
    St = (frame_stride * frame_pooling_stride) ** n_conv_layers; that is also the mask grid.
    positional_embedding: 'learnable' (trilinearly resampled to other clip sizes), 'sine' (3-D
    sin-cos computed for the grid at hand) or 'none'.

    Capabilities: video, mask token (the pixels of hidden cells are zeroed before the overlapping
    convolutions, then their tokens become the mask token) and extra tokens (prefix tokens, left out
    of the sequence pooling). No token drop (each token's convolutions reach into neighbouring
    cells) and not pos_free (zero padding marks the borders).
    """

    capabilities = frozenset({VIDEO, MASK_TOKEN, EXTRA_TOKENS})

    def __init__(
        self,
        img_size=224,
        num_frames: int = 8,
        embedding_dim: int = 768,
        n_input_channels: int = 3,
        n_conv_layers: int = 1,
        frame_stride: int = 1,
        frame_kernel_size: int = 3,
        frame_padding: int | None = None,
        frame_pooling_kernel_size: int = 1,
        frame_pooling_stride: int = 1,
        frame_pooling_padding: int | None = None,
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
        in_planes: int = 64,
    ) -> None:
        Backbone.__init__(self)  # CCT's constructor builds a 2-D tokenizer; the encoder is shared below
        # Default frame paddings: the seed's k // 2 for odd windows; (k - 1) // 2 keeps even windows
        # (e.g. a 2-frame pooling) on an exact grid, where k // 2 would add a token.
        frame_padding = (frame_kernel_size - 1) // 2 if frame_padding is None else frame_padding
        if frame_pooling_padding is None:
            frame_pooling_padding = (frame_pooling_kernel_size - 1) // 2
        dim = embedding_dim
        self.tokenizer = ConvTokenizer3d(
            n_input_channels, dim, n_conv_layers,
            kernel=(frame_kernel_size, kernel_size), stride=(frame_stride, stride), padding=(frame_padding, padding),
            pool_kernel=(frame_pooling_kernel_size, pooling_kernel_size),
            pool_stride=(frame_pooling_stride, pooling_stride),
            pool_padding=(frame_pooling_padding, pooling_padding), planes=in_planes,
        )
        st, s = self.tokenizer.stride
        size = (int(num_frames), *to_pair(img_size))
        if size[0] % st or size[1] % s or size[2] % s:
            raise ValueError(f"num_frames x img_size {size} must be divisible by the tokenizer's total stride "
                             f"({st}, {s}, {s})")
        self.in_channels, self.default_size = n_input_channels, size
        self.mask_unit = (st, s, s)
        self.size_multiple = s
        self.build_encoder(dim, (size[0] // st, size[1] // s, size[2] // s),
                           positional_embedding=positional_embedding, dropout_rate=dropout_rate,
                           attention_dropout=attention_dropout, stochastic_depth_rate=stochastic_depth_rate,
                           num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, seq_pool=True)


register_presets(CCT3D, {
    "cct_3d": dict(img_size=224, num_frames=8, embedding_dim=384, n_conv_layers=2, frame_kernel_size=3,
                   kernel_size=7, stride=2, padding=3, pooling_kernel_size=3, pooling_stride=2, pooling_padding=1,
                   num_layers=14, num_heads=6, mlp_ratio=3.0, positional_embedding="learnable"),
    "cct_3d_tiny": dict(img_size=32, num_frames=4, embedding_dim=64, n_conv_layers=1, frame_kernel_size=3,
                        kernel_size=7, stride=2, padding=3, pooling_kernel_size=3, pooling_stride=2,
                        pooling_padding=1, num_layers=2, num_heads=2, mlp_ratio=2.0,
                        positional_embedding="learnable"),
})
