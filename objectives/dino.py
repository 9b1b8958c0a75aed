"""DINO: self-distillation with no labels (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers", arXiv:2104.14294).

A student (backbone + DINO head) sees two global crops and N local crops (10 by default); a teacher
(an EMA copy of both, no gradients) sees the two global crops. The student's softmax over K
prototypes (temperature 0.1) is trained to match the teacher's centred, sharpened softmax
(temperature 0.04) for every pair of different views. The centre is an EMA (momentum 0.9, started at
the first batch's mean) of the teacher's mean output, the teacher momentum follows a cosine schedule
m0 -> 1 (m0 = 0.996 for runs of 2500 steps or more, lower for shorter runs:
`objectives.ema.run_scaled_momentum`, with the centre's momentum lowered alike), and the prototype
layer is frozen for the first 1 % of the steps (DINO's first epoch of 100).

Crops of the same size go through the backbone in one batch (one pass for the globals, one for the
locals), and the loss over all view pairs is one vectorised expression. Video backbones get global and
local spatial crops of the same clip, each view sampling its own frames (`ViewSpec.frames`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssl_vit import Backbone, BackboneOutput, Objective, ViewSpec, register_objective

from .ema import (
    cosine_schedule,
    ema_update_,
    frozen_copy,
    linear_warmup,
    run_scaled_center_momentum,
    run_scaled_momentum,
)
from .heads import DINOHead
from .views import make_views

__all__ = ["Dino", "dino_loss", "dino_view_specs", "encode_views", "koleo_loss", "view_agreement"]

log = logging.getLogger(__name__)


def dino_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """DINO's multi-crop cross-entropy.

    student_logits (V, B, K): every view, the G global views first; teacher_logits (G, B, K) of the
    global views; center (K,). Mean over the G * (V - 1) pairs (teacher view i, student view v != i)
    of mean_b H(softmax((t_i - c) / teacher_temp), softmax(s_v / student_temp)).

    The sum over student views is taken once, and each teacher view subtracts its own (same-view)
    term: one pass over the (V, B, K) tensor instead of a loop over view pairs.
    """
    g, v = teacher_logits.shape[0], student_logits.shape[0]
    if g > v or student_logits.shape[1:] != teacher_logits.shape[1:]:
        raise ValueError(f"dino_loss: student (V, B, K) {tuple(student_logits.shape)} and teacher (G, B, K) "
                         f"{tuple(teacher_logits.shape)} must share B and K with G <= V")
    if v < 2:
        raise ValueError("dino_loss needs at least two views")
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)                       # (V, B, K)
    q = F.softmax((teacher_logits.float() - center.float()) / teacher_temp, dim=-1).detach()    # (G, B, K)
    others = log_p.sum(0, keepdim=True) - log_p[:g]                                           # (G, B, K)
    n_terms = g * (v - 1)
    return -(q * others).sum(-1).mean(-1).sum() / n_terms


@torch.no_grad()
def update_center_(center: torch.Tensor, rows: torch.Tensor, momentum: float,
                   started: torch.Tensor | None = None) -> None:
    """center <- m * center + (1 - m) * mean of rows (..., K) over every process; unchanged when no process
    has a row (iBOT's masked-token centre of a batch without masks).

    `started` (0-d bool buffer), when given: while it is False, the first batch with rows sets the centre to
    its mean and sets the flag. DINO starts its EMA at zero, a bias that fades over ~1 / (1 - m) steps (10 at
    0.9): nothing in a 125 k-step run, the first 15 % of a 68-step one. No device sync either way.
    """
    flat = rows.detach().reshape(-1, rows.shape[-1]).float()
    stats = torch.cat([flat.sum(0), flat.new_tensor([float(flat.shape[0])])])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    count = stats[-1]
    mean = stats[:-1] / count.clamp_min(1.0)
    updated = momentum * center + (1.0 - momentum) * mean
    if started is not None:
        updated = torch.where(started, updated, mean)
        started.logical_or_(count > 0)
    center.copy_(torch.where(count > 0, updated, center))


@torch.no_grad()
def teacher_collapse_stats(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """The collapse monitor of DINO's targets (Caron et al. 2021, Sec. 5.3 "Avoiding collapse").

    teacher_logits (..., K), center (K,). With q = softmax((t - c) / teacher_temp) per row and q_bar the
    mean of q over all rows, returns a float tensor (2,) in nats:
    [mean_rows H(q), KL(q_bar || uniform) = ln K - H(q_bar)].
    Collapse to a uniform output drives the first to ln K (every target uniform); collapse to one
    prototype drives the second to ln K (every target the same one-hot), with the first near 0. Learning
    targets are sharp (the first well below ln K) and spread over the prototypes (the second well below
    ln K). Computed on this process's rows.
    """
    k = teacher_logits.shape[-1]
    log_q = F.log_softmax((teacher_logits.detach().reshape(-1, k).float() - center.float()) / teacher_temp, dim=-1)
    q = log_q.exp()                                                                            # (N, K)
    entropy = -(q * log_q).sum(-1).mean()
    q_bar = q.mean(0)
    kl = (q_bar * (q_bar.clamp_min(1e-30).log() + math.log(k))).sum()
    return torch.stack([entropy, kl])


@torch.no_grad()
def view_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """How much of the teacher's image-to-image variation the student's other views carry: a 0-d float.

    student_logits (V, B, K), the G global views first; teacher_logits (G, B, K). Each view's logits are
    centred over the batch (what DINO's centre removes) and over the prototypes (what a softmax ignores);
    over the loss's pairs (teacher view i, student view v != i) returns
    sum <t_i, s_v> / sum |s_v|^2, the slope of the teacher's centred logits regressed on the student's.

    Near a uniform output the loss's gradient pushes each student logit towards t / teacher_temp - s /
    student_temp, so the spread of the targets grows when this slope exceeds teacher_temp / student_temp
    (0.4 for DINO) and shrinks towards a uniform output when it is below: the balance of sharpening and
    centring of Caron et al. 2021 (Sec. 5.3), read on the views a run actually uses. Views that change an
    image more than images differ from one another (strong brightness jitter on grey digits) give a slope
    near 0 at random init. Computed on this process's rows.
    """
    s = student_logits.detach().float()
    t = teacher_logits.detach().float()
    s = s - s.mean(1, keepdim=True)
    s = s - s.mean(-1, keepdim=True)
    t = t - t.mean(1, keepdim=True)
    t = t - t.mean(-1, keepdim=True)
    g = t.shape[0]
    cross = (t * (s.sum(0, keepdim=True) - s[:g])).sum()    # sum over i of sum over v != i of <t_i, s_v>
    power = g * s.square().sum() - s[:g].square().sum()     # sum over i of sum over v != i of |s_v|^2
    return cross / power.clamp_min(1e-12)


@torch.no_grad()
def effective_rank(features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Effective rank (Roy and Vetterli 2007; RankMe, Garrido et al. 2023, eq. 1) of the centred features
    (N, D): exp of the entropy of their normalised singular values, a 0-d float tensor in [1, min(N - 1, D)].

    The monitor of dimensional collapse (Jing et al. 2022, arXiv:2110.09348): the features' spread shrinks
    to a few directions while the targets stay sharp and spread, which `teacher_collapse_stats` does not
    see. Centred, unlike RankMe, because a ViT's pooled features share a large common component (at random
    init it alone makes the uncentred rank ~4 of 192 on the digits); the spread around it is what collapses.
    A batch estimate is capped by N; its fall from the run's own peak is what the monitor reads.
    """
    x = features.detach().float()
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum().clamp_min(1e-12) + eps
    return torch.exp(-(p * p.log()).sum())


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al. 2019; DINOv2's `KoLeoLoss`, Oquab et al. 2023, Sec. 4).

    x (..., B, D): features, one set of B per leading index -> (...,): -(1 / B) sum_i log d_i, where d_i is
    the Euclidean distance from the l2-normalised x_i to its nearest other point of its set. Computed in
    fp32 with autocast off; d_i is clamped at `eps` so duplicate points give a finite value (-log eps) and
    zero gradient instead of inf (the reference's `log(d + eps)` reaches inf in half precision). Sets of
    fewer than two points give 0.
    """
    b = x.shape[-2]
    if b < 2:
        return x.new_zeros(x.shape[:-2], dtype=torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = F.normalize(x.float(), dim=-1, eps=eps)
        dots = z @ z.transpose(-1, -2)                                           # (..., B, B)
        eye = torch.eye(b, dtype=torch.bool, device=x.device)
        nearest = dots.masked_fill(eye, -math.inf).argmax(-1)                   # (..., B)
        neighbour = torch.gather(z, -2, nearest[..., None].expand_as(z))
        dist2 = (z - neighbour).pow(2).sum(-1)
        return -0.5 * dist2.clamp_min(eps * eps).log().mean(-1)


def _started_centres_of_older_checkpoints(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """A state dict written before the `*_started` flags of the centres existed holds centres that are running."""
    for name, buffer in module.named_buffers(recurse=False):
        if name.endswith("center_started") and prefix + name not in state_dict:
            state_dict[prefix + name] = torch.ones_like(buffer)


DINO_GLOBAL_SIZE, DINO_LOCAL_SIZE = 224, 96  # the crop sides DINO's recipe is stated for


def scaled_size(size: Sequence[int], numerator: int, denominator: int, multiple: int) -> tuple[int, ...]:
    """size * numerator / denominator, each side rounded to a multiple of `multiple` (at least one)."""
    return tuple(max(multiple, int(round(s * numerator / denominator / multiple)) * multiple) for s in size)


def dino_view_specs(global_size: tuple[int, int], local_size: tuple[int, int], num_local: int,
                    global_scale: tuple[float, float] = (0.4, 1.0),
                    local_scale: tuple[float, float] = (0.05, 0.4), frames: int | None = None,
                    photometric: bool = True) -> list[ViewSpec]:
    """DINO's augmentation recipe: flip, colour jitter 0.8, grayscale 0.2; blur 1.0 / 0.1 / 0.5 and
    solarize 0 / 0.2 / 0 for global crop 1 / global crop 2 / local crops.
    photometric=False: crops and flips only (grey images such as the demo digits, where brightness and
    contrast jitter, blur and solarize change little but what a random teacher's output depends on most).

    frames: video: every view samples this many frames of the clip on its own (ViewSpec.frames), with
    one spatial crop for all its frames (as in SVT, Ranasinghe et al. 2022).

    The blur's sigma, 0.1-2.0 px for 224 px global crops in DINO (`GaussianBlur(radius_min=0.1,
    radius_max=2.)`, as BYOL's), scales with the global crop: 0.014-0.29 px at 32 px. Unscaled, a 2 px blur
    on a 32 px view is a 14 px one at 224 and erases strokes and edges a few pixels wide."""
    blur_sigma = tuple(s * min(global_size) / DINO_GLOBAL_SIZE for s in (0.1, 2.0))
    common = dict(hflip=0.5, color_jitter=0.8, jitter=(0.4, 0.4, 0.2, 0.1), grayscale=0.2, blur_sigma=blur_sigma,
                  frames=frames)
    if not photometric:
        common.update(color_jitter=0.0, grayscale=0.0)
    blur = (1.0, 0.1, 0.5) if photometric else (0.0, 0.0, 0.0)
    solarize = 0.2 if photometric else 0.0
    specs = [
        ViewSpec("global_1", 1, tuple(global_size), scale=global_scale, blur=blur[0], **common),
        ViewSpec("global_2", 1, tuple(global_size), scale=global_scale, blur=blur[1], solarize=solarize, **common),
    ]
    if num_local > 0:
        specs.append(ViewSpec("local", num_local, tuple(local_size), scale=local_scale, blur=blur[2], **common))
    return specs


def encode_views(backbone: nn.Module, views: Sequence[torch.Tensor]) -> list[tuple[int, BackboneOutput]]:
    """Run consecutive views of the same shape through the backbone as one batch.

    views: V tensors (B, C, ...). Returns (number of views, BackboneOutput over n*B samples) per
    group, view-major (sample i of view j is row j * B + i).
    """
    groups: list[list[torch.Tensor]] = []
    for view in views:
        if groups and groups[-1][0].shape == view.shape:
            groups[-1].append(view)
        else:
            groups.append([view])
    out = []
    for group in groups:
        batch = group[0] if len(group) == 1 else torch.cat(group)
        out.append((len(group), backbone.forward_features(batch)))
    return out


class Dino(Objective):
    """DINO over any backbone: (B, C, H, W) images, or the launcher's views -> scalar loss.

    Seed arguments (vit-pytorch's `Dino`) keep their names; the values are DINO's unless given:
    `projection_hidden_size` the head's hidden width (2048), `projection_layers` linear layers of the
    head counting the prototype layer (4: a 3-layer MLP + prototypes), `num_classes_K` prototypes
    (65536), `student_temp` 0.1, `teacher_temp` the temperature the warm-up starts from (0.04; it ends at
    `teacher_temp_final`, 0.04 too, after `warmup_teacher_temp_steps`, default 30 % of training),
    `moving_average_decay` the teacher momentum at step 0 of a long run (0.996, cosine to
    `final_momentum` 1), `center_moving_average_decay` 0.9, crop scales (0.4, 1) and
    (0.05, `local_upper_crop_scale`). `hidden_layer` is accepted and ignored: features come from
    `forward_features(...).pooled`. `augment_fn`/`augment_fn2`, if given, are applied to the batch
    before the crops of global view 1 (and the local crops) / global view 2, on top of DINO's recipe.
    `photometric_augment=False` keeps the crops and flips only; `head_init_std` see `DINOHead.init_std`;
    `use_bn_in_head` batch norm in the head's MLP (DINO's `--use_bn_in_head`; the teacher's use batch
    statistics while training, as DINO's); `koleo_weight` adds DINOv2's KoLeo regulariser on the student's
    pooled global crops (`koleo_loss`, Oquab et al. 2023; 0, DINO's loss alone, unless given).

    Schedules are functions of (step, total_steps), so one recipe serves a 68-step run and a
    125 k-step one:
    - teacher momentum: cosine from m0 to 1, m0 = `run_scaled_momentum(moving_average_decay, total,
      ema_time_fraction)`: DINO's 0.996 for runs of 2500 steps and more, lower for shorter ones so that
      the EMA's time constant is at most 10 % of the run (`ema_time_fraction=None`: 0.996 always).
      The teacher is what gets exported, and a teacher left near its random initialisation gives the
      random network's targets: on images whose random features barely differ (grey digits: the
      per-image part is ~10 % of the pooled feature) centring turns those into uniform ones.
    - centre momentum: `center_moving_average_decay` (0.9) while the teacher keeps 0.996; lowered with
      the teacher so that the centre stays 25x faster than it, as in DINO (`center_momentum_at`): a
      centre slower than the teacher sends every image to one prototype.
    - teacher temperature: 0.04 throughout, the reference code's default (`--teacher_temp 0.04`,
      no warm-up); DINO's longer ViT-S runs warm up to 0.07 over 30 % of training
      (`teacher_temp_final=0.07`).
    - prototype layer frozen for `freeze_last_layer_steps` (default: 1 % of the run, DINO's first
      epoch of 100, at least one step).

    `self.metrics` holds every step: loss, teacher_temp, momentum and the collapse monitor
    `teacher_entropy` / `kl_to_uniform` (`teacher_collapse_stats`) and `feature_rank` (`effective_rank` of the
    teacher's centred pooled features of the global crops), `view_agreement` (`view_agreement`) with the
    `agreement_needed` for the targets to sharpen (teacher_temp / student_temp); `collapse_loss()` is ln K,
    the loss of a uniform output.
    """

    requires = (frozenset(),)
    exports_teacher = True  # the EMA teacher is what gets exported
    num_global_crops = 2

    def __init__(
        self,
        net: Backbone,
        image_size: int | Sequence[int] | None = 224,
        hidden_layer: str | int | None = None,
        projection_hidden_size: int = 2048,
        num_classes_K: int = 65536,
        projection_layers: int = 4,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        local_upper_crop_scale: float = 0.4,
        global_lower_crop_scale: float = 0.4,
        moving_average_decay: float = 0.996,
        center_moving_average_decay: float = 0.9,
        augment_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        augment_fn2: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        num_local_crops: int = 10,
        local_crop_size: int | Sequence[int] | None = None,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        teacher_temp_final: float = 0.04,
        warmup_teacher_temp_steps: int | None = None,
        final_momentum: float = 1.0,
        ema_time_fraction: float | None = 0.1,
        freeze_last_layer_steps: int | None = None,
        head_init_std: float | None = 0.02,
        photometric_augment: bool = True,
        use_bn_in_head: bool = False,
        koleo_weight: float = 0.0,
    ) -> None:
        super().__init__(net)
        if projection_layers < 2:
            raise ValueError(f"projection_layers counts the prototype layer and must be >= 2, got {projection_layers}")
        if num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {num_local_crops}")
        self.backbone = net
        spatial = tuple(net.default_size[-2:])
        if image_size is None:
            self.global_size = spatial
        else:
            self.global_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        net.check_size(self.global_size)
        m = net.size_multiple
        if local_crop_size is None:  # 96 px at 224 px, scaled and rounded to what the backbone accepts
            self.local_size = scaled_size(self.global_size, DINO_LOCAL_SIZE, DINO_GLOBAL_SIZE, m)
        else:
            self.local_size = ((local_crop_size, local_crop_size) if isinstance(local_crop_size, int)
                               else tuple(local_crop_size))
        net.check_size(self.local_size)
        self.num_local_crops = num_local_crops
        self.global_scale = (global_lower_crop_scale, 1.0)
        self.local_scale = (0.05, local_upper_crop_scale)
        self.augment_fn, self.augment_fn2 = augment_fn, augment_fn2
        self.photometric_augment = photometric_augment
        self.head_init_std = head_init_std
        self.use_bn_in_head = use_bn_in_head
        self.koleo_weight = float(koleo_weight)
        if hidden_layer is not None:
            log.debug("%s ignores hidden_layer=%r: features come from forward_features", type(self).__name__,
                      hidden_layer)

        self.num_prototypes = num_classes_K
        self.head = DINOHead(net.embed_dim, num_classes_K, projection_hidden_size, bottleneck_dim,
                             nlayers=projection_layers - 1, norm_last_layer=norm_last_layer, init_std=head_init_std,
                             use_bn=use_bn_in_head)
        self.build_extra_heads(net.embed_dim, num_classes_K, projection_hidden_size, bottleneck_dim,
                               projection_layers - 1, norm_last_layer)
        self.teacher = frozen_copy(nn.ModuleDict(self.student_modules()))
        self.register_buffer("center", torch.zeros(num_classes_K))
        self.register_buffer("center_started", torch.zeros((), dtype=torch.bool))

        self.student_temp = student_temp
        self.teacher_temp_start, self.teacher_temp_final = teacher_temp, teacher_temp_final
        self.warmup_teacher_temp_steps = warmup_teacher_temp_steps
        self.base_momentum, self.final_momentum = moving_average_decay, final_momentum
        self.ema_time_fraction = ema_time_fraction
        self.base_center_momentum = self.center_momentum = center_moving_average_decay
        self.freeze_last_layer_steps = freeze_last_layer_steps
        # schedule state: a buffer so checkpoints resume it, mirrored in Python to avoid device syncs
        self.register_buffer("next_step", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_schedule())
        self.register_load_state_dict_pre_hook(_started_centres_of_older_checkpoints)
        self.momentum = moving_average_decay
        self.teacher_temp = teacher_temp
        self._next_step = 0

    # ---- pieces EsViT extends -------------------------------------------------------------------
    def build_extra_heads(self, dim: int, k: int, hidden: int, bottleneck: int, nlayers: int, norm_last: bool) -> None:
        """Heads beyond the view-level one (EsViT's region head)."""

    def student_modules(self) -> dict[str, nn.Module]:
        """The modules the teacher copies and follows by EMA."""
        return {"backbone": self.backbone, "head": self.head}

    @property
    def teacher_backbone(self) -> nn.Module:
        return self.teacher["backbone"]

    # ---- views --------------------------------------------------------------------------------
    def view_specs(self) -> list[ViewSpec]:
        frames = int(self.backbone.default_size[0]) if self.backbone.is_video else None
        return dino_view_specs(self.global_size, self.local_size, self.num_local_crops, self.global_scale,
                               self.local_scale, frames, self.photometric_augment)

    def make_own_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        specs = self.view_specs()
        if self.augment_fn is None and self.augment_fn2 is None:
            return make_views(images, specs)
        first = self.augment_fn(images) if self.augment_fn is not None else images
        second = self.augment_fn2(images) if self.augment_fn2 is not None else images
        views = make_views(first, specs[:1]) + make_views(second, specs[1:2])
        return views + (make_views(first, specs[2:]) if len(specs) > 2 else [])

    def _views(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        views = self.make_own_views(images) if isinstance(images, torch.Tensor) else list(images)
        want = self.num_global_crops + self.num_local_crops
        if len(views) != want:
            raise ValueError(f"{type(self).__name__} expects {want} views (2 global + {self.num_local_crops} local) "
                             f"in view_specs() order, got {len(views)}")
        return views

    # ---- training -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """images (B, C, H, W) (standalone: DINO's views are made here) or the list of views
        [global_1, global_2, local x N], each (B, C, h, w). Returns the scalar loss."""
        views = self._views(images)
        g = self.num_global_crops
        student = encode_views(self.backbone, views)
        with torch.no_grad():
            teacher = encode_views(self.teacher_backbone, views[:g])
        batch = views[0].shape[0]
        loss, metrics = self.compute_loss(student, teacher, batch)
        loss = self.add_koleo(loss, metrics, student[0][1].pooled[: g * batch], batch)
        metrics["feature_rank"] = effective_rank(teacher[0][1].pooled)  # the globals' pooled features
        names = ["loss", *metrics]
        values = torch.stack([loss.detach().float(), *(m.float() for m in metrics.values())]).tolist()  # one sync
        self.metrics = {**dict(zip(names, values)), "teacher_temp": self.teacher_temp, "momentum": self.momentum}
        return loss

    def compute_loss(self, student: list[tuple[int, BackboneOutput]], teacher: list[tuple[int, BackboneOutput]],
                     batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and 0-d metric tensors from the grouped backbone outputs of the student (all views) and
        teacher (globals)."""
        s_logits, t_logits = self.view_logits(student, teacher, batch)
        loss = dino_loss(s_logits, t_logits, self.center, self.student_temp, self.teacher_temp)
        metrics = self.collapse_metrics(s_logits, t_logits, self.center)
        if self.training:
            update_center_(self.center, t_logits, self.center_momentum, self.center_started)
        return loss, metrics

    def add_koleo(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], pooled: torch.Tensor,
                  batch: int) -> torch.Tensor:
        """`loss` plus `koleo_weight` x KoLeo of the student's pooled global crops (G*B, D), one set per crop,
        summed over the crops (DINOv2's `koleo_loss(p) for p in student_cls_tokens.chunk(2)`); the term goes
        into `metrics["koleo_loss"]`. `loss` unchanged at weight 0."""
        if not self.koleo_weight:
            return loss
        koleo = koleo_loss(pooled.view(self.num_global_crops, batch, -1)).sum()
        metrics["koleo_loss"] = koleo.detach()
        return loss + self.koleo_weight * koleo

    def collapse_metrics(self, s_logits: torch.Tensor, t_logits: torch.Tensor,
                         center: torch.Tensor) -> dict[str, torch.Tensor]:
        """`teacher_entropy` and `kl_to_uniform` of the targets made from t_logits (G, B, K) and center (K,);
        `view_agreement` of s_logits (V, B, K) and t_logits, and the level it needs, `agreement_needed`
        (teacher_temp / student_temp)."""
        entropy, kl = teacher_collapse_stats(t_logits, center, self.teacher_temp)
        return {"teacher_entropy": entropy, "kl_to_uniform": kl, "view_agreement": view_agreement(s_logits, t_logits),
                "agreement_needed": entropy.new_tensor(self.teacher_temp / self.student_temp)}

    def collapse_loss(self) -> float:
        """ln K: the loss when student and teacher outputs are uniform over the K prototypes."""
        return math.log(self.num_prototypes)

    def no_weight_decay(self) -> set[str]:
        """DINO's parameter groups (`utils.get_params_groups` of the reference code): only biases and 1-d
        parameters (norm scales, the weight-norm gain) are exempt; positional embeddings and class or
        register tokens are decayed like weights."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith(".bias")}

    def view_logits(self, student, teacher, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Student (V, B, K) and teacher (G, B, K) prototype logits of the pooled features."""
        pooled = torch.cat([out.pooled for _, out in student])
        s_logits = self.head(pooled).view(-1, batch, self.num_prototypes)
        with torch.no_grad():
            t_pooled = torch.cat([out.pooled for _, out in teacher])
            t_logits = self.teacher["head"](t_pooled).view(-1, batch, self.num_prototypes)
        return s_logits, t_logits

    # ---- schedules ------------------------------------------------------------------------------
    def _sync_schedule(self, total_steps: int | None = None) -> None:
        self._next_step = int(self.next_step)
        if total_steps is not None:
            self.teacher_temp = self.teacher_temp_at(self._next_step, total_steps)

    def on_resume(self, step: int, total_steps: int) -> None:
        """After a checkpoint load: continue the schedules at `step` of `total_steps` (the state dict
        holds the step counter, not the total the temperature warm-up depends on)."""
        self._next_step = int(step)
        self.next_step.fill_(int(step))
        self.teacher_temp = self.teacher_temp_at(step, total_steps)
        self.momentum = self.momentum_at(max(step - 1, 0), total_steps)
        self.center_momentum = self.center_momentum_at(total_steps)

    def teacher_temp_at(self, step: int, total_steps: int) -> float:
        warmup = self.warmup_teacher_temp_steps
        if warmup is None:  # DINO warms up over 30 of 100 epochs
            warmup = int(round(0.3 * total_steps))
        return linear_warmup(step, warmup, self.teacher_temp_start, self.teacher_temp_final)

    def momentum_at(self, step: int, total_steps: int) -> float:
        start = run_scaled_momentum(self.base_momentum, total_steps, self.ema_time_fraction)
        return cosine_schedule(step, total_steps, start, self.final_momentum)

    def center_momentum_at(self, total_steps: int, base: float | None = None) -> float:
        """The centre momentum of a run of `total_steps` (`base`: the unscaled one, default
        `center_moving_average_decay`): as fast relative to the teacher as DINO's
        (`run_scaled_center_momentum`)."""
        start = run_scaled_momentum(self.base_momentum, total_steps, self.ema_time_fraction)
        base = self.base_center_momentum if base is None else base
        return run_scaled_center_momentum(base, self.base_momentum, start)

    def update_moving_average(self) -> None:
        """One EMA step of the teacher (backbone and heads) at the current momentum (seed name)."""
        ema_update_(self.teacher, nn.ModuleDict(self.student_modules()), self.momentum)

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Teacher EMA at the cosine momentum of `step`; teacher temperature for the next step."""
        self.momentum = self.momentum_at(step, total_steps)
        self.center_momentum = self.center_momentum_at(total_steps)
        self.update_moving_average()
        self._next_step = step + 1
        self.next_step.fill_(step + 1)
        self.teacher_temp = self.teacher_temp_at(step + 1, total_steps)

    def frozen_last_layer_steps(self, total_steps: int) -> int:
        if self.freeze_last_layer_steps is None:  # DINO: the first epoch of 100
            return max(1, math.ceil(total_steps / 100))
        return self.freeze_last_layer_steps

    def last_layers(self) -> list[nn.Module]:
        return [self.head.last_layer]

    def on_before_optimizer_step(self, step: int, total_steps: int) -> None:
        """Drop the prototype layers' gradients during the first epoch (DINO's freeze_last_layer)."""
        if step < self.frozen_last_layer_steps(total_steps):
            for layer in self.last_layers():
                for p in layer.parameters():
                    p.grad = None

    def train(self, mode: bool = True) -> Dino:
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout or drop path
        for m in self.teacher.modules():  # ... but its head's batch norms use batch statistics, as DINO's
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(mode)
        return self

    def export_backbone(self) -> nn.Module:
        """The teacher's backbone: DINO evaluates and releases the teacher."""
        return self.teacher_backbone


register_objective("dino", Dino)
