"""Learning quality at a fixed wall-clock budget: every objective, pretrained, then probed.

For each objective and data set, `python pretrain.py` (the user's command) pretrains a ViT-Ti/4 at 32 px
(`vit_tiny_patch16` with `backbone_args` image_size=32, patch_size=4: dim 192, depth 12, 3 heads, 65
tokens) under the demo profile's small-run settings (`--set profile=demo`: 32 px views, batch 32, lr
1e-3 (2.5e-4 for DINO, EsViT, iBOT), the objectives' small heads) for a fixed wall-clock budget with a
complete schedule: a short calibration run (same command, a few steps) gives the start-up cost and the
time per step, and `--steps` is set so the real run, start-up and export included, fits the budget. The
exported backbone (`ssl_vit.load_backbone`) is then read out on the held-out split with one
logistic-regression probe (scikit-learn, standardised pooled features) and the weighted k-NN of
launch.knn (k=20, T=0.07), always next to the same backbone at random initialisation (the exact weights
the run started from) and raw pixels. A dense read-out goes with them ("patch" column): the same k-NN on
patch tokens against the image label map, i.e. each held-out patch token classified by the patch tokens
of the training images at 16 grid positions drawn once, every token carrying its image's label (raw
pixels: the 4x4 patches).

Data (benchmarks.quality_data): the embedded digits at 32 px and crops of the colour photographs that
ship with scikit-image and scikit-learn, labelled by source photograph, with spatially disjoint
held-out crops.

Targets (per data set, at the default 300 s): the DINO family (DINO, EsViT, iBOT, DINOv2) at most 0.5x
the probe error of random init and below raw pixels' probe error, k-NN error at most 0.6x random init's;
MAE, SimMIM, MPP and MP3 at most 0.8x random init's probe error. Each row prints PASS or MISS.

`--peers`: lightly's DINO (timm ViT-Ti/4, `DINOTransform` sized for 32 px, `DINOProjectionHead`,
`DINOLoss`, a plain loop as in lightly's example) and vit-pytorch's `Dino` (its ViT at the same
shape) on the same data, budget (calibrated the same way) and read-out; their rows are held to
DINO's targets and read against their own random init.

Run: `.venv-bench/bin/python -m benchmarks.bench_quality [--objectives dino,mae] [--datasets digits,photos]
[--budget 300] [--peers] [--out DIR] [--quick] [--backbone-arg K=V] [--set K=V]`
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.quality_data import DATASETS, dataset_shards, load_split
from launch.config import LaunchError, parse_set, read_yaml

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ("dino", "esvit", "ibot", "dinov2", "mae", "simmim", "mpp", "mp3")
PEERS = ("lightly-dino", "vit-pytorch-dino")
BACKBONE, BACKBONE_ARGS = "vit_tiny_patch16", {"image_size": 32, "patch_size": 4}
QUICK_BACKBONE, QUICK_ARGS = "vit_tiny", {}  # --quick: a smoke test, not a measurement
SIZE, BATCH = 32, 32
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
K, T = 20, 0.07
PATCHES_PER_IMAGE = 16  # grid positions per image in the patch-level k-NN (bank: train images x 16 tokens)


@dataclass
class Target:
    probe: float  # largest probe error / random-init probe error
    knn: float | None = None  # largest k-NN error / random-init k-NN error
    below_raw: bool = False  # probe error below raw pixels' probe error


TARGETS = {name: Target(0.5, 0.6, True) for name in ("dino", "esvit", "ibot", "dinov2")}  # the DINO family
TARGETS.update({name: Target(0.8) for name in ("mae", "simmim", "mpp", "mp3")})
PEER_TARGET = TARGETS["dino"]


@dataclass
class Row:
    method: str
    dataset: str
    probe: float
    knn: float
    steps: int | None = None
    images_per_s: float | None = None
    wall_s: float | None = None
    baseline: dict = field(default_factory=dict)  # random init's {"probe", "knn"} for this backbone
    verdict: str = ""
    patch_knn: float | None = None  # patch tokens against the image label map (`patch_knn`), percent
    rank: float | None = None  # effective rank of the centred held-out pooled features: dimensional collapse

    def ratios(self) -> tuple[float, float]:
        """(probe error / random-init probe error, k-NN error / random-init k-NN error)."""
        def ratio(a: float, b: float) -> float:
            return (100 - a) / (100 - b) if b < 100 else math.inf
        return ratio(self.probe, self.baseline["probe"]), ratio(self.knn, self.baseline["knn"])


# ---- read-out ------------------------------------------------------------------------------------
@dataclass
class Split:
    train_x: torch.Tensor  # uint8 (N, 3, S, S)
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def prepare(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 batch -> normalised float, as the backbone saw it in training."""
    from launch.knn import normalizer

    return normalizer(mean, std, SIZE)(images)


