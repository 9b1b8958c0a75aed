"""GPU throughput table: training img/s, MFU and peak memory of MAE and DINO, ours vs lightly + timm.

One command on a GPU machine (about 5 minutes on an H100-class GPU):

    .venv-bench/bin/python -m benchmarks.gpu            # or .venv/bin/python: the peer rows are then skipped

prints a markdown table to paste into benchmarks/RESULTS.md. Workloads (the papers' shapes):

- MAE: ViT-B/16 at 224 px, mask 0.75, decoder 8 blocks x 512 (16 heads), normalised-pixel loss,
  batch 128, AdamW.
- DINO: ViT-S/16, 2 x 224 px global + 10 x 96 px local crops, head 2048 hidden / 256 bottleneck /
  65536 prototypes, EMA teacher, batch 64, AdamW.

Each in fp32, bf16 autocast, and bf16 autocast + `torch.compile` (inductor), on both sides:

- ours: `ssl_vit.create_backbone` + `objectives.MAE` / `objectives.Dino`; the views are made on the
  GPU inside the timed step from a uint8 batch (`objectives.views.make_views`), as the launcher does;
  the launcher's fused AdamW; compile wraps the objective.
- lightly + timm: timm's ViT in lightly's MAE modules / DINO head and loss, as in lightly's examples;
  its views come from CPU data-loader workers in a real run, so here they are made once on the GPU
  before timing (a lower bound on lightly's step); default AdamW; compile wraps the loss function.

MFU = counted FLOPs of the step (forward + backward, `torch.utils.flop_counter` through
`launch.throughput`) x steps / seconds / the GPU's dense datasheet peak at that dtype
(`launch.throughput.peak_flops`; fp32 is the non-tensor-core peak unless `--tf32`). Peak memory is
`torch.cuda.max_memory_allocated` over the timed steps. Rows run one after the other (a GPU is not
shared the way the CPU machine is); a row that fails (out of memory, a compile error) prints its error
and the script goes on.

The data pipeline rows time the CPU side alone: WebDataset shards of JPEG images decoded by the
launcher's `ShardStream` in `--workers` processes, and the same plus DINO's views on the GPU.

`--tiny` runs every code path with tiny shapes on the CPU in seconds (compile with the `aot_eager`
backend unless `--compile-backend` says otherwise); tests/test_gpu_script.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

warnings.filterwarnings("ignore", message="MAEDecoderTIMM is deprecated")

MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Shapes:
    """One regime of both workloads."""

    mae_backbone: str
    mae_timm: str
    mae_image: int
    mae_patch: int
    mae_decoder: tuple[int, int, int]  # depth, width, heads
    mae_batch: int
    dino_backbone: str
    dino_timm: str
    dino_patch: int
    dino_global: int
    dino_local: int
    dino_num_local: int
    dino_head: tuple[int, int, int]  # hidden, bottleneck, prototypes
    dino_batch: int
    data_images: int
    overrides: dict = field(default_factory=dict)  # backbone overrides on both sides (tiny: depth)
    labels: tuple[str, str] = ("MAE ViT-B/16", "DINO ViT-S/16")

    @property
    def canvas(self) -> int:
        return self.mae_image * 8 // 7  # 256 px canvas for 224 px crops


FULL = Shapes("vit_base_patch16", "vit_base_patch16_224", 224, 16, (8, 512, 16), 128,
              "vit_small_patch16", "vit_small_patch16_224", 16, 224, 96, 10, (2048, 256, 65536), 64, 2048)
TINY = Shapes("vit_tiny_patch16", "vit_tiny_patch16_224", 32, 8, (1, 32, 2), 4,
              "vit_tiny_patch16", "vit_tiny_patch16_224", 8, 32, 16, 2, (64, 32, 256), 4, 64, overrides={"depth": 2},
              labels=("MAE tiny", "DINO tiny"))


@dataclass
class Contender:
    step: Callable[[], None]
    flops: int
    batch: int


def _ours_backbone(name: str, image: int, patch: int, s: Shapes, device: torch.device):
    import ssl_vit

    return ssl_vit.create_backbone(name, image_size=image, patch_size=patch, **s.overrides).to(device)


def _timm_backbone(name: str, image: int, patch: int, s: Shapes, device: torch.device):
    import timm

    return timm.create_model(name, img_size=image, patch_size=patch, num_classes=0, dynamic_img_size=True,
                             **s.overrides).to(device)


def _uint8(batch: int, size: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8).to(device)


def _count(fn: Callable[[], torch.Tensor]) -> int:
    from launch.throughput import count_callable_flops

    return count_callable_flops(lambda: fn().backward())


def ours_mae(s: Shapes, device: torch.device, autocast, compile_fn) -> Contender:
    from launch.build import make_adamw
    from launch.throughput import count_step_flops
    from objectives import MAE
    from objectives.views import make_views

    depth, width, heads = s.mae_decoder
    model = MAE(_ours_backbone(s.mae_backbone, s.mae_image, s.mae_patch, s, device), masking_ratio=0.75,
                decoder_dim=width, decoder_depth=depth, decoder_heads=heads, decoder_dim_head=width // heads,
                norm_pix_loss=True).to(device).train()
    opt = make_adamw([{"params": list(model.parameters())}], lr=1.5e-4, betas=(0.9, 0.95), eps=1e-8)
    images, specs, run = _uint8(s.mae_batch, s.canvas, device), model.view_specs(), compile_fn(model)
    with autocast():
        flops = count_step_flops(model, make_views(images, specs, normalize=MEAN_STD))

    def step() -> None:
        views = make_views(images, specs, normalize=MEAN_STD)
        with autocast():
            loss = run(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Contender(step, flops, s.mae_batch)


def lightly_mae(s: Shapes, device: torch.device, autocast, compile_fn) -> Contender:
    from lightly.models import utils
    from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

    depth, width, heads = s.mae_decoder
    vit = _timm_backbone(s.mae_timm, s.mae_image, s.mae_patch, s, device)
    encoder = MaskedVisionTransformerTIMM(vit=vit).to(device)
    decoder = MAEDecoderTIMM(num_patches=vit.patch_embed.num_patches, patch_size=s.mae_patch, embed_dim=vit.embed_dim,
                             decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads,
                             mlp_ratio=4.0).to(device)
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(decoder.parameters()), lr=1.5e-4, betas=(0.9, 0.95))
    seq_len, p = encoder.sequence_length, s.mae_patch
    views = torch.randn(s.mae_batch, 3, s.mae_image, s.mae_image, device=device)

    def loss_fn(views: torch.Tensor) -> torch.Tensor:
        b = views.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(b, seq_len), mask_ratio=0.75, device=views.device)
        x = decoder.embed(encoder.encode(images=views, idx_keep=idx_keep))
        full = utils.set_at_index(utils.repeat_token(decoder.mask_token, (b, seq_len)), idx_keep, x.type_as(x))
        pred = decoder.predict(utils.get_at_index(decoder.decode(full), idx_mask))
        target = utils.get_at_index(utils.patchify(views, p), idx_mask - 1)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return torch.nn.functional.mse_loss(pred.float(), target)

    run = compile_fn(loss_fn)
    with autocast():
        flops = _count(lambda: loss_fn(views))

    def step() -> None:
        with autocast():
            loss = run(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Contender(step, flops, s.mae_batch)


def ours_dino(s: Shapes, device: torch.device, autocast, compile_fn) -> Contender:
    from launch.build import make_adamw
    from launch.throughput import count_step_flops
    from objectives import Dino
    from objectives.views import make_views

    hidden, bottleneck, k = s.dino_head
    model = Dino(_ours_backbone(s.dino_backbone, s.dino_global, s.dino_patch, s, device),
                 image_size=s.dino_global, local_crop_size=s.dino_local, num_local_crops=s.dino_num_local,
                 projection_hidden_size=hidden, bottleneck_dim=bottleneck, num_classes_K=k).to(device).train()
    opt = make_adamw([{"params": [p for p in model.parameters() if p.requires_grad]}], lr=5e-4, betas=(0.9, 0.999),
                     eps=1e-8)
    images, specs, run = _uint8(s.dino_batch, s.canvas, device), model.view_specs(), compile_fn(model)
    with autocast():
        flops = count_step_flops(model, make_views(images, specs, normalize=MEAN_STD))

    def step() -> None:
        views = make_views(images, specs, normalize=MEAN_STD)
        with autocast():
            loss = run(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        model.on_before_optimizer_step(0, 1000)
        opt.step()
        model.on_step_end(0, 1000)

    return Contender(step, flops, s.dino_batch)


def lightly_dino(s: Shapes, device: torch.device, autocast, compile_fn) -> Contender:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    hidden, bottleneck, k = s.dino_head
    student = _timm_backbone(s.dino_timm, s.dino_global, s.dino_patch, s, device)
    student_head = DINOProjectionHead(student.embed_dim, hidden, bottleneck, k, freeze_last_layer=1).to(device)
    teacher = copy.deepcopy(student)
    teacher_head = DINOProjectionHead(student.embed_dim, hidden, bottleneck, k).to(device)
    teacher_head.load_state_dict(student_head.state_dict())
    deactivate_requires_grad(teacher)
    deactivate_requires_grad(teacher_head)
    criterion = DINOLoss(output_dim=k, warmup_teacher_temp_epochs=5).to(device)
    opt = torch.optim.AdamW(list(student.parameters()) + [p for p in student_head.parameters() if p.requires_grad],
                            lr=5e-4)
    g, loc = s.dino_global, s.dino_local
    views = [torch.randn(s.dino_batch, 3, g, g, device=device) for _ in range(2)]
    views += [torch.randn(s.dino_batch, 3, loc, loc, device=device) for _ in range(s.dino_num_local)]

    def loss_fn(views: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = [teacher_head(teacher(v)) for v in views[:2]]
        student_out = [student_head(student(v)) for v in views]
        return criterion(teacher_out, student_out, epoch=0)

    run = compile_fn(loss_fn)
    with autocast():
        flops = _count(lambda: loss_fn(views))

    def step() -> None:
        update_momentum(student, teacher, m=0.996)
        update_momentum(student_head, teacher_head, m=0.996)
        with autocast():
            loss = run(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        student_head.cancel_last_layer_gradients(current_epoch=0)
        opt.step()

    return Contender(step, flops, s.dino_batch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per step: the median of `steps` timed steps after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


MODES = {"fp32": (None, False), "bf16": (torch.bfloat16, False), "bf16+compile": (torch.bfloat16, True)}
WORKLOADS = ((ours_mae, lightly_mae), (ours_dino, lightly_dino))


def training_rows(s: Shapes, device: torch.device, args: argparse.Namespace, peers: bool) -> list[dict]:
    from launch.throughput import peak_flops, peak_memory_bytes

    rows = []
    for workload, builders in zip(s.labels, WORKLOADS):
        for impl, build in zip(("ours", "lightly+timm"), builders):
            if impl != "ours" and not peers:
                continue
            for mode, (dtype, compiled) in MODES.items():
                row = {"workload": workload, "impl": impl, "mode": mode}
                _reset_memory(device)
                torch.manual_seed(0)
                torch._dynamo.reset()

                def autocast(dtype=dtype):
                    if dtype is None:
                        return contextlib.nullcontext()
                    return torch.autocast(device.type, dtype=dtype)

                def compile_fn(fn, compiled=compiled):
                    return torch.compile(fn, backend=args.compile_backend) if compiled else fn

                try:
                    contender = build(s, device, autocast, compile_fn)
                    _reset_memory(device)
                    seconds = time_steps(contender.step, device, args.steps, args.warmup + (2 if compiled else 0))
                    peak, _ = peak_flops(device, dtype or torch.float32)
                    achieved = contender.flops / seconds
                    row.update(batch=contender.batch, img_s=contender.batch / seconds, step_ms=1000 * seconds,
                               tflops=achieved / 1e12, mfu=100 * achieved / peak,
                               mem_gb=peak_memory_bytes(device) / 2 ** 30)
                except Exception as err:  # a failed row is reported, the others still run
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
                rows.append(row)
                print(_row_line(row), flush=True)
                contender = None
    return rows


def _write_shards(folder: str, count: int, size: int) -> list[str]:
    from PIL import Image

    from launch.make_shards import ShardWriter

    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(folder, prefix="bench", shard_size=max(1, count // 4))
    for i in range(count):
        # smooth random images (a coarse grid upsampled) compress and decode like photos, not like noise
        coarse = torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)
        img = torch.nn.functional.interpolate(coarse[None].float(), size=(size, size), mode="bilinear")[0]
        buf = io.BytesIO()
        Image.fromarray(img.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=90)
        writer.write(f"{i:08d}", {"jpg": buf.getvalue(), "cls": b"0"})
    writer.close()
    return sorted(os.path.join(folder, sh["name"]) for sh in writer.shards)


def data_rows(s: Shapes, device: torch.device, args: argparse.Namespace) -> list[dict]:
    from launch.data import ShardStream, make_loader
    from objectives.dino import dino_view_specs
    from objectives.views import make_views

    specs = dino_view_specs((s.dino_global,) * 2, (s.dino_local,) * 2, s.dino_num_local)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        urls = _write_shards(folder, s.data_images, s.canvas * 5 // 4)
        for label, views in (("decode", False), ("decode + DINO views", True)):
            row = {"workload": f"data: {label}", "impl": "ours", "mode": f"{args.workers} workers"}
            try:
                stream = ShardStream(urls, batch_size=s.dino_batch, image_size=s.canvas, infinite=True)
                batches = iter(make_loader(stream, args.workers, pin_memory=device.type == "cuda"))
                n = max(2, s.data_images // s.dino_batch)
                for i in range(n + 2):  # two warm-up batches: workers started, pipelines built
                    if i == 2:
                        _sync(device)
                        t0 = time.perf_counter()
                    images = next(batches)["image"].to(device, non_blocking=True)
                    if views:
                        make_views(images, specs, normalize=MEAN_STD)
                _sync(device)
                seconds = time.perf_counter() - t0
                row.update(batch=s.dino_batch, img_s=n * s.dino_batch / seconds, step_ms=1000 * seconds / n)
                del batches
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
            rows.append(row)
            print(_row_line(row), flush=True)
    return rows


COLUMNS = (("workload", "workload", "{}"), ("impl", "impl", "{}"), ("mode", "mode", "{}"), ("batch", "batch", "{}"),
           ("img_s", "img/s", "{:.1f}"), ("step_ms", "step ms", "{:.1f}"), ("tflops", "TFLOP/s", "{:.3g}"),
           ("mfu", "MFU %", "{:.1f}"), ("mem_gb", "peak mem GB", "{:.2f}"))


def _row_line(row: dict) -> str:
    cells = []
    for key, _, fmt in COLUMNS:
        value = row.get(key)
        cells.append("-" if value is None else fmt.format(value))
    if "error" in row:
        cells.append(row["error"])
    return "| " + " | ".join(cells) + " |"


def table(rows: list[dict]) -> str:
    """The markdown table of `rows` (the lines printed while running, with a header)."""
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|" + "|".join(" --- " for _ in COLUMNS) + "|"
    return "\n".join([head, rule, *(_row_line(r) for r in rows)])


def _peers_available() -> bool:
    try:
        import lightly  # noqa: F401
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (seconds): every code path")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10, tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, tiny 1)")
    parser.add_argument("--no-peers", action="store_true", help="skip lightly + timm")
    parser.add_argument("--no-data", action="store_true", help="skip the data pipeline rows")
    parser.add_argument("--workers", type=int, default=None, help="data workers (default min(8, CPUs), tiny 0)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; tiny aot_eager)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in fp32 (MFU against the TF32 peak)")
    args = parser.parse_args(argv)
    s = TINY if args.tiny else FULL
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.workers = args.workers if args.workers is not None else (0 if args.tiny else min(8, os.cpu_count() or 1))
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops: one thread is fastest, and robust to a loaded machine
    try:
        return _run(args, s, device)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, s: Shapes, device: torch.device) -> list[dict]:
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from launch.throughput import peak_flops

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; compile backend {args.compile_backend}")
    for dtype in (torch.float32, torch.bfloat16):
        value, how = peak_flops(device, dtype)
        print(f"peak {str(dtype).removeprefix('torch.')}: {value / 1e12:.4g} TFLOP/s ({how})")
    peers = not args.no_peers and _peers_available()
    if not peers:
        print("lightly + timm rows skipped (" + ("--no-peers" if args.no_peers else "not installed") + ")")
    print(table([]), flush=True)
    rows = training_rows(s, device, args, peers)
    if not args.no_data:
        rows += data_rows(s, device, args)
    print("\n" + table(rows))
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} row(s) failed")
    return rows


if __name__ == "__main__":
    main()
