"""MAE train-step throughput and peak memory: ours vs lightly, side by side in one run.

Both sides do the same work per step on a batch of 16 images (3 x 256 x 256 floats in [0, 1]):
views (random resized crop to 224 px, scale 0.2-1, bilinear, + horizontal flip), ViT-S/16 encoder
on the 25% visible tokens, a 512-wide 8-block decoder (16 heads), normalised-pixel MSE on the hidden
patches (mask ratio 0.75), backward and an AdamW step.

- ours: `create_backbone("vit_small_patch16")` + `objectives.MAE`, views from `objectives.make_views`
  (Kornia, batched on the tensor's device).
- lightly: timm `vit_small_patch16_224` in `MaskedVisionTransformerTIMM` + `MAEDecoderTIMM`
  with lightly's token-mask utilities (lightly's MAE example), views with torchvision v2
  transforms per image, as lightly's `MAETransform` does in a data loader (bilinear here
  instead of its bicubic, so both sides interpolate alike).

Peak memory (CPU): each side runs in its own spawned process: one warm-up step (model, optimizer
state, allocator pools and the batch in place), then the peak is reset and three train steps run.
We print the peak resident set size over those three (VmHWM from /proc/self/status, reset through
/proc/self/clear_refs after the warm-up) and its growth over the resident size just before them:
activations, gradients and allocator growth. Not `ru_maxrss`: Linux keeps it across exec, so a
spawned child would report its parent's peak whenever that is higher. tracemalloc is not used
because it misses most of torch's native allocations.

Run: `.venv-bench/bin/python -m benchmarks.bench_mae [--batch 16] [--rounds 5] [--no-memory | --memory-only]`
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch

from benchmarks.common import compare, peak_memory_mb, pick_threads, report

warnings.filterwarnings("ignore", message="MAEDecoderTIMM is deprecated")  # lightly 1.6 still ships it

MASK_RATIO = 0.75
DECODER_DIM, DECODER_DEPTH, DECODER_HEADS = 512, 8, 16


def make_batch(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(0))


def build_ours(batch: int):
    import ssl_vit
    from launch.build import make_adamw
    from objectives import MAE, make_views
    from ssl_vit import ViewSpec

    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone("vit_small_patch16")
    model = MAE(backbone, masking_ratio=MASK_RATIO, decoder_dim=DECODER_DIM, decoder_depth=DECODER_DEPTH,
                decoder_heads=DECODER_HEADS, decoder_dim_head=DECODER_DIM // DECODER_HEADS, norm_pix_loss=True)
    opt = make_adamw([{"params": list(model.parameters())}], lr=1.5e-4, betas=(0.9, 0.999),
                     eps=1e-8)  # the launcher's optimizer (fused kernel)
    specs = [ViewSpec("mae", 1, (224, 224), scale=(0.2, 1.0), hflip=0.5)]
    images = make_batch(batch)

    def step() -> None:
        views = make_views(images, specs)
        opt.zero_grad(set_to_none=True)
        model(views).backward()
        opt.step()

    return step


def build_lightly(batch: int):
    import timm
    from lightly.models import utils
    from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM
    from torchvision.transforms import v2

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", num_classes=0)
    encoder = MaskedVisionTransformerTIMM(vit=vit)
    decoder = MAEDecoderTIMM(num_patches=vit.patch_embed.num_patches, patch_size=16, embed_dim=vit.embed_dim,
                             decoder_embed_dim=DECODER_DIM, decoder_depth=DECODER_DEPTH,
                             decoder_num_heads=DECODER_HEADS, mlp_ratio=4.0)
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=1.5e-4)
    transform = v2.Compose([
        v2.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BILINEAR),
        v2.RandomHorizontalFlip(),
    ])
    seq_len = encoder.sequence_length
    images = make_batch(batch)

    def loss_fn(views: torch.Tensor) -> torch.Tensor:
        b = views.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(b, seq_len), mask_ratio=MASK_RATIO, device=views.device)
        encoded = encoder.encode(images=views, idx_keep=idx_keep)
        x = decoder.embed(encoded)
        full = utils.repeat_token(decoder.mask_token, (b, seq_len))
        full = utils.set_at_index(full, idx_keep, x.type_as(full))
        pred = decoder.predict(utils.get_at_index(decoder.decode(full), idx_mask))
        target = utils.get_at_index(utils.patchify(views, 16), idx_mask - 1)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        return torch.nn.functional.mse_loss(pred, target)

    def step() -> None:
        views = torch.stack([transform(img) for img in images])
        opt.zero_grad(set_to_none=True)
        loss_fn(views).backward()
        opt.step()

    return step


BUILDERS = {"ours": build_ours, "lightly": build_lightly}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()
    threads = pick_threads()
    torch.set_num_threads(threads)
    print(f"torch threads: {threads} ({'machine idle' if threads == 2 else 'machine busy'}; "
          f"load {os.getloadavg()[0]:.2f})")
    if not args.memory_only:
        steps = {name: build(args.batch) for name, build in BUILDERS.items()}
        rates = compare(steps, images_per_call=args.batch, rounds=args.rounds)
        ratio = report(f"MAE ViT-S/16 train step (batch {args.batch}, 224 px)", rates, "ours", "lightly")
        print(f"throughput ratio ours/lightly: {ratio:.2f}x")
        del steps  # the memory children start from a parent without these models
    if not args.no_memory:
        for name in BUILDERS:
            peak, growth = peak_memory_mb(BUILDERS[name], args.batch, threads)
            print(f"peak memory {name:8s}: {peak:8.1f} MB peak RSS ({growth:7.1f} MB growth over 3 steps)")


if __name__ == "__main__":
    main()
