"""DINO train-step throughput and peak memory: ours vs lightly, side by side in one run.

Both sides do the same work per step on a batch of B images (uint8 3 x 256 x 256, the decoded
canvas a data loader hands over): DINO's multi-crop views (2 global 224 px crops, scale 0.4-1, and 6
local 96 px crops, scale 0.05-0.4; flip, colour jitter 0.8, grayscale 0.2, blur 1.0/0.1/0.5,
solarize 0/0.2/0, ImageNet normalisation), a ViT-S/16 student on all 8 views and its EMA teacher on
the 2 global views, a DINO head (2048 hidden, 256 bottleneck, 65536 prototypes, weight-normalised
last layer), DINO's cross-entropy over the 14 view pairs with centring, backward, last-layer
gradient cancelling (first epoch), an AdamW step and the teacher's EMA update.

- ours: `create_backbone("vit_small_patch16")` + `objectives.Dino`; views from `objectives.make_views`
  (Kornia, batched, per-sample parameters), crops of one size in one forward pass, the last layer
  scaled on its output, vectorised loss, `torch._foreach` EMA, the launcher's fused AdamW.
- lightly: timm `vit_small_patch16_224` (dynamic_img_size, for the 96 px crops) +
  `DINOProjectionHead` + `DINOLoss`, views from `DINOTransform` per PIL image (what its data loader
  runs), one forward per view and `update_momentum`, as in lightly's DINO example.

Ceiling: the script also times the ViT passes alone (timm's ViT-S/16: the student's forward and
backward on the 8 views, the teacher's forward on the 2 global ones, views made beforehand), the
work neither side can avoid at fp32. Its rate over lightly's is the largest ratio any DINO
implementation could reach against lightly here.

Peak memory (CPU): each side runs in its own spawned process (one warm-up step, then three); we
print its peak resident set size over those three (VmHWM, reset after warm-up), which counts the
same model, teacher and optimizer state on both sides plus the step's activations, and, as in
bench_mae, the growth over the resident size after warm-up. The growth alone misleads here:
lightly's many per-view allocations stay in the heap after warm-up (higher baseline), ours are
larger blocks returned to the OS between steps.

Run: `.venv-bench/bin/python -m benchmarks.bench_dino [--batch 16] [--rounds 3]`
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from benchmarks.common import compare, peak_memory_mb, pick_threads, report

GLOBAL, LOCAL, NUM_LOCAL = 224, 96, 6
HIDDEN, BOTTLENECK, K = 2048, 256, 65536
TOTAL_STEPS = 1000  # the schedules' horizon; step 0 is in the "first epoch" (last layer frozen) for both


def make_batch(batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, 256, 256), generator=g, dtype=torch.uint8)


def build_ours(batch: int):
    import ssl_vit
    from launch.build import make_adamw
    from objectives import Dino
    from objectives.views import IMAGENET_MEAN, IMAGENET_STD, make_views

    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone("vit_small_patch16")
    model = Dino(backbone, image_size=GLOBAL, local_crop_size=LOCAL, num_local_crops=NUM_LOCAL,
                 projection_hidden_size=HIDDEN, bottleneck_dim=BOTTLENECK, num_classes_K=K)
    opt = make_adamw([{"params": [p for p in model.parameters() if p.requires_grad]}], lr=5e-4, betas=(0.9, 0.999),
                     eps=1e-8)  # the launcher's optimizer (fused kernel)
    specs = model.view_specs()
    images = make_batch(batch)

    def step() -> None:
        views = make_views(images, specs, normalize=(IMAGENET_MEAN, IMAGENET_STD))
        opt.zero_grad(set_to_none=True)
        model(views).backward()
        model.on_before_optimizer_step(0, TOTAL_STEPS)
        opt.step()
        model.on_step_end(0, TOTAL_STEPS)

    return step


def build_lightly(batch: int):
    import timm
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule
    from PIL import Image

    torch.manual_seed(0)
    student_backbone = timm.create_model("vit_small_patch16_224", num_classes=0, dynamic_img_size=True)
    student_head = DINOProjectionHead(student_backbone.embed_dim, HIDDEN, BOTTLENECK, K, freeze_last_layer=1)
    teacher_backbone = copy.deepcopy(student_backbone)
    # a fresh head (weight_norm modules cannot be deep-copied), as lightly's DINO example builds it
    teacher_head = DINOProjectionHead(student_backbone.embed_dim, HIDDEN, BOTTLENECK, K)
    teacher_head.load_state_dict(student_head.state_dict())
    deactivate_requires_grad(teacher_backbone)
    deactivate_requires_grad(teacher_head)
    criterion = DINOLoss(output_dim=K, warmup_teacher_temp_epochs=5)
    params = list(student_backbone.parameters()) + [p for p in student_head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    transform = DINOTransform(global_crop_size=GLOBAL, local_crop_size=LOCAL, n_local_views=NUM_LOCAL)
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in make_batch(batch)]

    def step() -> None:
        per_image = [transform(img) for img in pil]  # the data loader's work, then its collate
        views = [torch.stack(v) for v in zip(*per_image)]
        momentum = cosine_schedule(0, TOTAL_STEPS, 0.996, 1)
        update_momentum(student_backbone, teacher_backbone, m=momentum)
        update_momentum(student_head, teacher_head, m=momentum)
        teacher_out = [teacher_head(teacher_backbone(v)) for v in views[:2]]
        student_out = [student_head(student_backbone(v)) for v in views]
        loss = criterion(teacher_out, student_out, epoch=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        student_head.cancel_last_layer_gradients(current_epoch=0)
        opt.step()

    return step


def build_backbones_only(batch: int):
    """The floor under both sides: timm's ViT-S/16 forward+backward on the 8 student views and forward
    on the 2 teacher views (views made once, outside the step), nothing else. A DINO step can be at
    most lightly's step time / this time faster than lightly at equal precision."""
    import timm

    torch.manual_seed(0)
    student = timm.create_model("vit_small_patch16_224", num_classes=0, dynamic_img_size=True)
    teacher = copy.deepcopy(student).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, 3, GLOBAL, GLOBAL, generator=g) for _ in range(2)]
    views += [torch.randn(batch, 3, LOCAL, LOCAL, generator=g) for _ in range(NUM_LOCAL)]

    def step() -> None:
        with torch.no_grad():
            for v in views[:2]:
                teacher(v)
        student.zero_grad(set_to_none=True)
        sum(student(v).square().mean() for v in views).backward()

    return step