@torch.no_grad()
def embed(features: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mean: tuple, std: tuple,
          batch: int = 256) -> torch.Tensor:
    """Frozen features (N, D) of uint8 images through `features` (normalised input -> (B, D))."""
    return torch.cat([features(prepare(images[i:i + batch], mean, std)).float() for i in range(0, len(images), batch)])


def backbone_features(backbone: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    backbone.eval()
    return lambda x: backbone.forward_features(x).pooled


def read_out(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor) -> dict:
    """{"probe": logistic-regression top-1, "knn": weighted k-NN top-1} in percent on the held-out split, and
    "rank": the effective rank of the centred held-out features (`objectives.dino.effective_rank`)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from launch.knn import knn_classify, topk_accuracy
    from objectives.dino import effective_rank

    num_classes = int(max(train_y.max(), val_y.max())) + 1
    scores = knn_classify(train_f, train_y, val_f, k=K, t=T, num_classes=num_classes)
    knn = topk_accuracy(scores, val_y, ks=(1,))[0]
    scaler = StandardScaler().fit(train_f.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=1000).fit(scaler.transform(train_f.numpy()), train_y.numpy())
    probe = 100.0 * float((clf.predict(scaler.transform(val_f.numpy())) == val_y.numpy()).mean())
    return {"probe": probe, "knn": knn, "rank": float(effective_rank(val_f))}


def evaluate(features: Callable[[torch.Tensor], torch.Tensor], split: Split, mean: tuple, std: tuple) -> dict:
    return read_out(embed(features, split.train_x, mean, std), split.train_y,
                    embed(features, split.val_x, mean, std), split.val_y)


def patch_knn(patches: Callable[[torch.Tensor], torch.Tensor], split: Split, mean: tuple, std: tuple,
              per_image: int = PATCHES_PER_IMAGE, seed: int = 0, batch: int = 256) -> float:
    """Weighted k-NN top-1 (percent) of patch tokens against the image label map: `patches` maps normalised
    images to (B, N, D) tokens; at `per_image` of the N grid positions (drawn once, the same for every
    image) each held-out token is classified by the training images' tokens, each labelled with its image's
    label. A dense read-out (iBOT, DINOv2): it scores what the patch tokens carry, not the pooled feature."""
    from launch.knn import knn_classify, topk_accuracy

    with torch.no_grad():
        grid = patches(prepare(split.train_x[:1], mean, std)).shape[1]
    where = torch.randperm(grid, generator=torch.Generator().manual_seed(seed))[:per_image]
    picked = lambda x: patches(x)[:, where]  # (B, per_image, D)
    train_f, val_f = (embed(picked, images, mean, std, batch).flatten(0, 1) for images in (split.train_x, split.val_x))
    per = len(where)
    num_classes = int(max(split.train_y.max(), split.val_y.max())) + 1
    scores = knn_classify(train_f, split.train_y.repeat_interleave(per), val_f, k=K, t=T, num_classes=num_classes)
    return topk_accuracy(scores, split.val_y.repeat_interleave(per), ks=(1,))[0]


def backbone_patches(backbone: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    backbone.eval()
    return lambda x: backbone.forward_features(x).patch_tokens


def pixel_patches(size: int = 4) -> Callable[[torch.Tensor], torch.Tensor]:
    """Raw pixels as (B, N, 3 * size * size) patch tokens on the backbone's grid of `size`-pixel patches."""
    return lambda x: torch.nn.functional.unfold(x, size, stride=size).transpose(1, 2)


def raw_pixels(split: Split, mean: tuple, std: tuple) -> dict:
    flat = lambda x: x.flatten(1)
    return evaluate(flat, split, mean, std)


# ---- ours: pretrain.py under a budget -------------------------------------------------------------
def pretrain_command(objective: str, data: str, steps: int, out: Path, backbone: str, backbone_args: dict,
                     log_every: int, settings: tuple[str, ...] = ()) -> list[str]:
    """pretrain.py's command line for one run; `settings` are extra `--set KEY=VALUE` (after the bench's own)."""
    cmd = [sys.executable, "pretrain.py", "--objective", objective, "--backbone", backbone, "--data", data,
           "--steps", str(steps), "--out", str(out), "--set", "profile=demo", "--set", f"data.batch_size={BATCH}",
           "--set", f"train.log_every={log_every}", "--set", f"train.checkpoint_every={steps}",
           "--set", "train.keep_checkpoints=1", "--set", "train.seed=0"]
    for key, value in backbone_args.items():
        cmd += ["--set", f"backbone_args.{key}={value}"]
    for setting in settings:
        cmd += ["--set", setting]
    return cmd


def run_pretrain(cmd: list[str], out: Path, timeout: float) -> float:
    """Run one pretrain.py command (fresh --out); returns its wall-clock seconds."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n" + "\n".join(tail))
    return wall


def run_batch(out: Path) -> int:
    """The batch a finished run used, from the config it saved (a `--set data.batch_size=N` overrides BATCH)."""
    return int(read_yaml(out / "config.yaml")["data"]["batch_size"])


def step_times(out: Path, batch: int | None = None) -> list[float]:
    """Seconds per step of each logged window of a finished run (metrics.jsonl), at the run's own batch
    (read from its config unless given)."""
    batch = run_batch(out) if batch is None else batch
    times, last = [], 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        ips = record.get("train/images_per_s")
        if ips:
            steps = record["step"] - last
            times += [batch / ips] * steps
            last = record["step"]
    return times


def pretrain_budgeted(objective: str, data: str, budget: float, work: Path, backbone: str, backbone_args: dict,
                      calib_steps: int, settings: tuple[str, ...] = ()) -> dict:
    """Calibrate, then pretrain with --steps set to fit `budget`; returns steps, images/s, wall, export."""
    cal_out = work / "calibrate"
    cal_cmd = pretrain_command(objective, data, calib_steps, cal_out, backbone, backbone_args, 1, settings)
    cal_wall = run_pretrain(cal_cmd, cal_out, timeout=600 + 60 * calib_steps)
    times = step_times(cal_out)
    per_step = sorted(times[1:] or times)[len(times[1:] or times) // 2]  # median, the first step is warm-up
    fixed = max(0.0, cal_wall - sum(times))  # start-up, checkpoint, export
    steps = max(1, int((budget - fixed) / per_step))
    out = work / "run"
    log_every = max(1, min(10, steps // 5))
    cmd = pretrain_command(objective, data, steps, out, backbone, backbone_args, log_every, settings)
    wall = run_pretrain(cmd, out, timeout=3 * budget + 600)
    batch = run_batch(out)
    times = step_times(out, batch)
    meta = json.loads((out / "export" / "backbone.json").read_text())
    return {"steps": int(meta.get("step") or steps), "images_per_s": batch * len(times) / sum(times),
            "wall_s": wall,
            "calibration": {"steps": calib_steps, "wall_s": cal_wall, "step_s": per_step, "fixed_s": fixed},
            "export": out / "export"}


def data_norm(export: Path) -> tuple[tuple, tuple]:
    """The (mean, std) an export was trained with, from its saved config; ImageNet's where it has none."""
    cfg = read_yaml(export / "config.yaml") if (export / "config.yaml").is_file() else {}
    d = cfg.get("data") or {}
    return tuple(d.get("mean", IMAGENET[0])), tuple(d.get("std", IMAGENET[1]))


# ---- peers ----------------------------------------------------------------------------------------
def budgeted_loop(build: Callable[[int], Callable[[int], None]], budget: float, calib_steps: int) -> dict:
    """A peer's plain loop under the same rule as ours: time `calib_steps` steps of a throwaway build,
    then build afresh (seed 0) with the schedule sized to fit `budget` and run all of it."""
    t0 = time.perf_counter()
    step = build(calib_steps)
    build_s = time.perf_counter() - t0
    times = []
    for i in range(calib_steps):
        t1 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t1)
    per_step = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    steps = max(1, int((budget - build_s) / per_step))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    step = build(steps)
    t1 = time.perf_counter()
    for i in range(steps):
        step(i)
    end = time.perf_counter()
    return {"steps": steps, "images_per_s": BATCH * steps / (end - t1), "wall_s": end - t0,
            "calibration": {"steps": calib_steps, "step_s": per_step}}


