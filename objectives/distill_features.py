"""Feature distillation from a frozen pretrained teacher (`--objective distill_features`).

The method of lightly-train's default `method="distillation"` (LightlyTrain >= 0.7, "distillationv2":
`lightly_train/_methods/distillationv2/`, docs https://docs.lightly.ai/train/stable/pretrain_distill/methods/
distillation.html): one augmented view goes to a frozen teacher (DINOv2 ViT-B/14 there) and to the student; the
student's patch-token map goes through a small projection head to the teacher's width, is resized to the teacher's
token grid by bilinear interpolation, and is regressed onto the teacher's patch tokens. No labels, no EMA.

What is followed, and the deviations (stated, not hidden):
- projection then bilinear resize of the student's (B, D, h, w) map to the teacher's grid: as lightly-train v2
  (`_forward_student`); video grids (t, h, w) are resized trilinearly.
- the loss: lightly-train v2 uses an un-normalised MSE on patch tokens (`DistillationV2Loss`); its v1 method
  (`distillationv1`) matched image-level features through a queue with a KL. Here the default is the cosine
  distance per token (`loss="cosine"`, scale-free, so teachers whose features have large norms need no tuning);
  `loss="smooth_l1"` is the robust regression close to v2's MSE. A second term matches the pooled features (their
  own projection) to the teacher's pooled features (`pooled_weight`, 1.0; 0 gives v2's patch-only loss).
- the teacher sees the same view as the student, resized to the teacher's default size (v2 feeds the teacher the
  same tensor; our teacher and student may want different input sizes). v2's mixup of the view is not done.
- gradient clipping 1.0 (global norm) as v2's `configure_gradient_clipping`: configs/objectives/distill_features.yaml.

Teachers (`teacher=`): an export folder of ours (`ssl_vit.load_backbone`, checksums verified), `"timm:NAME"` with a
local `teacher_weights` .safetensors file in timm's key layout (built with `ssl_vit.create_backbone`, loaded strictly
through `Backbone.state_dict_from_timm`), `"student_copy"` (a frozen copy of the student at construction: tests and
the demo profile) or an `ssl_vit.Backbone` instance. Nothing is downloaded.

Checkpoints: the teacher is a registered submodule with `requires_grad=False`, so it is in the objective's state
dict (a checkpoint restores it exactly, whatever path it came from) but never among the optimiser's parameters
(the launcher's groups take `requires_grad` parameters only). `export_backbone()` is the student.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ssl_vit import (
    Backbone,
    BadArgument,
    IncompatibleBackbone,
    Objective,
    ViewSpec,
    create_backbone,
    load_backbone,
    register_objective,
)

from .views import resolve_views

__all__ = ["FeatureDistillation", "feature_loss", "resize_grid", "build_teacher"]

LOSSES = ("cosine", "smooth_l1")
HEADS = ("linear", "ln_linear")


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine", beta: float = 1.0) -> torch.Tensor:
    """Distance between matched features, averaged over every position. student, teacher (..., D), same shape.

    cosine: mean over positions of 1 - <s, t> / (|s| |t|);
    smooth_l1: mean over elements of 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta, d = s - t (Huber).
    The teacher is a target: no gradient flows into it. Computed in float32.
    """
    if student.shape != teacher.shape:
        raise BadArgument(f"feature_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    s, t = student.float(), teacher.detach().float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)).mean()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(s, t, beta=beta)
    raise BadArgument(f"unknown feature loss {kind!r}; choose one of {', '.join(LOSSES)}")


def resize_grid(tokens: torch.Tensor, grid: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Tokens (B, N, D), row-major over `grid` (h, w) or (t, h, w), -> (B, prod(size), D) on the grid `size`:
    bilinear (trilinear for video) interpolation of the (B, D, *grid) map, align_corners=False, as lightly-train."""
    grid, size = tuple(int(g) for g in grid), tuple(int(s) for s in size)
    if grid == size:
        return tokens
    if len(grid) != len(size):
        raise IncompatibleBackbone(f"cannot resize a {len(grid)}-d token grid {grid} to a {len(size)}-d one {size}")
    b, n, d = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(b, d, *grid)
    mode = "bilinear" if len(grid) == 2 else "trilinear"
    fmap = F.interpolate(fmap, size=size, mode=mode, align_corners=False)
    return fmap.flatten(2).transpose(1, 2)


