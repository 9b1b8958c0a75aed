"""MAE train-step throughput in the small regime: ours vs lightly, side by side in one run.

ViT-Ti with 4 px patches at 32 px (12 blocks, 192 wide, 3 heads; 64 patches), batch 64 of uint8
32 x 32 images, one view (random resized crop to 32 px, scale 0.2-1, horizontal flip, ImageNet
normalisation), mask ratio 0.75 (16 visible patches), normalised-pixel MSE on the hidden patches,
backward and AdamW. One step = views + forward + backward + optimizer on both sides.

Decoder (the same on both sides): 4 blocks, 192 wide, 3 heads of 64, MLP ratio 4. For a ViT-Ti
encoder a user shrinks the paper's 8 x 512 decoder (meant for ViT-L) to the encoder's width and
half its depth or less, as the lightweight-ViT MAE studies do; 8 x 512 would be 5x the encoder here.

- ours: `create_backbone("vit_tiny_patch16", image_size=32, patch_size=4)` + `objectives.MAE`, views
  from `objectives.views.make_views` on the uint8 batch, the launcher's fused AdamW.
- lightly: timm `vit_tiny_patch16_224` with img_size=32, patch_size=4 in `MaskedVisionTransformerTIMM`
  + `MAEDecoderTIMM`, lightly's token-mask utilities (its MAE example), views from lightly's
  `MAETransform(input_size=32)` on PIL images (what its data loader runs per image), default AdamW.

"lightly model": lightly's step with its views made once (its model alone), as in bench_dino_small.

`--profile` then profiles one step of ours (see benchmarks.common.profile_step).

Run: `.venv-bench/bin/python -m benchmarks.bench_mae_small [--batch 64] [--rounds 10] [--precision both] [--profile]`
"""

from __future__ import annotations

import argparse
import os
import warnings
from functools import partial

import torch

from benchmarks.bench_dino_small import run_precisions
from benchmarks.common import pick_threads, profile_step

warnings.filterwarnings("ignore", message="MAEDecoderTIMM is deprecated")  # lightly 1.6 still ships it

SIZE, PATCH, MASK_RATIO = 32, 4, 0.75
DECODER_DIM, DECODER_DEPTH, DECODER_HEADS = 192, 4, 3


def make_batch(batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)


def build_ours(batch: int):
    import ssl_vit
    from launch.build import make_adamw
    from objectives import MAE
    from objectives.views import IMAGENET_MEAN, IMAGENET_STD, make_views

    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone("vit_tiny_patch16", image_size=SIZE, patch_size=PATCH)
    model = MAE(backbone, masking_ratio=MASK_RATIO, decoder_dim=DECODER_DIM, decoder_depth=DECODER_DEPTH,
                decoder_heads=DECODER_HEADS, decoder_dim_head=DECODER_DIM // DECODER_HEADS, norm_pix_loss=True)
    model.train()
    opt = make_adamw([{"params": list(model.parameters())}], lr=1.5e-4, betas=(0.9, 0.95), eps=1e-8)
    specs = model.view_specs()
    images = make_batch(batch)

    def step() -> None:
        views = make_views(images, specs, normalize=(IMAGENET_MEAN, IMAGENET_STD))
        opt.zero_grad(set_to_none=True)
        model(views).backward()
        opt.step()

    return step


def build_lightly(batch: int, views_once: bool = False):
    """lightly's step; `views_once`: its views made once before the rounds (its model alone: the ceiling)."""
    import timm
    from lightly.models import utils
    from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM
    from lightly.transforms import MAETransform
    from PIL import Image

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=PATCH, num_classes=0)
    encoder = MaskedVisionTransformerTIMM(vit=vit)
    decoder = MAEDecoderTIMM(num_patches=vit.patch_embed.num_patches, patch_size=PATCH, embed_dim=vit.embed_dim,
                             decoder_embed_dim=DECODER_DIM, decoder_depth=DECODER_DEPTH,
                             decoder_num_heads=DECODER_HEADS, mlp_ratio=4.0)
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95))
    transform = MAETransform(input_size=SIZE)
    seq_len = encoder.sequence_length
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in make_batch(batch)]

    def loss_fn(views: torch.Tensor) -> torch.Tensor:
        b = views.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(b, seq_len), mask_ratio=MASK_RATIO, device=views.device)
        encoded = encoder.encode(images=views, idx_keep=idx_keep)
        x = decoder.embed(encoded)
        full = utils.repeat_token(decoder.mask_token, (b, seq_len))
        full = utils.set_at_index(full, idx_keep, x.type_as(full))
        pred = decoder.predict(utils.get_at_index(decoder.decode(full), idx_mask))
        target = utils.get_at_index(utils.patchify(views, PATCH), idx_mask - 1)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        return torch.nn.functional.mse_loss(pred, target.type_as(pred))

    def make() -> torch.Tensor:
        return torch.stack([transform(img)[0] for img in pil])  # the data loader's work, then its collate

    fixed = make() if views_once else None

    def step() -> None:
        views = fixed if fixed is not None else make()
        opt.zero_grad(set_to_none=True)
        loss_fn(views).backward()
        opt.step()

    return step


BUILDERS = {"ours": build_ours, "lightly": build_lightly, "lightly model": partial(build_lightly, views_once=True)}


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
        title = f"MAE ViT-Ti/4 step (batch {args.batch}, {SIZE} px, decoder {DECODER_DEPTH}x{DECODER_DIM})"
        run_precisions(BUILDERS, args, title)
    if args.profile or args.profile_only:
        profile_step(build_ours(args.batch))


if __name__ == "__main__":
    main()