def batches(images: torch.Tensor, seed: int = 0):
    """Endless shuffled uint8 batches of BATCH images (epochs over the training split)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(order) - BATCH + 1, BATCH):
            yield images[order[i:i + BATCH]]


def lightly_dino(split: Split) -> tuple[Callable, Callable]:
    """(build(total_steps) -> step(i), model()) for lightly's DINO on timm's ViT-Ti/4."""
    import timm
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule
    from PIL import Image

    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in split.train_x]
    transform = DINOTransform(global_crop_size=SIZE, local_crop_size=SIZE // 2)
    state: dict = {}
    steps_per_epoch = max(1, len(pil) // BATCH)

    def build(total: int) -> Callable[[int], None]:
        torch.manual_seed(0)
        student = timm.create_model("vit_tiny_patch16_224", patch_size=4, img_size=SIZE, num_classes=0,
                                    dynamic_img_size=True)
        head = DINOProjectionHead(student.embed_dim, 512, 64, 2048, freeze_last_layer=1)
        teacher = copy.deepcopy(student)
        teacher_head = DINOProjectionHead(student.embed_dim, 512, 64, 2048)
        teacher_head.load_state_dict(head.state_dict())
        deactivate_requires_grad(teacher)
        deactivate_requires_grad(teacher_head)
        criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=5)
        opt = torch.optim.AdamW(list(student.parameters()) + list(head.parameters()), lr=1e-3)
        order = iter(batches(torch.arange(len(pil))))
        state.update(teacher=teacher)

        def step(i: int) -> None:
            idx = next(order)
            views = [torch.stack(v) for v in zip(*(transform(pil[j]) for j in idx.tolist()))]
            epoch = i // steps_per_epoch
            momentum = cosine_schedule(i, total, 0.996, 1)
            update_momentum(student, teacher, m=momentum)
            update_momentum(head, teacher_head, m=momentum)
            teacher_out = [teacher_head(teacher(v)) for v in views[:2]]
            student_out = [head(student(v)) for v in views]
            loss = criterion(teacher_out, student_out, epoch=epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            head.cancel_last_layer_gradients(current_epoch=epoch)
            opt.step()

        return step

    return build, lambda: state["teacher"].eval()


def vit_pytorch_dino(split: Split) -> tuple[Callable, Callable]:
    """(build(total_steps) -> step(i), model()) for vit-pytorch's Dino on its ViT at ViT-Ti/4's shape."""
    from torch import nn
    from vit_pytorch import ViT
    from vit_pytorch.dino import Dino

    state: dict = {}

    def build(total: int) -> Callable[[int], None]:
        torch.manual_seed(0)
        net = ViT(image_size=SIZE, patch_size=4, num_classes=10, dim=192, depth=12, heads=3, mlp_dim=768, dim_head=64)
        learner = Dino(net, image_size=SIZE, hidden_layer="to_latent", projection_hidden_size=256,
                       projection_layers=4, num_classes_K=2048, student_temp=0.9, teacher_temp=0.04,
                       local_upper_crop_scale=0.4, global_lower_crop_scale=0.5, moving_average_decay=0.9,
                       center_moving_average_decay=0.9)
        opt = torch.optim.Adam(learner.parameters(), lr=3e-4)
        data = iter(batches(split.train_x))
        state.update(learner=learner, net=net)

        def step(i: int) -> None:
            loss = learner(next(data).float() / 255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            learner.update_moving_average()

        return step

    def model() -> nn.Module:
        learner = state["learner"]
        encoder = learner.teacher_encoder or learner.student_encoder
        net = copy.deepcopy(encoder.net).eval()
        net.mlp_head = nn.Identity()  # the pooled latent (what `hidden_layer="to_latent"` trains)
        return net

    return build, model


PEER_BUILDERS = {"lightly-dino": lightly_dino, "vit-pytorch-dino": vit_pytorch_dino}


def peer_available(name: str) -> str | None:
    """None when the peer can run, else why not."""
    need = {"lightly-dino": ("lightly", "timm"), "vit-pytorch-dino": ("vit_pytorch",)}[name]
    for module in need:
        try:
            __import__(module)
        except ImportError:
            return f"{module} not installed (make .venv-bench/.installed)"
    return None


# ---- the table ------------------------------------------------------------------------------------
def verdict(row: Row, raw: dict, target: Target) -> str:
    probe_ratio, knn_ratio = row.ratios()
    ok = probe_ratio <= target.probe
    if target.knn is not None:
        ok = ok and knn_ratio <= target.knn
    if target.below_raw:
        ok = ok and row.probe > raw["probe"]
    return "PASS" if ok else "MISS"


def format_table(rows: list[Row]) -> str:
    head = (f"{'method':30s} {'data':7s} {'steps':>6s} {'wall s':>6s} {'img/s':>7s} {'probe':>6s} {'k-NN':>6s} "
            f"{'patch':>6s} {'rank':>5s} {'gain':>6s} {'k-gain':>6s} {'p-err x':>7s} {'k-err x':>7s}  target")
    lines = [head, "-" * len(head)]
    for r in rows:
        steps = "-" if r.steps is None else str(r.steps)
        ips = "-" if r.images_per_s is None else f"{r.images_per_s:.1f}"
        wall = "-" if r.wall_s is None else f"{r.wall_s:.0f}"
        if r.baseline:
            pr, kr = r.ratios()
            extra = (f"{r.probe - r.baseline['probe']:+6.1f} {r.knn - r.baseline['knn']:+6.1f} {pr:7.2f} {kr:7.2f}  "
                     f"{r.verdict}")
        else:
            extra = f"{'-':>6s} {'-':>6s} {'-':>7s} {'-':>7s}  -"
        patch = "-" if r.patch_knn is None else f"{r.patch_knn:.1f}"
        rank = "-" if r.rank is None else f"{r.rank:.1f}"
        lines.append(f"{r.method:30s} {r.dataset:7s} {steps:>6s} {wall:>6s} {ips:>7s} {r.probe:6.1f} {r.knn:6.1f} "
                     f"{patch:>6s} {rank:>5s} {extra}")
    return "\n".join(lines)


# ---- driver ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated (default: all eight)")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: digits, photos")
    p.add_argument("--budget", type=float, default=None, help="wall-clock seconds per pretraining run (300)")
    p.add_argument("--peers", action="store_true", help="also lightly's and vit-pytorch's DINO")
    p.add_argument("--out", default="runs/bench_quality", help="work folder (runs, logs, results.json)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 10 s budget, vit_tiny, 2 calibration steps, a subset of the data")
    p.add_argument("--calib-steps", type=int, default=None, help="steps of the calibration run (4)")
    p.add_argument("--cache", default=None, help="where the data shards are built (default $SSL_VIT_CACHE)")
    p.add_argument("--backbone-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a backbone argument for our runs and their random init, e.g. pos_init_std=1 (repeatable)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a pretrain.py --set for our runs, e.g. optim.lr=2.5e-4 (repeatable; not the peers)")
    args = p.parse_args(argv)
    try:  # the launcher's --set parser: KEY=VALUE with YAML values
        args.backbone_args = parse_set(args.backbone_arg)
    except LaunchError as err:
        p.error(f"--backbone-arg wants KEY=VALUE: {err}")
    try:
        parse_set(args.settings)
    except LaunchError as err:
        p.error(f"--set wants KEY=VALUE: {err}")
    args.settings = tuple(args.settings)
    args.objectives = [o for o in args.objectives.split(",") if o]
    args.datasets = [d for d in args.datasets.split(",") if d]
    bad = [o for o in args.objectives if o not in OBJECTIVES] + [d for d in args.datasets if d not in DATASETS]
    if bad:
        p.error(f"unknown objective or data set: {', '.join(bad)}")
    if args.budget is None:
        args.budget = 10.0 if args.quick else 300.0
    if args.calib_steps is None:
        args.calib_steps = 2 if args.quick else 4
    return args


def run(args: argparse.Namespace) -> list[Row]:
    """Every row of the table (baselines first per data set); also writes <out>/results.json."""
    import ssl_vit

    work = Path(args.out).resolve()
    backbone, backbone_args = (QUICK_BACKBONE, QUICK_ARGS) if args.quick else (BACKBONE, BACKBONE_ARGS)
    backbone_args = {**backbone_args, **args.backbone_args}
    limit = (384, 192) if args.quick else (None, None)
    rows: list[Row] = []

    def add(row: Row) -> None:  # printed and saved as it comes, so an interrupted run keeps what it measured
        rows.append(row)
        print(f"  {row.method} on {row.dataset}: probe {row.probe:.1f}, k-NN {row.knn:.1f}"
              + (f", patch k-NN {row.patch_knn:.1f}" if row.patch_knn is not None else "")
              + (f", rank {row.rank:.1f}" if row.rank is not None else "")
              + (f", {row.steps} steps in {row.wall_s:.0f} s, {row.images_per_s:.1f} img/s {row.verdict}"
                 if row.steps is not None else ""), flush=True)
        work.mkdir(parents=True, exist_ok=True)
        (work / "results.json").write_text(json.dumps({"budget_s": args.budget, "quick": args.quick,
                                                       "rows": [r.__dict__ for r in rows]}, indent=1, default=str))

    for dataset in args.datasets:
        train, val = dataset_shards(dataset, args.cache)
        split = Split(*load_split(train, SIZE, limit[0]), *load_split(val, SIZE, limit[1]))
        print(f"{dataset}: {len(split.train_y)} train / {len(split.val_y)} held-out images, "
              f"{int(split.train_y.max()) + 1} classes", flush=True)
        demo_norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        raw = raw_pixels(split, *demo_norm)
        add(Row("raw pixels", dataset, raw["probe"], raw["knn"], rank=raw["rank"],
                patch_knn=patch_knn(pixel_patches(BACKBONE_ARGS["patch_size"]), split, *demo_norm)))
        baselines: dict[str, dict] = {}
        for objective in args.objectives:
            t0 = time.perf_counter()
            result = pretrain_budgeted(objective, train, args.budget, work / f"{objective}-{dataset}", backbone,
                                       backbone_args, args.calib_steps, args.settings)
            norm = data_norm(result["export"])
            if "ours" not in baselines:
                torch.manual_seed(0)  # what pretrain.py builds at step 0 (train.seed 0)
                initial = ssl_vit.create_backbone(backbone, **backbone_args)
                baselines["ours"] = evaluate(backbone_features(initial), split, *norm)
                add(Row(f"random init ({backbone})", dataset, **baselines["ours"],
                        patch_knn=patch_knn(backbone_patches(initial), split, *norm)))
            trained = ssl_vit.load_backbone(result["export"])
            scores = evaluate(backbone_features(trained), split, *norm)
            row = Row(objective, dataset, scores["probe"], scores["knn"], result["steps"], result["images_per_s"],
                      result["wall_s"], baselines["ours"], patch_knn=patch_knn(backbone_patches(trained), split, *norm),
                      rank=scores["rank"])
            row.verdict = verdict(row, raw, TARGETS[objective])
            cal = result["calibration"]
            print(f"  {objective}: calibration {cal['step_s']:.2f} s/step, {cal['fixed_s']:.0f} s fixed; "
                  f"{time.perf_counter() - t0:.0f} s in all", flush=True)
            add(row)
        for peer in PEERS if args.peers else ():
            missing = peer_available(peer)
            if missing:
                print(f"  {peer}: skipped, {missing}", flush=True)
                continue
            build, model = PEER_BUILDERS[peer](split)
            torch.manual_seed(0)
            build(1)
            baseline = evaluate(backbone_features_any(model()), split, *IMAGENET)  # its own random init
            add(Row(f"random init ({peer})", dataset, **baseline))
            result = budgeted_loop(build, args.budget, args.calib_steps)
            scores = evaluate(backbone_features_any(model()), split, *IMAGENET)
            row = Row(peer, dataset, scores["probe"], scores["knn"], result["steps"], result["images_per_s"],
                      result["wall_s"], baseline, rank=scores["rank"])
            row.verdict = verdict(row, raw, PEER_TARGET)
            add(row)
    return rows


def backbone_features_any(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A peer's pooled features: its forward with the classifier removed."""
    model.eval()
    return lambda x: model(x)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    print(f"learning quality: budget {args.budget:.0f} s per run, {'quick smoke test, ' if args.quick else ''}"
          f"load {os.getloadavg()[0]:.2f}, torch threads {threads}"
          + (f", backbone args {args.backbone_args}" if args.backbone_args else "")
          + (f", settings {' '.join(args.settings)}" if args.settings else ""), flush=True)
    rows = run(args)
    print()
    print(format_table(rows))
    print("gain / k-gain: top-1 points over the same backbone at random init; p-err x / k-err x: probe / k-NN "
          "error over random init's. Targets: dino, esvit, ibot, dinov2 (and the peers) p-err x <= 0.5, below raw "
          "pixels' probe error, k-err x <= 0.6; mae, simmim, mpp, mp3 p-err x <= 0.8.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
