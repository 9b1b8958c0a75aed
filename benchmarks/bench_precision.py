"""CPU precision and compilation: fp32 vs bf16 autocast, eager vs torch.compile, ViT-S/16 MAE and DINO.

Train-step throughput of ours on this CPU, four variants side by side in one run (interleaved
rounds, medians, ratios against fp32 eager):

- fp32 eager;
- bf16: the forward under `torch.autocast("cpu", dtype=torch.bfloat16)` (what `accelerate launch
  --mixed_precision bf16` does; matmuls and attention in bf16, on AMX tiles where the CPU has them;
  weights, gradients and the optimizer stay fp32);
- fp32 + compile and bf16 + compile: the objective wrapped in `torch.compile` (inductor).

Workloads (small batches, so a run takes minutes on two cores): MAE ViT-S/16 at 224 px, mask 0.75,
decoder 8 x 512 (16 heads), batch 8; DINO ViT-S/16, 2 x 224 + 6 x 96 crops, head 2048 / 256 / 65536,
batch 4. Views are made from a uint8 batch outside autocast and outside the compiled region, as the
launcher makes them. Also printed: the measured matmul peak of this CPU at fp32 and bf16
(`launch.throughput.peak_flops`) and each variant's MFU.

`--small`: the small regime of bench_mae_small / bench_dino_small instead (ViT-Ti/4 at 32 px, batch 64), where
compiling takes a minute rather than a quarter of an hour on this CPU.

Run: `.venv-bench/bin/python -m benchmarks.bench_precision [--rounds 3] [--no-compile] [--only mae|dino] [--small]`
(`.venv/bin/python` works too: no peer is involved)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch

from benchmarks.common import compare, pick_threads

MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _uint8(batch: int, size: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)


def build_mae(batch: int):
    import ssl_vit
    from objectives import MAE

    torch.manual_seed(0)
    model = MAE(ssl_vit.create_backbone("vit_small_patch16"), masking_ratio=0.75, decoder_dim=512, decoder_depth=8,
                decoder_heads=16, decoder_dim_head=32, norm_pix_loss=True).train()
    return model, _uint8(batch), None


def build_dino(batch: int):
    import ssl_vit
    from objectives import Dino

    torch.manual_seed(0)
    model = Dino(ssl_vit.create_backbone("vit_small_patch16"), image_size=224, local_crop_size=96,
                 num_local_crops=6, projection_hidden_size=2048, bottleneck_dim=256, num_classes_K=65536).train()
    return model, _uint8(batch), (0, 1000)


def build_mae_small(batch: int):
    """bench_mae_small's shapes (its constants): ViT-Ti/4 at 32 px, decoder 4 x 192."""
    import ssl_vit
    from benchmarks import bench_mae_small as s
    from objectives import MAE

    torch.manual_seed(0)
    model = MAE(ssl_vit.create_backbone("vit_tiny_patch16", image_size=s.SIZE, patch_size=s.PATCH),
                masking_ratio=s.MASK_RATIO, decoder_dim=s.DECODER_DIM, decoder_depth=s.DECODER_DEPTH,
                decoder_heads=s.DECODER_HEADS, decoder_dim_head=s.DECODER_DIM // s.DECODER_HEADS,
                norm_pix_loss=True).train()
    return model, _uint8(batch, s.SIZE), None


def build_dino_small(batch: int):
    """bench_dino_small's shapes (its constants): ViT-Ti/4, 2 x 32 + 6 x 16 px crops, head 2048 / 256 / 2048."""
    import ssl_vit
    from benchmarks import bench_dino_small as s
    from objectives import Dino

    torch.manual_seed(0)
    model = Dino(ssl_vit.create_backbone("vit_tiny_patch16", image_size=s.GLOBAL, patch_size=s.PATCH),
                 image_size=s.GLOBAL, local_crop_size=s.LOCAL, num_local_crops=s.NUM_LOCAL,
                 projection_hidden_size=s.HIDDEN, bottleneck_dim=s.BOTTLENECK, num_classes_K=s.K).train()
    return model, _uint8(batch, s.SIZE), (0, s.TOTAL_STEPS)


def variant(build, batch: int, bf16: bool, compiled: bool):
    """(step, FLOPs of one step) of one variant; its own model, optimizer and views pipeline."""
    from launch.build import make_adamw
    from launch.throughput import count_step_flops
    from objectives.views import make_views

    model, images, schedule = build(batch)
    opt = make_adamw([{"params": [p for p in model.parameters() if p.requires_grad]}], lr=1e-4, betas=(0.9, 0.95),
                     eps=1e-8)
    specs = model.view_specs()
    run = torch.compile(model) if compiled else model

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        views = make_views(images, specs, normalize=MEAN_STD)
        with autocast():
            loss = run(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if schedule is not None:
            model.on_before_optimizer_step(*schedule)
        opt.step()
        if schedule is not None:
            model.on_step_end(*schedule)

    with autocast():
        flops = count_step_flops(model, make_views(images, specs, normalize=MEAN_STD))
    return step, flops


def main() -> None:
    from launch.throughput import peak_flops

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (the first compiles)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--only", choices=("mae", "dino"), default=None)
    parser.add_argument("--mae-batch", type=int, default=8)
    parser.add_argument("--dino-batch", type=int, default=4)
    parser.add_argument("--small", action="store_true",
                        help="the small regime instead (ViT-Ti/4 at 32 px, batch 64: bench_{mae,dino}_small's shapes)")
    args = parser.parse_args()
    threads = args.threads or pick_threads()
    torch.set_num_threads(threads)
    print(f"torch threads: {threads} (load {os.getloadavg()[0]:.2f})")
    peaks = {dtype: peak_flops(torch.device("cpu"), dtype) for dtype in (torch.float32, torch.bfloat16)}
    for dtype, (value, how) in peaks.items():
        print(f"peak {dtype}: {value / 1e9:.0f} GFLOP/s ({how})")
    workloads = {"mae": ("MAE ViT-S/16 224 px, decoder 8x512", build_mae, args.mae_batch),
                 "dino": ("DINO ViT-S/16 2x224+6x96, K=65536", build_dino, args.dino_batch)}
    if args.small:
        workloads = {"mae": ("MAE ViT-Ti/4 32 px, decoder 4x192", build_mae_small, 64),
                     "dino": ("DINO ViT-Ti/4 2x32+6x16, K=2048", build_dino_small, 64)}
    for key, (title, build, batch) in workloads.items():
        if args.only and key != args.only:
            continue
        steps, flops = {}, {}
        for name, bf16, compiled in (("fp32", False, False), ("bf16", True, False), ("fp32+compile", False, True),
                                     ("bf16+compile", True, True)):
            if compiled and args.no_compile:
                continue
            t0 = time.perf_counter()
            steps[name], flops[name] = variant(build, batch, bf16, compiled)
            if compiled:
                steps[name]()  # compile outside the timed rounds
                print(f"{title}: {name} compiled in {time.perf_counter() - t0:.0f} s", flush=True)
        rates = compare(steps, images_per_call=batch, rounds=args.rounds, warmup=args.warmup)
        print(f"{title}, batch {batch}:")
        for name, rate in rates.items():
            dtype = torch.bfloat16 if name.startswith("bf16") else torch.float32
            achieved = flops[name] * rate / batch
            print(f"  {name:13s} {rate:7.2f} img/s   {rate / rates['fp32']:5.2f}x fp32   "
                  f"{achieved / 1e9:6.1f} GFLOP/s   MFU {100 * achieved / peaks[dtype][0]:5.1f}%", flush=True)


if __name__ == "__main__":
    main()
