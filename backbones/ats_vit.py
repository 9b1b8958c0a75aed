"""ATS-ViT: Adaptive Token Sampling (Fayyaz et al. 2022, "Adaptive Token Sampling For Efficient
Vision Transformers", arXiv:2111.15667).

In each layer that has a token budget K, the class token's attention to every patch, weighted by
the norm of that patch's value vector and summed over heads, is a significance score. The sorted
scores are turned into a CDF and K tokens are drawn by inverse transform sampling at the evenly
spaced quantiles (k + 1/2) / K (the paper's deterministic variant); duplicates collapse, so a layer
keeps at most K patch tokens and fewer when the scores are peaked. Only the kept tokens are queried,
so the attention cost falls with depth. Everything is batched: the ragged number of kept tokens is
handled by padding plus a key mask, never by a loop over samples.

Interface: dropped tokens keep the state they had when they were dropped, so `patch_tokens` covers
the whole grid (B, N, D) in row-major order; `forward(img, return_sampled_token_ids=True)` also
returns the final kept patch indices (B, M), -1 = padding (the seed README's call).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from ssl_vit import EXTRA_TOKENS, MASK_TOKEN, POS_FREE, TOKEN_DROP, BackboneOutput, TokenBackbone, register_presets
from ssl_vit.layers import Attention, DropPath, Mlp, attend, drop_path_rates
from ssl_vit.masking import gather_tokens

__all__ = ["ATSViT", "AdaptiveTokenSampler"]


def _gather_heads(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, H, N, d), index (B, M) -> (B, H, M, d)."""
    b, h, _, d = t.shape
    return torch.gather(t, 2, index[:, None, :, None].expand(b, h, index.shape[1], d))


