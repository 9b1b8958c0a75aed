"""Projection heads of the self-distillation objectives.

`DINOHead` (Caron et al. 2021, Sec. 3.1 and App. "Projection head"): an MLP (GELU, no batch norm)
ending in a bottleneck, l2 normalisation, then a weight-normalised linear layer without bias onto K
prototypes. With `norm_last_layer=True` (DINO's default for ViTs) the weight-norm gain is fixed at
1, so the last layer is x @ (v / ||v||)^T with row norms; we compute it as (x @ v^T) / ||v|| instead
of through `torch.nn.utils.weight_norm` (same function, fewer passes over the large weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

__all__ = ["BatchNormLast", "DINOHead", "WeightNormLinear"]


class BatchNormLast(nn.BatchNorm1d):
    """Batch norm over the last dimension of (..., D): every leading position (image, or token) is a sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view_as(x)


class WeightNormLinear(nn.Module):
    """y = g * x @ (v / ||v||)^T, row-wise norms, no bias. (N, D) -> (N, K).

    fixed_norm=True: g = 1 and not learned (DINO's `norm_last_layer`).
    """

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        trunc_normal_(self.weight, std=0.02)
        self.gain = None if fixed_norm else nn.Parameter(torch.ones(out_dim))

    def row_scale(self) -> torch.Tensor:
        """(K,) g / ||v_k||: what each prototype row is multiplied by."""
        scale = 1.0 / torch.linalg.vector_norm(self.weight, dim=1).clamp_min(1e-12)
        return scale if self.gain is None else scale * self.gain

    def normalized_weight(self) -> torch.Tensor:
        """(K, D) g * v / ||v||, for losses that need the prototypes themselves (EsViT's region loss)."""
        return self.weight * self.row_scale()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x @ (v / ||v||)^T == (x @ v^T) / ||v||. Scaling the (N, K) output instead of normalising
        # the (K, D) weight saves several passes over DINO's 65536 x 256 matrix in forward and
        # backward: the head's fwd+bwd is 1.5-2x faster on CPU for N = 16-128 rows, same function.
        return F.linear(x, self.weight) * self.row_scale()


class DINOHead(nn.Module):
    """(..., in_dim) -> (..., out_dim) logits over K prototypes.

    `nlayers` linear layers (in_dim -> hidden -> ... -> bottleneck), l2 normalisation, then the
    weight-normalised `last_layer`. DINO: nlayers=3, hidden 2048, bottleneck 256, K=65536.
    `project` and `last_layer` are separate so a loss can recompute the last layer in chunks.

    init_std: the MLP weights' truncated-normal std (DINO's 0.02, `DINOHead._init_weights`); None:
    1 / sqrt(fan_in) per layer, the same gain at any width. With zero biases the gain scales the
    bottleneck vector as a whole, so after the l2 normalisation it changes the initial outputs little;
    how much they differ between images is set by the backbone's features.
    use_bn: batch norm after each hidden linear layer (DINO's `--use_bn_in_head`, its choice for
    convnets), over every leading position of (..., in_dim); statistics are per process (no SyncBatchNorm).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True, init_std: float | None = 0.02,
                 use_bn: bool = False) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs at least one MLP layer, got nlayers={nlayers}")
        if out_dim < 1:
            raise ValueError(f"DINOHead needs a positive number of prototypes, got out_dim={out_dim}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                if use_bn:
                    layers.append(BatchNormLast(b))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                std = m.in_features ** -0.5 if init_std is None else init_std
                trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., bottleneck) unit vectors."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.project(x))