def _timm_teacher(name: str, weights: str | None, kwargs: dict) -> Backbone:
    """`timm:NAME` built by the registry (never pretrained) with the timm-layout weights file, loaded strictly."""
    if weights is None:
        raise BadArgument(f"teacher {name!r} needs teacher_weights=<a local timm-layout .safetensors file> "
                          "(nothing is downloaded)")
    path = Path(weights)
    if not path.is_file() or path.suffix != ".safetensors":
        raise BadArgument(f"teacher_weights {str(path)!r} is not a .safetensors file")
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise BadArgument(f"teacher_weights {str(path)!r} cannot be read as safetensors: {err}") from None
    teacher = create_backbone(name, **kwargs)
    own = teacher.state_dict_from_timm(state)
    expected = teacher.state_dict()
    missing, unexpected = sorted(expected.keys() - own.keys()), sorted(own.keys() - expected.keys())
    shapes = [k for k in sorted(expected.keys() & own.keys()) if expected[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise BadArgument(f"teacher_weights {str(path)!r} do not fit {name}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, other shapes {shapes[:3]}")
    teacher.load_state_dict(own, strict=True)
    return teacher


def build_teacher(teacher: Backbone | str, student: Backbone, *, weights: str | None = None,
                  kwargs: dict | None = None) -> Backbone:
    """The frozen teacher backbone named by `teacher` (see the module docstring), in eval mode."""
    if isinstance(teacher, str):
        if teacher == "student_copy":
            teacher = copy.deepcopy(student)
        elif teacher.startswith("timm:"):
            teacher = _timm_teacher(teacher, weights, dict(kwargs or {}))
        else:
            if weights is not None:
                raise BadArgument("teacher_weights goes with teacher=timm:NAME; an export folder has its own weights")
            if not Path(teacher).is_dir():
                raise BadArgument(f"teacher {teacher!r} is not an export folder (backbone.json + "
                                  "backbone.safetensors); give an export folder, timm:NAME with teacher_weights=FILE, "
                                  "or student_copy")
            teacher = load_backbone(teacher)
    if not isinstance(teacher, Backbone):
        raise IncompatibleBackbone(f"the teacher must be an ssl_vit.Backbone, got {type(teacher).__name__}")
    if teacher.is_video != student.is_video:
        kinds = {True: "video", False: "image"}
        raise IncompatibleBackbone(f"a {kinds[teacher.is_video]} teacher cannot teach a {kinds[student.is_video]} "
                                   "student")
    if teacher.in_channels != student.in_channels:
        raise IncompatibleBackbone(f"the teacher reads {teacher.in_channels} channels, the student "
                                   f"{student.in_channels}")
    return teacher.requires_grad_(False).eval()


def _head(kind: str, dim_in: int, dim_out: int) -> nn.Module:
    if kind not in HEADS:
        raise BadArgument(f"unknown projection head {kind!r}; choose one of {', '.join(HEADS)}")
    linear = nn.Linear(dim_in, dim_out)
    return nn.Sequential(nn.LayerNorm(dim_in), linear) if kind == "ln_linear" else linear


class FeatureDistillation(Objective):
    """Patch-token and pooled-feature distillation of a frozen `teacher` into `backbone` (lightly-train v2).

    Arguments: `teacher` (required: export folder, "timm:NAME", "student_copy" or a Backbone), `teacher_weights`
    (the .safetensors file of a timm teacher), `teacher_kwargs` (architecture overrides for a timm teacher),
    `loss` ("cosine" | "smooth_l1"), `smooth_l1_beta` (1.0), `pooled_weight` (1.0), `head` ("linear" |
    "ln_linear": LayerNorm before the projection), `image_size` (the student's view; default its default size),
    `crop_scale` ((0.08, 1.0), torchvision's RandomResizedCrop default), `teacher_bf16` (True: the teacher runs
    in bf16 autocast on CUDA devices that support it).
    """

    requires = (frozenset(),)  # any backbone: only forward_features' patch tokens, grid and pooled are read

    def __init__(self, backbone: Backbone, teacher: Backbone | str | None = None, *, teacher_weights: str | None = None,
                 teacher_kwargs: dict | None = None, loss: str = "cosine", smooth_l1_beta: float = 1.0,
                 pooled_weight: float = 1.0, head: str = "linear", image_size: int | Sequence[int] | None = None,
                 crop_scale: Sequence[float] = (0.08, 1.0), teacher_bf16: bool = True) -> None:
        super().__init__(backbone)
        if teacher is None:
            raise BadArgument("distill_features needs objective_args.teacher: an export folder, timm:NAME with "
                              "teacher_weights=FILE, or student_copy")
        if loss not in LOSSES:
            raise BadArgument(f"unknown feature loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if pooled_weight < 0 or smooth_l1_beta <= 0:
            raise BadArgument(f"pooled_weight must be >= 0 and smooth_l1_beta > 0, got {pooled_weight}, "
                              f"{smooth_l1_beta}")
        self.backbone = backbone
        self.teacher = build_teacher(teacher, backbone, weights=teacher_weights, kwargs=teacher_kwargs)
        self.loss_kind, self.beta, self.pooled_weight = loss, smooth_l1_beta, pooled_weight
        self.teacher_bf16 = teacher_bf16
        self.patch_head = _head(head, backbone.embed_dim, self.teacher.embed_dim)
        self.pooled_head = _head(head, backbone.embed_dim, self.teacher.embed_dim)
        spatial = tuple(backbone.default_size[-2:])
        if image_size is not None:
            spatial = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        backbone.check_size(spatial)
        self.image_size = spatial
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))

    def view_specs(self) -> list[ViewSpec]:
        """One random resized crop (+ flip) of the student's size; the teacher sees it resized to its own size."""
        return [ViewSpec("train", 1, self.image_size, scale=self.crop_scale, hflip=0.5)]

    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """The view (B, C, H, W) / (B, C, T, H, W) resized to the teacher's default size (bilinear, antialiased
        when shrinking; trilinear for clips)."""
        want = tuple(int(s) for s in self.teacher.default_size)
        if tuple(x.shape[2:]) == want:
            return x
        if x.dim() == 4:
            shrink = want[0] < x.shape[2] or want[1] < x.shape[3]
            return F.interpolate(x, size=want, mode="bilinear", align_corners=False, antialias=shrink)
        return F.interpolate(x, size=want, mode="trilinear", align_corners=False)

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """The frozen teacher on the view: patch tokens (B, N_t, D_t), pooled (B, D_t) in float32, and its grid."""
        x = self.teacher_input(x)
        bf16 = self.teacher_bf16 and x.device.type == "cuda" and torch.cuda.is_bf16_supported()
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.teacher.forward_features(x)
        return out.patch_tokens.float(), out.pooled.float(), tuple(out.grid)

    def student_features(self, x: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The student on the view: projected patch tokens resized to the teacher's `grid` (B, N_t, D_t) and the
        projected pooled features (B, D_t). Projection first, then the resize (lightly-train v2's order)."""
        out = self.backbone.forward_features(x)
        patches = resize_grid(self.patch_head(out.patch_tokens), out.grid, grid)
        return patches, self.pooled_head(out.pooled)

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """images: a plain batch (B, C, H, W) (the view is made here) or the launcher's [view]. Returns the loss
        patch_loss + pooled_weight * pooled_loss and fills `metrics`."""
        (x,) = resolve_views(self.view_specs(), images)
        t_patch, t_pooled, grid = self.teacher_features(x)
        s_patch, s_pooled = self.student_features(x, grid)
        patch = feature_loss(s_patch, t_patch, self.loss_kind, self.beta)
        pooled = feature_loss(s_pooled, t_pooled, self.loss_kind, self.beta)
        loss = patch + self.pooled_weight * pooled
        with torch.no_grad():
            cos = F.cosine_similarity(s_patch.float(), t_patch, dim=-1).mean()
        self.metrics = {"loss": float(loss.detach()), "patch_loss": float(patch.detach()),
                        "pooled_loss": float(pooled.detach()), "patch_cosine": float(cos)}
        return loss

    def train(self, mode: bool = True) -> FeatureDistillation:
        super().train(mode)
        self.teacher.eval()  # frozen: dropout off, normalisation statistics fixed
        return self


register_objective("distill_features", FeatureDistillation)