class AdaptiveTokenSampler(nn.Module):
    """Picks at most `num_tokens` patch tokens from significance scores (B, N) (Fayyaz et al. 2022).

    Returns (index (B, M) into the N patch tokens, padded with 0; valid (B, M) bool), M <= num_tokens,
    indices ascending within each sample. Padding tokens must have a score of 0.
    """

    def __init__(self, num_tokens: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_tokens, self.eps = num_tokens, eps

    def forward(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = scores.shape
        k = self.num_tokens
        probs = scores / (scores.sum(dim=1, keepdim=True) + self.eps)
        # Sorting first makes the draw independent of token order (and is what the paper does).
        sorted_probs, order = probs.sort(dim=1)
        cdf = sorted_probs.cumsum(dim=1)
        quantiles = (torch.arange(k, device=scores.device, dtype=cdf.dtype) + 0.5) / k
        picks = torch.searchsorted(cdf, quantiles.expand(b, k).contiguous()).clamp_(max=n - 1)
        chosen = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
        chosen.scatter_(1, torch.gather(order, 1, picks), True)  # duplicates collapse here
        count = chosen.sum(dim=1)
        m = int(count.max())
        # A stable sort on "not chosen" lists the chosen indices first, ascending.
        index = (~chosen).to(torch.uint8).argsort(dim=1, stable=True)[:, :m]
        valid = torch.arange(m, device=scores.device) < count[:, None]
        return index.masked_fill(~valid, 0), valid


class ATSBlock(nn.Module):
    """Pre-norm block whose attention may sample tokens (B, R+N, D) -> (B, R+M, D).

    The first token is the class token (its attention row gives the scores); the first `r` tokens
    (class, register and extra tokens) are always kept.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, num_tokens: int | None, *,
                 dropout: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, proj_drop=dropout)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.sampler = AdaptiveTokenSampler(num_tokens) if num_tokens is not None else None

    def will_sample(self, num_patch_tokens: int) -> bool:
        return self.sampler is not None and num_patch_tokens > self.sampler.num_tokens

    def forward(self, x: torch.Tensor, valid: torch.Tensor, r: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (B, L, D), valid (B, L) bool key mask -> new x, new valid, and the sampled patch
        indices (B, M) into the current patch tokens (None when nothing was sampled)."""
        attn = self.attn
        q, k, v = rearrange(attn.qkv(self.norm1(x)), "b n (s h d) -> s b h n d", s=3, h=attn.heads)
        q, k = attn.q_norm(q), attn.k_norm(k)
        key_mask = valid[:, None, None, :]
        index = None
        if self.will_sample(x.shape[1] - r):
            # The class token's attention row (B, H, 1, L), through the shared `attend`; scoring only.
            _, weights = attend(q[:, :, :1], k, v, attn_mask=key_mask, return_weights=True)
            # Significance: class attention times value norm, summed over heads (paper eq. 4).
            scores = (weights[:, :, 0, r:] * v[:, :, r:].norm(dim=-1)).sum(dim=1)
            index, kept_valid = self.sampler(scores.masked_fill(~valid[:, r:], 0.0))
            # Only the prefix tokens and the sampled patch tokens are queried.
            q = torch.cat([q[:, :, :r], _gather_heads(q[:, :, r:], index)], dim=2)
            x = torch.cat([x[:, :r], gather_tokens(x[:, r:], index)], dim=1)
            valid = torch.cat([valid[:, :r], kept_valid], dim=1)
        out = attn._attend(q, k, v, attn_mask=key_mask)
        out = attn.proj_drop(attn.proj(rearrange(out, "b h n d -> b n (h d)")))
        x = x + self.drop_path1(out)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, valid, index


class ATSViT(TokenBackbone):
    """ViT with adaptive token sampling (the seed's `vit_pytorch.ats_vit.ViT` keyword arguments).

    (B, C, H, W) -> logits (B, num_classes); `max_tokens_per_depth` gives each layer's budget of
    patch tokens (one entry per layer, non-increasing). No kv_mask: token sampling reads every
    attention row.
    """

    capabilities = frozenset({TOKEN_DROP, MASK_TOKEN, EXTRA_TOKENS, POS_FREE})
    inspection_attributes = frozenset({"last_num_tokens"})

    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes: int,
        dim: int,
        depth: int,
        max_tokens_per_depth: Sequence[int],
        heads: int,
        mlp_dim: int,
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        drop_path: float = 0.0,
        num_registers: int = 0,
    ) -> None:
        super().__init__()
        budget = [int(t) for t in max_tokens_per_depth]
        if len(budget) != depth:
            raise ValueError(f"max_tokens_per_depth needs one entry per layer ({depth}), got {len(budget)}")
        if sorted(budget, reverse=True) != budget or min(budget) < 1:
            raise ValueError(f"max_tokens_per_depth must be positive and non-increasing, got {tuple(budget)}")
        self.build_tokens(image_size=image_size, patch_size=patch_size, dim=dim, channels=channels,
                          pos="learned", num_cls_tokens=1, pool="cls", emb_dropout=emb_dropout,
                          num_classes=num_classes, num_registers=num_registers)
        rates = drop_path_rates(drop_path, depth)
        self.blocks = nn.ModuleList(
            ATSBlock(dim, heads, dim_head, mlp_dim, t, dropout=dropout, drop_path=p) for t, p in zip(budget, rates)
        )
        self.norm = nn.LayerNorm(dim)
        self.last_num_tokens: list[int] = []  # patch tokens entering each layer, for inspection

    def forward_features(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        extra_tokens: torch.Tensor | None = None,
        use_pos: bool = True,
    ) -> BackboneOutput:
        """x (B, C, H, W) -> BackboneOutput; patch_tokens (B, N, D) (or (B, K, D) for `keep`)."""
        return self._sample(x, mask=mask, keep=keep, extra_tokens=extra_tokens, use_pos=use_pos)[0]

    def _sample(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                extra_tokens: torch.Tensor | None = None, use_pos: bool = True
                ) -> tuple[BackboneOutput, torch.Tensor]:
        """forward_features and the final kept patch indices (B, M), -1 = padding."""
        self.check_request(x, mask, keep, extra_tokens, use_pos)
        tokens, grid = self.prepare_patches(x, mask=mask, keep=keep, use_pos=use_pos)
        b = tokens.shape[0]
        prefix = self.prefix(b, use_pos)
        if extra_tokens is not None:
            prefix = torch.cat([prefix, extra_tokens.to(prefix.dtype)], dim=1)
        r, n = prefix.shape[1], tokens.shape[1]
        h = self.emb_dropout(torch.cat([prefix, tokens], dim=1))
        valid = torch.ones(b, h.shape[1], dtype=torch.bool, device=h.device)
        ids = torch.arange(n, device=h.device).expand(b, n)  # current patch tokens -> original slot
        # Final state of every patch token; slot n swallows writes from padding.
        final = h.new_zeros(b, n + 1, h.shape[-1])
        counts = []
        for block in self.blocks:
            counts.append(h.shape[1] - r)
            if block.will_sample(h.shape[1] - r):
                # Tokens a block drops keep the state they entered it with: record every state first.
                final = self._write(final, h[:, r:], ids, valid[:, r:], n)
            h, valid, index = block(h, valid, r)
            if index is not None:
                ids = torch.gather(ids, 1, index)
        final = self._write(final, h[:, r:], ids, valid[:, r:], n)
        self.last_num_tokens = counts
        out = self.norm(torch.cat([h[:, :r], final[:, :n]], dim=1))
        prefix_out, patches = out[:, :r], out[:, r:]
        return (BackboneOutput(patches, prefix_out, prefix_out[:, 0], tuple(grid), keep),
                ids.masked_fill(~valid[:, r:], -1))

    @staticmethod
    def _write(final: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
               n: int) -> torch.Tensor:
        slot = ids.masked_fill(~valid, n)
        return final.scatter(1, slot.unsqueeze(-1).expand_as(tokens), tokens)

    def forward(self, x: torch.Tensor, return_sampled_token_ids: bool = False):
        """Logits (B, num_classes) (pooled features when num_classes=0); with
        `return_sampled_token_ids` also the final kept patch indices (B, M), -1 = padding."""
        out, token_ids = self._sample(x)
        logits = self.forward_head(out.pooled)
        if return_sampled_token_ids:
            return logits, token_ids
        return logits


_SEED = dict(image_size=256, patch_size=16, dim=1024, depth=6, max_tokens_per_depth=(256, 128, 64, 32, 16, 8),
             heads=16, mlp_dim=2048)
_TINY = dict(image_size=32, patch_size=8, dim=64, depth=2, max_tokens_per_depth=(12, 6), heads=2, dim_head=32,
             mlp_dim=128)
register_presets(ATSViT, {"ats_vit": _SEED, "ats_vit_tiny": _TINY})
