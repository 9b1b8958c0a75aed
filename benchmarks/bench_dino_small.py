"""DINO train-step throughput in the small regime: ours vs lightly, side by side in one run.

The regime of CIFAR-sized pretraining, where fixed per-step costs outside the model weigh most:
ViT-Ti with 4 px patches at 32 px (12 blocks, 192 wide, 3 heads), batch 64 of uint8 32 x 32
images, DINO's two 32 px global crops (scale 0.4-1) and six 16 px local crops (scale 0.05-0.4) with
its photometric recipe (flip, colour jitter 0.8, grayscale 0.2, blur 1.0/0.1/0.5, solarize 0/0.2/0,
ImageNet normalisation), a DINO head 2048 hidden, 256 bottleneck, 2048 prototypes, the 14-pair
cross-entropy with centring, backward, last-layer gradient cancelling (first epoch), AdamW and the
teacher EMA. One step = views + forward + backward + optimizer on both sides.

- ours: `create_backbone("vit_tiny_patch16", image_size=32, patch_size=4)` + `objectives.Dino`; views
  from `objectives.views.make_views` on the uint8 batch (on the device, as the launcher makes them);
  the launcher's fused AdamW.
- lightly: timm `vit_tiny_patch16_224` with img_size=32, patch_size=4 (dynamic_img_size for the
  16 px crops) + `DINOProjectionHead` + `DINOLoss`, views from `DINOTransform` on PIL images (what its
  data loader runs per image, then collate), one forward per view, `update_momentum`, default AdamW,
  as in lightly's DINO example.

"lightly model" is lightly's step with its views made once before the rounds: its model alone. Its rate
over lightly's full step is the ceiling of what faster views can buy at equal model and precision (the
matmuls are the same on both sides); ours over it shows how close the rest of our step comes to that.

`--profile` then profiles one step of ours (torch.profiler): the top ops by self CPU time and, for
the ops that are fixed per-step costs (clone, cat, fill_, copy_, ...), the file:line they come from.

Run: `.venv-bench/bin/python -m benchmarks.bench_dino_small [--batch 64] [--rounds 10] [--profile]`
"""

from __future__ import annotations

import argparse
import copy
import os
from functools import partial

import torch

from benchmarks.common import autocast_step, compare, pick_threads, profile_step, report

SIZE, GLOBAL, LOCAL, NUM_LOCAL, PATCH = 32, 32, 16, 6, 4
HIDDEN, BOTTLENECK, K = 2048, 256, 2048
TOTAL_STEPS = 1000  # the schedules' horizon; step 0 is in the "first epoch" (last layer frozen) for both


def make_batch(batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)


def build_ours(batch: int):
    import ssl_vit
    from launch.build import make_adamw
    from objectives import Dino
    from objectives.views import IMAGENET_MEAN, IMAGENET_STD, make_views

    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone("vit_tiny_patch16", image_size=GLOBAL, patch_size=PATCH)
    model = Dino(backbone, image_size=GLOBAL, local_crop_size=LOCAL, num_local_crops=NUM_LOCAL,
                 projection_hidden_size=HIDDEN, bottleneck_dim=BOTTLENECK, num_classes_K=K).train()
    opt = make_adamw([{"params": [p for p in model.parameters() if p.requires_grad]}], lr=5e-4, betas=(0.9, 0.999),
                     eps=1e-8)
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


def build_lightly(batch: int, views_once: bool = False):
    """lightly's step; `views_once`: its views made once before the rounds, so that the step is its model alone
    (the ceiling of what faster views can buy: lightly's full step over this one)."""
    import timm
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule
    from PIL import Image

    torch.manual_seed(0)
    student_backbone = timm.create_model("vit_tiny_patch16_224", img_size=GLOBAL, patch_size=PATCH, num_classes=0,
                                         dynamic_img_size=True)
    student_head = DINOProjectionHead(student_backbone.embed_dim, HIDDEN, BOTTLENECK, K, freeze_last_layer=1)
    teacher_backbone = copy.deepcopy(student_backbone)
    teacher_head = DINOProjectionHead(student_backbone.embed_dim, HIDDEN, BOTTLENECK, K)
    teacher_head.load_state_dict(student_head.state_dict())
    deactivate_requires_grad(teacher_backbone)
    deactivate_requires_grad(teacher_head)
    criterion = DINOLoss(output_dim=K, warmup_teacher_temp_epochs=5)
    params = list(student_backbone.parameters()) + [p for p in student_head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    transform = DINOTransform(global_crop_size=GLOBAL, local_crop_size=LOCAL, n_local_views=NUM_LOCAL)
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in make_batch(batch)]

    def make() -> list[torch.Tensor]:
        per_image = [transform(img) for img in pil]  # the data loader's work, then its collate
        return [torch.stack(v) for v in zip(*per_image)]

    fixed = make() if views_once else None

    def step() -> None:
        views = fixed if fixed is not None else make()
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


BUILDERS = {"ours": build_ours, "lightly": build_lightly, "lightly model": partial(build_lightly, views_once=True)}


def run_precisions(builders: dict, args: argparse.Namespace, title: str) -> None:
    """Interleaved rounds of ours and lightly at fp32 and/or under CPU bf16 autocast; prints the ratios."""
    steps = {}
    for name, build in builders.items():
        step = build(args.batch)
        if args.precision in ("fp32", "both"):
            steps[f"{name} fp32"] = step
        if args.precision in ("bf16", "both"):
            steps[f"{name} bf16"] = autocast_step(step)
    rates = compare(steps, images_per_call=args.batch, rounds=args.rounds, warmup=args.warmup)
    pairs = [("ours fp32", "lightly fp32"), ("ours bf16", "lightly bf16"), ("ours bf16", "lightly fp32"),
             ("lightly model fp32", "lightly fp32"), ("lightly model bf16", "lightly bf16"),
             ("ours fp32", "lightly model fp32"), ("ours bf16", "lightly model bf16")]
    for ours, peer in pairs:
        if ours in rates and peer in rates:
            ratio = report(f"{title} {ours}", rates, ours, peer)
            print(f"throughput ratio {ours} / {peer}: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 2 if idle, else 1)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both",
                        help="bf16: both sides under torch.autocast('cpu', bfloat16), ours also against lightly fp32")
    parser.add_argument("--profile", action="store_true", help="then profile one step of ours")
    parser.add_argument("--profile-only", action="store_true")
    args = parser.parse_args()
    threads = args.threads or pick_threads()
    torch.set_num_threads(threads)
    print(f"torch threads: {threads} (load {os.getloadavg()[0]:.2f})")
    if not args.profile_only:
        title = f"DINO ViT-Ti/4 step (batch {args.batch}, 2x{GLOBAL}+{NUM_LOCAL}x{LOCAL}, K={K})"
        run_precisions(BUILDERS, args, title)
    if args.profile or args.profile_only:
        profile_step(build_ours(args.batch))


if __name__ == "__main__":
    main()
