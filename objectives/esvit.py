"""EsViT: efficient self-supervised vision transformers (Li et al. 2021, arXiv:2106.09785).

DINO's view-level loss on pooled features plus a region-level loss on patch tokens: each student
patch token is matched to the most similar (cosine, on the backbone's tokens) teacher patch token of
the other view, and the student's region-head softmax is trained towards the teacher's centred,
sharpened region-head softmax of that token. Loss = (view + region) / 2 per view pair, averaged over
the pairs (teacher global view i, student view v != i), as in the reference `DDINOLoss`.

It needs nothing but `patch_tokens` from the backbone, so it trains hierarchical models (CvT, Swin-
like) and isotropic ones alike.

Memory: with K = 65536 prototypes, per-token logits are large (tokens x K). The region loss is
computed in chunks of samples, each recomputed in the backward pass (activation checkpointing), so
only the 256-d bottleneck vectors are kept; the teacher's logits for the matched tokens are computed
from its gathered bottleneck vectors inside each chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ssl_vit import BackboneOutput, register_objective

from .dino import Dino, dino_loss, update_center_
from .heads import DINOHead

__all__ = ["EsViTTrainer", "region_cross_entropy", "match_regions"]

# elements of one chunk's (rows, tokens, K) logits before the region loss is chunked and checkpointed
_CHUNK_ELEMENTS = 1 << 24


def region_cross_entropy(student_proj: torch.Tensor, teacher_proj: torch.Tensor, weight: torch.Tensor,
                         student_weight: torch.Tensor, teacher_weight: torch.Tensor, center: torch.Tensor,
                         student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Summed region cross-entropy of matched tokens.

    student_proj (n, T, b): student bottleneck vectors; teacher_proj (I, n, T, b): for each of I
    teacher views, the bottleneck vector of the teacher token matched to each student token;
    weight (I, n): 1 for pairs that count (0 for a student view against its own teacher view);
    student_weight / teacher_weight (K, b): the prototype layers; center (K,).
    Returns sum_{i, r} weight[i, r] * mean_t H(softmax((t_proj w_t^T - c) / tt), softmax(s_proj w_s^T / ts)).
    """
    log_p = F.log_softmax(F.linear(student_proj, student_weight).float() / student_temp, dim=-1)  # (n, T, K)
    with torch.no_grad():
        q = F.softmax((F.linear(teacher_proj, teacher_weight).float() - center.float()) / teacher_temp, dim=-1)
        q = torch.einsum("in,intk->ntk", weight.to(q.dtype), q)  # the pairs' targets summed per token
    return -(q * log_p).sum(-1).mean(-1).sum()


