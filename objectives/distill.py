"""Knowledge distillation through a distillation token (DeiT: Touvron et al. 2021, "Training
data-efficient image transformers & distillation through attention", arXiv:2012.12877).

The student is any backbone. A learned distillation token is appended to its prefix tokens
(`forward_features(..., extra_tokens=...)`, the `extra_tokens` capability); its output feeds a
distillation head trained towards the teacher, while the class prediction (from the pooled
features) is trained on the labels:

    loss = (1 - alpha) * CE(class logits, labels) + alpha * distillation loss
    soft: T^2 * KL(softmax(teacher / T) || softmax(dist logits / T))   (Hinton et al. 2015)
    hard: CE(dist logits, argmax teacher)                               (DeiT's "hard" distillation)

Backbones without `extra_tokens` fall back to a distillation head on the pooled features (logged).
The teacher is any frozen module returning logits (B, num_classes), e.g. a torchvision ResNet-50.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ssl_vit import EXTRA_TOKENS, Backbone, Objective, ViewSpec, create_backbone, register_objective

from .views import make_views

__all__ = ["DistillWrapper", "distillation_loss"]

log = logging.getLogger(__name__)


def distillation_loss(class_logits: torch.Tensor, distill_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, *, temperature: float = 1.0, alpha: float = 0.5,
                      hard: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeiT's objective. class_logits, distill_logits, teacher_logits (B, K); labels (B,) long.

    Returns (total, cross-entropy on labels, distillation term).
    """
    ce = F.cross_entropy(class_logits.float(), labels)
    teacher_logits = teacher_logits.detach().float()
    if hard:
        distill = F.cross_entropy(distill_logits.float(), teacher_logits.argmax(dim=-1))
    else:
        t = temperature
        distill = F.kl_div(F.log_softmax(distill_logits.float() / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                           reduction="batchmean", log_target=True) * (t * t)
    return (1 - alpha) * ce + alpha * distill, ce, distill


class _Classifier(nn.Module):
    """backbone + head as one logits module (the frozen `teacher="student_copy"`)."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone.forward_features(x).pooled
        return self.backbone.forward_head(pooled) if self.head is None else self.head(pooled)


class DistillWrapper(Objective):
    """DeiT distillation of `teacher` into the backbone `student`: forward(images, labels) -> loss.

    Seed arguments: `student`, `teacher`, `temperature` (1), `alpha` (0.5), `hard` (False),
    `mlp_layernorm` (a LayerNorm before the distillation head). `teacher` is an nn.Module returning
    logits, a backbone registry name (built with `num_classes`, untrained unless you load weights),
    or "student_copy" (a frozen copy of the student and its classifier: self-distillation).
    `num_classes`: defaults to the width of the student's own head; the student's head
    (`forward_head`) is used when it has `num_classes` outputs, else the wrapper adds a linear head.
    `image_size`: size of the training crop made when called on a plain batch (default: the
    backbone's default size); the crop follows DeiT (scale 0.08-1, flip).
    """

    requires = (frozenset(),)  # extra_tokens preferred; a pooled-feature head is the fallback
    needs_labels = True

    def __init__(self, student: Backbone, teacher: nn.Module | str | None = None, *, temperature: float = 1.0,
                 alpha: float = 0.5, hard: bool = False, mlp_layernorm: bool = False, num_classes: int | None = None,
                 image_size: int | Sequence[int] | None = None) -> None:
        super().__init__(student)
        if teacher is None:
            raise ValueError("DistillWrapper needs a teacher: an nn.Module returning logits (B, num_classes), "
                             "a backbone registry name, or 'student_copy'")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha mixes the two losses and must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.backbone = student
        self.temperature, self.alpha, self.hard = temperature, alpha, hard
        dim = student.embed_dim

        own = self._own_head_width(student)
        if num_classes is None:
            if own is None:
                raise ValueError("the student has no classification head: pass num_classes= to DistillWrapper")
            num_classes = own
        self.num_classes = num_classes
        # the backbone's own head when it already predicts num_classes, else one here
        self.head = None if own == num_classes else nn.Linear(dim, num_classes)

        self.uses_token = EXTRA_TOKENS in student.capabilities
        if self.uses_token:
            self.distill_token = nn.Parameter(torch.zeros(1, 1, dim))
            trunc_normal_(self.distill_token, std=0.02)
        else:
            self.distill_token = None
            log.info("%s has no extra_tokens capability: distilling through a head on the pooled features",
                     type(student).__name__)
        self.distill_head = nn.Sequential(nn.LayerNorm(dim) if mlp_layernorm else nn.Identity(),
                                          nn.Linear(dim, num_classes))

        if isinstance(teacher, str):
            if teacher == "student_copy":
                teacher = _Classifier(copy.deepcopy(student), copy.deepcopy(self.head))
            else:
                teacher = create_backbone(teacher, num_classes=num_classes)
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher must be an nn.Module returning logits, got {type(teacher).__name__}")
        self.teacher = teacher.requires_grad_(False).eval()

        spatial = tuple(student.default_size[-2:])
        if image_size is not None:
            spatial = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        student.check_size(spatial)
        self.image_size = spatial

    @staticmethod
    def _own_head_width(backbone: Backbone) -> int | None:
        """Output width of the backbone's classifier, found through `forward_head`; None if it has none."""
        probe = torch.zeros(1, backbone.embed_dim)
        try:
            param = next(backbone.parameters())
            probe = probe.to(device=param.device, dtype=param.dtype)
        except StopIteration:
            pass
        with torch.no_grad():
            out = backbone.forward_head(probe)
        if out is probe or out.dim() != 2:
            return None
        return int(out.shape[-1])

    def view_specs(self) -> list[ViewSpec]:
        """One training crop per image, seen by teacher and student alike (DeiT: RandomResizedCrop + flip)."""
        return [ViewSpec("train", 1, self.image_size, scale=(0.08, 1.0), hflip=0.5)]

    def student_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> class logits (B, K) and distillation logits (B, K)."""
        if self.uses_token:
            token = self.distill_token.expand(images.shape[0], -1, -1)
            out = self.backbone.forward_features(images, extra_tokens=token)
            distill_features = out.prefix_tokens[:, -1]  # extra tokens come last among the prefix tokens
        else:
            out = self.backbone.forward_features(images)
            distill_features = out.pooled
        logits = self.backbone.forward_head(out.pooled) if self.head is None else self.head(out.pooled)
        return logits, self.distill_head(distill_features)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.teacher(images)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.shape != (images.shape[0], self.num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the teacher must return logits of shape (B, {self.num_classes}) = "
                             f"{(images.shape[0], self.num_classes)}, got {got}")
        return out

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor | None = None,
                temperature: float | None = None, alpha: float | None = None) -> torch.Tensor:
        """images (B, C, H, W) (standalone: one DeiT crop is made here) or the launcher's [view];
        labels (B,) long. Returns the scalar loss."""
        if labels is None:
            raise ValueError("DistillWrapper is supervised: call it as distiller(images, labels) with labels (B,) long")
        if isinstance(images, torch.Tensor):
            images = make_views(images, self.view_specs())
        if len(images) != 1:
            raise ValueError(f"DistillWrapper expects one view, got {len(images)}")
        x = images[0]
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        teacher = self.teacher_logits(x)
        logits, distill = self.student_outputs(x)
        loss, ce, dist_term = distillation_loss(
            logits, distill, teacher, labels,
            temperature=self.temperature if temperature is None else temperature,
            alpha=self.alpha if alpha is None else alpha, hard=self.hard)
        self.metrics = {"loss": float(loss.detach()), "ce_loss": float(ce.detach()),
                        "distill_loss": float(dist_term.detach()),
                        "accuracy": float((logits.detach().argmax(-1) == labels).float().mean())}
        return loss

    def train(self, mode: bool = True) -> DistillWrapper:
        super().train(mode)
        self.teacher.eval()  # frozen teacher: batch-norm statistics and dropout stay fixed
        return self


register_objective("distill", DistillWrapper)
