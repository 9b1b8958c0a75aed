"""iBOT: image BERT pre-training with an online tokenizer (Zhou et al. 2022, "iBOT: Image BERT Pre-Training
with Online Tokenizer", arXiv:2111.07832).

DINO's self-distillation (objectives/dino.py: views, teacher EMA, temperature warm-up, frozen prototype layer)
plus masked image modelling: the student sees the global crops with a block-wise random mask (a share of the
images, each with its own ratio), the teacher the unmasked crops. Two losses:

- image level: DINO's multi-crop cross-entropy on the pooled (class) token, teacher view i against every
  other student view;
- patch level: at every masked cell of a student global crop, the cross-entropy between the teacher's
  centred, sharpened patch-head softmax of the same cell (unmasked input) and the student's patch-head
  softmax, averaged over the masked cells of each image, then over all images of the global crops (images
  without a mask count as 0, as the reference `iBOTLoss` does).

The patch head is the class head (`shared_head=True`) or a DINO head of its own, with its own centre and
temperatures. Only masked tokens go through the prototype layer, so the (tokens, K) logits are never
formed for the whole grid.

The same class carries the pieces DINOv2 (objectives/dinov2.py, Oquab et al. 2023) adds: Sinkhorn-Knopp
teacher targets instead of the EMA centre (`centering="sinkhorn_knopp"`) and the KoLeo regulariser on the
student's pooled tokens of the global crops (`koleo_weight`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssl_vit import BackboneOutput, InputShapeError, register_objective

from .dino import Dino, effective_rank, encode_views, koleo_loss, update_center_
from .ema import linear_warmup
from .heads import DINOHead

__all__ = ["IBOT", "ibot_block_masks", "ibot_mask_ratios", "ibot_patch_loss", "koleo_loss",
           "multicrop_cross_entropy", "sinkhorn_knopp"]

CENTERINGS = ("ema", "sinkhorn_knopp")
MASK_SAMPLINGS = ("bernoulli", "stratified")


# ---- losses: small functions of tensors ------------------------------------------------------------------
def multicrop_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                            student_temp: float) -> torch.Tensor:
    """DINO's image-level loss from ready teacher targets (EMA-centred softmax or Sinkhorn-Knopp).

    student_logits (V, B, K), the G global views first; teacher_probs (G, B, K). Mean over the G * (V - 1)
    pairs (teacher view i, student view v != i) of mean_b -sum_k q_ibk log softmax(s_vb / student_temp)_k
    (Caron et al. 2021, Eq. 3; iBOT's `iBOTLoss` and DINOv2's `DINOLoss` give the same value).
    """
    g, v = teacher_probs.shape[0], student_logits.shape[0]
    if v < 2 or g > v or student_logits.shape[1:] != teacher_probs.shape[1:]:
        raise ValueError(f"multicrop_cross_entropy: student (V, B, K) {tuple(student_logits.shape)} and teacher "
                         f"(G, B, K) {tuple(teacher_probs.shape)} must share B and K with G <= V and V >= 2")
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)         # (V, B, K)
    q = teacher_probs.float().detach()
    others = log_p.sum(0, keepdim=True) - log_p[:g]                             # (G, B, K): every v != i
    return -(q * others).sum(-1).mean(-1).sum() / (g * (v - 1))


def ibot_patch_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor,
                    student_temp: float) -> torch.Tensor:
    """iBOT's masked patch loss (Zhou et al. 2022, Eq. 2; DINOv2's `iBOTPatchLoss.forward_masked`).

    mask (B, N) bool, True = masked; student_logits (M, K) and teacher_probs (M, K) are the rows of the
    masked cells, M = mask.sum(), in row-major order of `mask` (what `x[mask]` gives for x (B, N, K)).
    Returns (1 / B) sum_b (1 / max(1, |m_b|)) sum_{n in m_b} -sum_k q_bnk log softmax(s_bn / student_temp)_k:
    the mean over each image's masked cells, then over all B images (unmasked images count as 0).
    """
    if student_logits.shape != teacher_probs.shape or student_logits.shape[0] != int(mask.sum()):
        raise ValueError(f"ibot_patch_loss: student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_probs.shape)} must be the (M, K) rows of the {int(mask.sum())} masked cells")
    per_token = -(teacher_probs.float().detach() * F.log_softmax(student_logits.float() / student_temp, -1)).sum(-1)
    per_image = 1.0 / mask.sum(1).clamp_min(1).float()                          # (B,)
    weight = per_image[:, None].expand_as(mask)[mask]                            # (M,)
    return (per_token * weight).sum() / mask.shape[0]


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets (Caron et al. 2020 SwAV; DINOv2's `sinkhorn_knopp_teacher`).

    teacher_logits (N, K) -> targets (N, K), each row a distribution. With P = exp(t / teacher_temp) as a
    (K, N) matrix normalised to sum 1, each of `n_iterations` rescales the prototype rows to sum 1 / K,
    then the sample columns to sum 1 / N_total; the result is N_total * P^T. In fp32; under
    torch.distributed every sum (total, row sums, N) is all-reduced over the processes, so the prototypes
    are balanced over the global batch. A global maximum is subtracted first (it cancels in the first
    normalisation) so exp cannot overflow.
    """
    logits = teacher_logits.detach().float()
    k = logits.shape[-1]
    shift = logits.amax() if logits.numel() else logits.new_tensor(-math.inf)
    shift = _all_reduce(shift.clone(), dist.ReduceOp.MAX if dist.is_available() else None)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    q = torch.exp((logits - shift) / teacher_temp).t()                          # (K, N)
    total = _all_reduce(logits.new_tensor(float(logits.shape[0])))
    q = q / _all_reduce(q.sum()).clamp_min(1e-30)
    for _ in range(n_iterations):  # a few fixed iterations, not a loop over samples
        q = q / _all_reduce(q.sum(1, keepdim=True)).clamp_min(1e-30) / k
        q = q / q.sum(0, keepdim=True).clamp_min(1e-30) / total
    return (q * total).t()