def match_regions(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """Index of the most similar (cosine) teacher token for each student token.

    student_tokens (n, B, Ts, D), teacher_tokens (B, Tt, D) -> (n, B, Ts) long in [0, Tt).
    """
    s = F.normalize(student_tokens.float(), dim=-1)
    t = F.normalize(teacher_tokens.float(), dim=-1)
    return torch.einsum("vbsd,btd->vbst", s, t).argmax(-1)


class EsViTTrainer(Dino):
    """EsViT over any backbone (DINO's arguments, views and schedules; see `Dino`).

    The region head is a second DINO head applied to every patch token, with its own centre. The
    collapse monitor (`teacher_entropy`, `kl_to_uniform`) watches the view-level targets; the loss of a
    collapsed run is ln K for both terms, so `collapse_loss()` is ln K as for DINO.
    """

    def build_extra_heads(self, dim: int, k: int, hidden: int, bottleneck: int, nlayers: int, norm_last: bool) -> None:
        self.region_head = DINOHead(dim, k, hidden, bottleneck, nlayers=nlayers, norm_last_layer=norm_last,
                                    init_std=self.head_init_std)
        self.register_buffer("region_center", torch.zeros(k))
        self.register_buffer("region_center_started", torch.zeros((), dtype=torch.bool))

    def student_modules(self):
        return {**super().student_modules(), "region_head": self.region_head}

    def last_layers(self):
        return [self.head.last_layer, self.region_head.last_layer]

    def compute_loss(self, student: list[tuple[int, BackboneOutput]], teacher: list[tuple[int, BackboneOutput]],
                     batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s_logits, t_logits = self.view_logits(student, teacher, batch)
        view_loss = dino_loss(s_logits, t_logits, self.center, self.student_temp, self.teacher_temp)
        metrics = self.collapse_metrics(s_logits, t_logits, self.center)  # the view-level targets
        region_loss, t_proj = self.region_loss(student, teacher, batch)
        if self.training:
            update_center_(self.center, t_logits, self.center_momentum, self.center_started)
            with torch.no_grad():  # the last layer is linear: the mean of the logits is the logits of the mean
                mean_logits = self.teacher["region_head"].last_layer(t_proj.flatten(0, -2).mean(0, keepdim=True))
            update_center_(self.region_center, mean_logits, self.center_momentum, self.region_center_started)
        loss = 0.5 * view_loss + 0.5 * region_loss
        return loss, {"view_loss": view_loss.detach(), "region_loss": region_loss.detach(), **metrics}

    def region_loss(self, student, teacher, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over view pairs of the matched-token cross-entropy; also the teacher's bottleneck
        vectors (G, B, Tt, b) for the centre update."""
        with torch.no_grad():
            t_tokens = torch.cat([out.patch_tokens for _, out in teacher])         # (G*B, Tt, D)
            g = t_tokens.shape[0] // batch
            t_tokens = t_tokens.view(g, batch, *t_tokens.shape[1:])
            t_proj = self.teacher["region_head"].project(t_tokens)                 # (G, B, Tt, b)
            t_weight = self.teacher["region_head"].last_layer.normalized_weight()
        s_weight = self.region_head.last_layer.normalized_weight()
        total = t_tokens.new_zeros((), dtype=torch.float32)
        first_view = 0
        num_views = sum(n for n, _ in student)
        for n, out in student:  # one group per crop size (globals, locals)
            tokens = out.patch_tokens.view(n, batch, *out.patch_tokens.shape[1:])  # (n, B, Ts, D)
            with torch.no_grad():
                matched = []
                for i in range(g):
                    idx = match_regions(tokens.detach(), t_tokens[i])               # (n, B, Ts)
                    src = t_proj[i].unsqueeze(0).expand(n, -1, -1, -1)
                    matched.append(torch.gather(src, 2, idx.unsqueeze(-1).expand(-1, -1, -1, src.shape[-1])))
                matched = torch.stack(matched).flatten(1, 2)                       # (G, n*B, Ts, b)
                view_ids = first_view + torch.arange(n, device=tokens.device).repeat_interleave(batch)
                weight = (view_ids[None, :] != torch.arange(g, device=tokens.device)[:, None]).float()
            s_proj = self.region_head.project(out.patch_tokens)                     # (n*B, Ts, b)
            total = total + self._chunked_region_ce(s_proj, matched, weight, s_weight, t_weight)
            first_view += n
        n_pairs = g * (num_views - 1)
        return total / (batch * n_pairs), t_proj

    def _chunked_region_ce(self, s_proj, t_proj, weight, s_weight, t_weight) -> torch.Tensor:
        rows, tokens = s_proj.shape[:2]
        chunk = max(1, _CHUNK_ELEMENTS // max(1, tokens * self.num_prototypes))
        if chunk >= rows or not torch.is_grad_enabled():
            return region_cross_entropy(s_proj, t_proj, weight, s_weight, t_weight, self.region_center,
                                        self.student_temp, self.teacher_temp)
        # the recomputation in backward must see this step's centre, not the one updated after it
        args = (self.region_center.clone(), self.student_temp, self.teacher_temp)
        total = s_proj.new_zeros((), dtype=torch.float32)
        for start in range(0, rows, chunk):  # loop over memory-sized blocks of samples, not single ones
            sl = slice(start, start + chunk)
            total = total + checkpoint(region_cross_entropy, s_proj[sl], t_proj[:, sl], weight[:, sl], s_weight,
                                       t_weight, *args, use_reentrant=False)
        return total


register_objective("esvit", EsViTTrainer)