BUILDERS = {"ours": build_ours, "lightly": build_lightly}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()
    threads = pick_threads()
    torch.set_num_threads(threads)
    print(f"torch threads: {threads} (load {os.getloadavg()[0]:.2f})")
    if not args.memory_only:
        steps = {name: build(args.batch) for name, build in BUILDERS.items()}
        steps["backbones only"] = build_backbones_only(args.batch)
        rates = compare(steps, images_per_call=args.batch, rounds=args.rounds, warmup=args.warmup)
        title = f"DINO ViT-S/16 step (batch {args.batch}, 2x{GLOBAL}+{NUM_LOCAL}x{LOCAL}, K={K})"
        ratio = report(title, rates, "ours", "lightly")
        print(f"throughput ratio ours/lightly: {ratio:.2f}x")
        ceiling = rates["backbones only"] / rates["lightly"]
        print(f"ceiling (backbones only, {rates['backbones only']:.2f} img/s, / lightly): {ceiling:.2f}x; "
              f"lightly spends {100 * (1 - 1 / ceiling):.0f}% of its step outside the ViT passes")
        del steps
    if not args.no_memory:
        for name in BUILDERS:
            peak, growth = peak_memory_mb(BUILDERS[name], args.batch, threads)
            print(f"peak memory {name:8s}: {peak:8.1f} MB peak RSS ({growth:7.1f} MB growth over 3 steps)")


if __name__ == "__main__":
    main()