# ---- masks -------------------------------------------------------------------------------------------
def ibot_mask_ratios(batch: int, ratio: float, ratio_var: float, probability: float, sampling: str = "bernoulli",
                     *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(B,) float: the share of cells to mask in each image, 0 for images left unmasked.

    Ratios lie in [ratio - ratio_var, ratio + ratio_var]. sampling="bernoulli" (iBOT's ImageFolderMask with
    `--pred_ratio 0 r --pred_ratio_var 0 v`): each image is masked with `probability`, its ratio uniform;
    "stratified" (DINOv2's `collate_data_and_cast`): exactly int(B * probability) images are masked, their
    ratios one uniform draw in each of that many equal bins of the range, at random positions.
    """
    lo, hi = ratio - ratio_var, ratio + ratio_var
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"mask ratio range ({lo}, {hi}) must lie in [0, 1)")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"mask probability must be in [0, 1], got {probability}")
    kw = dict(generator=generator, device=device)
    u = torch.rand(batch, **kw)
    if sampling == "bernoulli":
        masked = torch.rand(batch, **kw) < probability
        return torch.where(masked, lo + u * (hi - lo), torch.zeros_like(u))
    if sampling == "stratified":
        n = int(batch * probability)
        idx = torch.arange(batch, device=u.device, dtype=torch.float32)
        width = (hi - lo) / max(n, 1)
        r = torch.where(idx < n, lo + (idx + u) * width, torch.zeros_like(u))
        return r[torch.randperm(batch, **kw)]
    raise ValueError(f"mask sampling must be one of {', '.join(MASK_SAMPLINGS)}, got {sampling!r}")


def ibot_block_masks(ratios: torch.Tensor, grid: Sequence[int], *, min_cells: int | None = None,
                     aspect: tuple[float, float] = (0.3, 1 / 0.3), num_blocks: int = 32,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Block-wise masks with a ratio per image (iBOT's `pred_shape="block"`, after BEiT): bool (B, *grid).

    ratios (B,) in [0, 1): image b hides round(ratios[b] * h * w) cells (fewer only if the blocks cannot
    cover that many). The reference adds rectangles one by one (area uniform in [min_cells, remaining],
    log-uniform aspect) until the target is reached; here `num_blocks` rectangles per image (area uniform
    in [min_cells, target]) are drawn at once and cells are taken in the order of the first rectangle that
    covers them, so the union of the first rectangles is hidden and the last one only in part. min_cells
    None: iBOT's (min(h, w) // 3) ** 2 (DINOv2: 4), at least 1. Video grids (t, h, w): one spatial mask
    for every time slice.
    """
    grid = tuple(int(g) for g in grid)
    h, w = grid[-2:]
    b, n, device = ratios.shape[0], h * w, ratios.device
    kw = dict(generator=generator, device=device)
    hidden = (ratios.float() * n).round().long().clamp(0, n - 1)                 # (B,)
    low = float(max(1, (min(h, w) // 3) ** 2 if min_cells is None else min_cells))
    high = hidden.float().clamp_min(low)[:, None]
    area = low + torch.rand(b, num_blocks, **kw) * (high - low)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ar = torch.exp(log_lo + torch.rand(b, num_blocks, **kw) * (log_hi - log_lo))
    bh = (area * ar).sqrt().round().clamp(1, h)
    bw = (area / ar).sqrt().round().clamp(1, w)
    top = (torch.rand(b, num_blocks, **kw) * (h - bh + 1)).floor()
    left = (torch.rand(b, num_blocks, **kw) * (w - bw + 1)).floor()
    ys = torch.arange(h, device=device).view(1, 1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, 1, w)
    inside = ((ys >= top[..., None, None]) & (ys < (top + bh)[..., None, None])
              & (xs >= left[..., None, None]) & (xs < (left + bw)[..., None, None])).flatten(2)  # (B, M, N)
    covered = inside.any(1)                                                      # (B, N)
    first = torch.where(covered, inside.float().argmax(1), torch.full_like(covered, num_blocks, dtype=torch.long))
    # earlier rectangles first, ties (cells of the same rectangle) broken at random
    score = first.float() + torch.rand(b, n, **kw) * 0.5
    rank = score.argsort(dim=1).argsort(dim=1)
    mask = ((rank < hidden[:, None]) & covered).view(b, h, w)
    if len(grid) == 3:
        mask = mask[:, None].expand(b, grid[0], h, w).contiguous()
    return mask


# ---- the objective -------------------------------------------------------------------------------------
class IBOT(Dino):
    """iBOT over any backbone with `mask_token`: images (B, C, H, W) or the launcher's views -> scalar loss.

    DINO's arguments, views and schedules (see `Dino`), with iBOT's values unless given (main_ibot.py):
    `num_classes_K` 8192 (`--out_dim`), `patch_prototypes` 8192 (`--patch_out_dim`; None: K),
    `shared_head` True (the released ViT-S/B runs; False: a separate DINO head for the patches),
    `teacher_temp` 0.04 -> `teacher_temp_final` 0.07 and `teacher_patch_temp` 0.04 ->
    `teacher_patch_temp_final` 0.07, both over `warmup_teacher_temp_steps` (default 30 % of the run),
    `global_lower_crop_scale` 0.14, `cls_loss_weight` / `patch_loss_weight` 1 (`--lambda1`, `--lambda2`),
    the patch centre's momentum `patch_center_momentum` 0.9 over every teacher patch token
    (`patch_center_over="all"`; "masked": the masked cells only, as DINOv2).
    Masks (ImageFolderMask): `mask_probability` 0.5 of the images (`--pred_ratio 0 0.3`), ratio
    `pred_ratio` 0.3 +- `pred_ratio_var` 0.2, `mask_sampling` "bernoulli" or "stratified", block shapes with
    `min_block_cells` None ((min(h, w) // 3) ** 2) and aspect `block_aspect` (0.3, 1 / 0.3); no masks before
    step `mask_start_step` (`--pred_start_epoch`). `centering` "ema" (iBOT) or "sinkhorn_knopp" with
    `sinkhorn_iterations` 3; `koleo_weight` 0 (DINOv2: 0.1).

    `collapse_loss()` is ln K (the image-level loss of a uniform output). Metrics: loss, cls_loss,
    patch_loss, koleo_loss, mask_ratio, the collapse monitor of the image-level targets, feature_rank (the
    teacher's pooled features of the global crops), teacher_temp,
    teacher_patch_temp, momentum.
    """

    requires = (frozenset({"mask_token"}),)

    def __init__(self, net: nn.Module, image_size: int | Sequence[int] | None = 224, *,
                 num_classes_K: int = 8192, patch_prototypes: int | None = 8192, shared_head: bool = True,
                 teacher_temp: float = 0.04, teacher_temp_final: float = 0.07, teacher_patch_temp: float = 0.04,
                 teacher_patch_temp_final: float = 0.07, global_lower_crop_scale: float = 0.14,
                 cls_loss_weight: float = 1.0, patch_loss_weight: float = 1.0, patch_center_momentum: float = 0.9,
                 patch_center_over: str = "all", mask_probability: float = 0.5, pred_ratio: float = 0.3,
                 pred_ratio_var: float = 0.2, mask_sampling: str = "bernoulli", min_block_cells: int | None = None,
                 block_aspect: Sequence[float] = (0.3, 1 / 0.3), mask_start_step: int = 0, centering: str = "ema",
                 sinkhorn_iterations: int = 3, **dino_args) -> None:
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {', '.join(CENTERINGS)}, got {centering!r}")
        if patch_center_over not in ("all", "masked"):
            raise ValueError(f"patch_center_over must be 'all' or 'masked', got {patch_center_over!r}")
        if mask_sampling not in MASK_SAMPLINGS:
            raise ValueError(f"mask_sampling must be one of {', '.join(MASK_SAMPLINGS)}, got {mask_sampling!r}")
        patch_k = num_classes_K if patch_prototypes is None else int(patch_prototypes)
        if shared_head and patch_k != num_classes_K:
            patch_k = num_classes_K  # one head, one set of prototypes (main_ibot.py: patch_out_dim ignored)
        self._patch_setup = (bool(shared_head), patch_k)  # read by build_extra_heads during Dino.__init__
        super().__init__(net, image_size, num_classes_K=num_classes_K, teacher_temp=teacher_temp,
                         teacher_temp_final=teacher_temp_final, global_lower_crop_scale=global_lower_crop_scale,
                         **dino_args)  # koleo_weight (0; DINOv2 0.1) is Dino's
        self.teacher_patch_temp_start, self.teacher_patch_temp_final = teacher_patch_temp, teacher_patch_temp_final
        self.teacher_patch_temp = teacher_patch_temp
        self.cls_loss_weight, self.patch_loss_weight = cls_loss_weight, patch_loss_weight
        self.patch_center_momentum, self.patch_center_over = patch_center_momentum, patch_center_over
        self.base_patch_center_momentum = patch_center_momentum
        self.mask_probability, self.pred_ratio, self.pred_ratio_var = mask_probability, pred_ratio, pred_ratio_var
        ibot_mask_ratios(1, pred_ratio, pred_ratio_var, mask_probability, mask_sampling)  # validate the range
        self.mask_sampling, self.min_block_cells = mask_sampling, min_block_cells
        self.block_aspect = (float(block_aspect[0]), float(block_aspect[1]))
        self.mask_start_step = int(mask_start_step)
        self.centering, self.sinkhorn_iterations = centering, int(sinkhorn_iterations)

    # ---- heads ------------------------------------------------------------------------------------------
    def build_extra_heads(self, dim: int, k: int, hidden: int, bottleneck: int, nlayers: int, norm_last: bool) -> None:
        self.shared_head, self.num_patch_prototypes = self._patch_setup
        if not self.shared_head:
            self.patch_head = DINOHead(dim, self.num_patch_prototypes, hidden, bottleneck, nlayers=nlayers,
                                       norm_last_layer=norm_last, init_std=self.head_init_std)
        self.register_buffer("patch_center", torch.zeros(self.num_patch_prototypes))
        self.register_buffer("patch_center_started", torch.zeros((), dtype=torch.bool))

    def student_modules(self) -> dict[str, nn.Module]:
        mods = super().student_modules()
        return mods if self.shared_head else {**mods, "patch_head": self.patch_head}

    def last_layers(self) -> list[nn.Module]:
        return [self.head.last_layer] if self.shared_head else [self.head.last_layer, self.patch_head.last_layer]

    def _patch_heads(self) -> tuple[DINOHead, DINOHead]:
        key = "head" if self.shared_head else "patch_head"
        return (self.head if self.shared_head else self.patch_head), self.teacher[key]

    # ---- masks ------------------------------------------------------------------------------------------
    def make_masks(self, batch: int, grid: Sequence[int], device: torch.device) -> torch.Tensor:
        """(batch, *grid) bool block masks for the student's global crops (none before mask_start_step)."""
        ratios = ibot_mask_ratios(batch, self.pred_ratio, self.pred_ratio_var, self.mask_probability,
                                  self.mask_sampling, device=device)
        if self._next_step < self.mask_start_step:
            ratios = torch.zeros_like(ratios)
        return ibot_block_masks(ratios, grid, min_cells=self.min_block_cells, aspect=self.block_aspect)

    # ---- training ---------------------------------------------------------------------------------------
    def targets(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        """Teacher targets (..., K): softmax((t - c) / temp) or Sinkhorn-Knopp over all rows."""
        if self.centering == "sinkhorn_knopp":
            flat = logits.reshape(-1, logits.shape[-1])
            return sinkhorn_knopp(flat, temp, self.sinkhorn_iterations).view_as(logits)
        return F.softmax((logits.float() - center.float()) / temp, dim=-1)

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """images (B, C, H, W) (standalone: the views are made here) or the views [global_1, global_2,
        local x N], each (B, C, h, w). Returns the scalar loss."""
        views = self._views(images)
        g, batch = self.num_global_crops, views[0].shape[0]
        x = torch.cat(views[:g])                                                 # (G*B, C, H, W)
        grid = self.backbone.mask_grid(x.shape[2:])
        mask = self.make_masks(x.shape[0], grid, x.device)
        student = self.backbone.forward_features(x, mask=mask)
        local = encode_views(self.backbone, views[g:]) if len(views) > g else []
        with torch.no_grad():
            teacher = self.teacher_backbone.forward_features(x)
        loss, metrics = self.compute_ibot_loss(student, local, teacher, mask.flatten(1), batch)
        metrics["feature_rank"] = effective_rank(teacher.pooled)
        names = ["loss", *metrics]
        values = torch.stack([loss.detach().float(), *(m.float() for m in metrics.values())]).tolist()  # one sync
        self.metrics = {**dict(zip(names, values)), "teacher_temp": self.teacher_temp,
                        "teacher_patch_temp": self.teacher_patch_temp, "momentum": self.momentum}
        return loss

    def compute_ibot_loss(self, student: BackboneOutput, local: list[tuple[int, BackboneOutput]],
                          teacher: BackboneOutput, mask: torch.Tensor,
                          batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and 0-d metrics from the student's masked globals (G*B rows), its local groups, the teacher's
        globals and the flat mask (G*B, N)."""
        g, k = self.num_global_crops, self.num_prototypes
        if student.patch_tokens.shape[1] != mask.shape[1]:
            raise InputShapeError(f"{type(self).__name__} needs one final token per mask cell: "
                                  f"{type(self.backbone).__name__} gave {student.patch_tokens.shape[1]} tokens for "
                                  f"{mask.shape[1]} mask cells")
        pooled = torch.cat([student.pooled, *(out.pooled for _, out in local)])
        s_logits = self.head(pooled).view(-1, batch, k)                          # (V, B, K)
        with torch.no_grad():
            t_logits = self.teacher["head"](teacher.pooled).view(g, batch, k)  # (G, B, K)
            t_probs = self.targets(t_logits, self.center, self.teacher_temp)
        cls_loss = multicrop_cross_entropy(s_logits, t_probs, self.student_temp)

        s_head, t_head = self._patch_heads()
        s_patch = s_head(student.patch_tokens[mask])                             # (M, Kp)
        with torch.no_grad():
            every = self.centering == "ema" and self.patch_center_over == "all"
            t_proj = t_head.project(teacher.patch_tokens if every else teacher.patch_tokens[mask])
            t_patch = t_head.last_layer(t_proj[mask] if every else t_proj)       # (M, Kp)
            t_patch_probs = self.targets(t_patch, self.patch_center, self.teacher_patch_temp)
        patch_loss = ibot_patch_loss(s_patch, t_patch_probs, mask, self.student_temp)

        loss = self.cls_loss_weight * cls_loss + self.patch_loss_weight * patch_loss
        metrics = {"cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach()}
        loss = self.add_koleo(loss, metrics, student.pooled, batch)
        metrics["mask_ratio"] = mask.float().mean()
        center = self.center if self.centering == "ema" else torch.zeros_like(self.center)
        metrics.update(self.collapse_metrics(s_logits, t_logits, center))
        if self.training and self.centering == "ema":
            with torch.no_grad():
                update_center_(self.center, t_logits, self.center_momentum, self.center_started)
                # the last layer is linear: the logits of each image's mean projection average its tokens
                rows = t_head.last_layer(t_proj.mean(1)) if every else t_patch
                update_center_(self.patch_center, rows, self.patch_center_momentum, self.patch_center_started)
        return loss, metrics

    # ---- schedules ----------------------------------------------------------------------------------------
    def teacher_patch_temp_at(self, step: int, total_steps: int) -> float:
        warmup = self.warmup_teacher_temp_steps
        if warmup is None:
            warmup = int(round(0.3 * total_steps))
        return linear_warmup(step, warmup, self.teacher_patch_temp_start, self.teacher_patch_temp_final)

    def on_step_end(self, step: int, total_steps: int) -> None:
        super().on_step_end(step, total_steps)
        self.teacher_patch_temp = self.teacher_patch_temp_at(step + 1, total_steps)
        self.patch_center_momentum = self.center_momentum_at(total_steps, self.base_patch_center_momentum)

    def on_resume(self, step: int, total_steps: int) -> None:
        super().on_resume(step, total_steps)
        self.teacher_patch_temp = self.teacher_patch_temp_at(step, total_steps)
        self.patch_center_momentum = self.center_momentum_at(total_steps, self.base_patch_center_momentum)


register_objective("ibot", IBOT)
