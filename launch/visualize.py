"""Pictures of a run: class-token attention maps, MAE/SimMIM reconstructions, training curves.

`python -m launch.visualize RUN_DIR` writes `attention.png`, `reconstruction.png` (objectives with a
`reconstruct` method) and `curves.png` to RUN_DIR/visualize; with `--registers-vs OTHER_RUN`, also
`registers.png`: the maps of the backbone with register tokens next to the one without (Darcet et
al. 2024). The attention maps are the last layer's class-token attention over the patches, per head
and averaged, as in DINO's Figure 1 (Caron et al. 2021); models without a class token show the
attention each patch receives.
Reconstructions are shown in pixel space: the objective puts per-patch normalised predictions back
with each patch's own statistics (`objectives.losses.unnormalize_patches`), and the figure undoes the
launcher's `data.mean`/`data.std` normalisation per channel. Curves are one panel per metric family
(losses, learning rate and weight decay, throughput, k-NN accuracy, DINO-family collapse metrics), the raw
series faint under its exponential moving average. Drawn with matplotlib's object-oriented API on the
Agg canvas (no display, no pyplot state). `log_images(writer, step, ...)` puts the same pictures into
TensorBoard for the launcher.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

import ssl_vit
from ssl_vit import Recorder
from ssl_vit.masking import upsample_mask

from . import checkpoint as ckpt
from .args import ArgumentParser
from .build import restore
from .data import ShardStream, expand_shards
from .digits import digits_shards
from .errors import LaunchError
from .knn import IMAGENET_MEAN, IMAGENET_STD, normalizer

__all__ = ["attention_maps", "attention_figure", "register_share", "registers_figure", "reconstruction_figure",
           "reconstruction_pixels", "curves_figure", "metric_panels", "ema", "read_metrics", "run_figures",
           "log_images", "visualize_run", "main"]

CELL = 1.35  # inches per picture in a grid figure
DPI = 100
_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def render(fig: Figure) -> Image.Image:
    """A matplotlib Figure drawn on the Agg canvas -> an RGB PIL image."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def _rgb(image: torch.Tensor) -> np.ndarray:
    """(3 or 1, H, W) float in [0, 1] or uint8 -> (H, W, 3) float in [0, 1] for imshow."""
    if image.dtype == torch.uint8:
        image = image.float() / 255
    array = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _grid_axes(rows: int, cols: int, title: str | None) -> tuple[Figure, np.ndarray]:
    top = 0.3 if title else 0.0
    fig = Figure(figsize=(cols * CELL, rows * CELL + 0.3 + top), dpi=DPI, facecolor="white")
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (0.3 + top) / (rows * CELL + 0.3 + top),
                        wspace=0.05, hspace=0.05)
    for ax in axes.flat:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11, y=0.995, va="top")
    return fig, axes


@torch.no_grad()
def _last_attention(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """The last attention layer's weights (B, heads, N, N) on x (B, C, H, W), with N = prefix + h * w, and
    (prefix, h, w). LaunchError when the model records none or its last layer is not global over the final grid."""
    was_training = backbone.training
    backbone.eval()
    recorder = Recorder(backbone)
    try:
        _, attns = recorder(x)
        grid = backbone.forward_features(x).grid
    finally:
        recorder.eject()
        backbone.train(was_training)
    if attns is None:
        raise LaunchError(f"{type(backbone).__name__} has no ssl_vit attention layer to record")
    last = (attns[-1] if isinstance(attns, list) else attns)[:, -1]  # (B', heads, N, M)
    h, w = grid[-2], grid[-1]
    prefix = last.shape[-1] - h * w
    if last.shape[0] != x.shape[0] or prefix < 0 or last.shape[-2] != last.shape[-1]:
        raise LaunchError(f"{type(backbone).__name__}: its last attention layer is not global over the final "
                          "grid (windowed or pooled attention), so no per-image map can be drawn")
    return last, prefix, h, w


def _has_class_token(backbone: nn.Module, prefix: int) -> bool:
    return prefix - backbone.num_registers >= 1  # a class token in front of the registers


def attention_maps(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Last attention layer's maps over the final token grid: x (B, C, H, W) -> (B, heads, h, w), each
    map scaled to [0, 1], and what they show ("class token" or "received")."""
    last, prefix, h, w = _last_attention(backbone, x)
    if _has_class_token(backbone, prefix):
        maps, what = last[:, :, 0, prefix:], "class token"
    else:  # what each patch receives from every query, register columns left out
        maps, what = last[:, :, :, prefix:].mean(dim=2), "received"
    maps = maps.reshape(*maps.shape[:2], h, w)
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12), what


def register_share(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The share of the last layer's attention that goes to the register tokens: x (B, C, H, W) -> (B,) in
    [0, 1], mean over heads; the class token's row where there is one, else the mean over every query.
    Zeros for a backbone without registers."""
    last, prefix, _, _ = _last_attention(backbone, x)
    registers = backbone.num_registers
    if not registers:
        return x.new_zeros(x.shape[0])
    rows = last[:, :, :1] if _has_class_token(backbone, prefix) else last
    return rows[..., prefix - registers:prefix].sum(-1).mean(dim=(1, 2))


def attention_figure(backbone: nn.Module, images: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
                     max_heads: int = 6) -> Image.Image:
    """Rows of: image, mean-over-heads map on the image, then each head's map (inferno colour map, one
    colour bar). images: uint8 (B, 3, H, W)."""
    x = prepare(images)
    maps, what = attention_maps(backbone, x)
    heads = min(maps.shape[1], max_heads)
    fig, axes = _grid_axes(images.shape[0], heads + 2,
                           f"last-layer attention of {type(backbone).__name__} ({what}), per image")
    size = x.shape[-2:]
    extent = (0, size[1], size[0], 0)
    labels = ["image", "mean over heads"] + [f"head {i}" for i in range(heads)]
    for b in range(images.shape[0]):
        picture = _rgb(torch.nn.functional.interpolate(images[b:b + 1].float(), size=size)[0] / 255)
        mean = maps[b].mean(0)
        mean = ((mean - mean.min()) / (mean.max() - mean.min()).clamp_min(1e-12)).cpu().numpy()
        axes[b, 0].imshow(picture, interpolation="nearest", extent=extent)
        axes[b, 1].imshow(picture, interpolation="nearest", extent=extent)
        axes[b, 1].imshow(mean, cmap="inferno", alpha=0.6, vmin=0, vmax=1, interpolation="nearest", extent=extent)
        for i in range(heads):
            axes[b, i + 2].imshow(maps[b, i].cpu().numpy(), cmap="inferno", vmin=0, vmax=1,
                                  interpolation="nearest", extent=extent)
    for c, label in enumerate(labels):
        axes[0, c].set_title(label, fontsize=8)
    return render(fig)


def _mean_map(maps: torch.Tensor) -> np.ndarray:
    """(heads, h, w) maps -> their mean (h, w), scaled to [0, 1]."""
    mean = maps.mean(0)
    return ((mean - mean.min()) / (mean.max() - mean.min()).clamp_min(1e-12)).cpu().numpy()


def registers_figure(with_registers: nn.Module, without: nn.Module, images: torch.Tensor,
                     prepare: Callable[[torch.Tensor], torch.Tensor],
                     prepare_without: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Image.Image:
    """Attention maps with and without registers (Darcet et al. 2024, Fig. 1): rows of image, then for the backbone
    without registers and the one with them the mean-over-heads last-layer map on the image and alone (inferno,
    [0, 1] per map). Register columns are left out of the maps; the titles give the share of attention the
    registers take. images: uint8 (B, 3, H, W); `prepare_without` (default `prepare`) normalises for `without`.
    LaunchError unless `with_registers` has registers and `without` has none."""
    if with_registers.num_registers < 1 or without.num_registers != 0:
        raise LaunchError(f"comparing registers needs one backbone with registers and one without; got "
                          f"{with_registers.num_registers} and {without.num_registers} registers")
    columns: list[tuple[str, str, np.ndarray]] = []
    size = None
    for model, prep in ((without, prepare_without or prepare), (with_registers, prepare)):
        x = prep(images)
        size = x.shape[-2:]
        maps, what = attention_maps(model, x)
        name = f"{model.num_registers} registers" if model.num_registers else "no registers"
        if model.num_registers:
            name += f", {100 * float(register_share(model, x).mean()):.0f} % to them"
        columns.append((name, what, np.stack([_mean_map(m) for m in maps])))
    whats = " / ".join(dict.fromkeys(what for _, what, _ in columns))
    fig, axes = _grid_axes(images.shape[0], 5, f"last-layer attention ({whats}) without and with registers")
    extent = (0, size[1], size[0], 0)
    for b in range(images.shape[0]):
        picture = _rgb(torch.nn.functional.interpolate(images[b:b + 1].float(), size=size)[0] / 255)
        axes[b, 0].imshow(picture, interpolation="nearest", extent=extent)
        for c, (_, _, maps) in enumerate(columns):
            axes[b, 1 + 2 * c].imshow(picture, interpolation="nearest", extent=extent)
            axes[b, 1 + 2 * c].imshow(maps[b], cmap="inferno", alpha=0.6, vmin=0, vmax=1, interpolation="nearest",
                                      extent=extent)
            axes[b, 2 + 2 * c].imshow(maps[b], cmap="inferno", vmin=0, vmax=1, interpolation="nearest", extent=extent)
    axes[0, 0].set_title("image", fontsize=8)
    for c, (label, _, _) in enumerate(columns):
        axes[0, 1 + 2 * c].set_title(label, fontsize=7)
        axes[0, 2 + 2 * c].set_title("map", fontsize=7)
    return render(fig)


@torch.no_grad()
def reconstruction_pixels(objective: nn.Module, images: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
                          mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, ...]:
    """(original, masked input, reconstruction), each (B, C, H, W) in [0, 1] pixel space.

    `prepare` normalises with (x - mean) / std per channel; the same mean and std must be given here,
    since un-normalising with other statistics shifts each channel by a different amount (a grey
    image comes out tinted). Hidden cells of the masked input are shown mid grey, taken from the
    returned mask rather than from zero values (a visible pixel at the mean is zero too)."""
    if not objective.can_reconstruct:
        raise LaunchError(f"objective {type(objective).__name__} has no reconstruct(); only MAE/SimMIM runs have "
                          "reconstructions")
    x = prepare(images)
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise LaunchError(f"data.mean/std have {len(mean)}/{len(std)} values for {x.shape[1]}-channel images")
    was_training = objective.training
    objective.eval()
    try:
        masked, recon, mask = objective.reconstruct(x)
    finally:
        objective.train(was_training)
    m = x.new_tensor(mean).view(1, -1, 1, 1)
    s = x.new_tensor(std).view(1, -1, 1, 1)
    original, masked_px, recon_px = ((t.float() * s + m).clamp(0, 1) for t in (x, masked, recon))
    factor = [a // g for a, g in zip(x.shape[2:], mask.shape[1:])]
    hidden = upsample_mask(mask, factor).unsqueeze(1).to(x.device)
    masked_px = torch.where(hidden, torch.full_like(masked_px, 0.5), masked_px)
    return original, masked_px, recon_px


def reconstruction_figure(objective: nn.Module, images: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
                          mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Rows of: original, masked input, reconstruction (objectives with `reconstruct`: MAE, SimMIM), in
    pixel space."""
    shown = reconstruction_pixels(objective, images, prepare, mean, std)
    fig, axes = _grid_axes(images.shape[0], 3, f"{type(objective).__name__} reconstructions (pixel space)")
    for b in range(images.shape[0]):
        for c, t in enumerate(shown):
            axes[b, c].imshow(_rgb(t[b]), interpolation="nearest")
    for c, label in enumerate(["original", "masked input", "reconstruction"]):
        axes[0, c].set_title(label, fontsize=9)
    return render(fig)


# ---- curves ---------------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; lines that are not JSON objects (cut short by a crash) are skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def ema(values: Sequence[float], beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing): beta 0 is the raw series."""
    out, avg, weight = np.empty(len(values)), 0.0, 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        weight = beta * weight + (1 - beta)
        out[i] = avg / weight
    return out


# (panel title, y label, test on the metric's last name segment), in drawing order
_FAMILIES: list[tuple[str, str, Callable[[str], bool]]] = [
    ("loss", "loss", lambda n: "loss" in n),
    ("learning rate and weight decay", "learning rate", lambda n: n.startswith("lr") or n == "weight_decay"),
    ("throughput", "images / s", lambda n: n in ("images_per_s", "clips_per_s", "samples_per_s")),
    ("k-NN accuracy", "top-1 (%)", lambda n: n.startswith("knn")),
    ("teacher collapse", "nats", lambda n: n in ("teacher_entropy", "kl_to_uniform")),
    ("feature rank (dimensional collapse)", "effective rank", lambda n: n == "feature_rank"),
]


def metric_panels(records: list[dict[str, Any]]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Series of metrics.jsonl records grouped by family: {panel title: {metric: (steps, values)}}; only
    finite numbers, only families present."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        step = r.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        for k, v in r.items():
            if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            series.setdefault(k, []).append((float(step), float(v)))
    panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for title, _label, test in _FAMILIES:
        for k in sorted(series):
            if test(k.rsplit("/", 1)[-1]):
                pts = sorted(series[k])
                panels.setdefault(title, {})[k] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    return panels


def _draw(ax: Any, name: str, steps: np.ndarray, values: np.ndarray, colour: str, smooth: bool) -> None:
    beta = 0.9 if len(values) >= 100 else 0.6 if len(values) >= 10 else 0.0
    if smooth and beta:
        ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
        ax.plot(steps, ema(values, beta), color=colour, linewidth=1.8, label=f"{name} (EMA {beta:g})")
    else:
        ax.plot(steps, values, color=colour, linewidth=1.5, marker="o" if len(values) < 10 else None,
                markersize=3, label=name)


def curves_figure(records: list[dict[str, Any]]) -> Image.Image:
    """One panel per metric family found in metrics.jsonl records, raw series faint under their EMA;
    losses on a log y axis when they span more than a decade, weight decay on its own right-hand axis."""
    panels = metric_panels(records)
    n = max(len(panels), 1)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(6.2 * cols, 3.6 * rows), dpi=DPI, facecolor="white")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no metrics recorded", ha="center", va="center", transform=axes[0, 0].transAxes)
    labels = {title: label for title, label, _ in _FAMILIES}
    for ax, (title, series) in zip(axes.flat, panels.items()):
        handles_ax = [ax]
        for i, (name, (steps, values)) in enumerate(series.items()):
            target = ax
            if name.endswith("weight_decay"):
                target = ax.twinx()
                target.set_ylabel("weight decay")
                handles_ax.append(target)
            _draw(target, name, steps, values, _COLOURS[i % len(_COLOURS)], smooth=title != "learning rate and "
                  "weight decay")
        if title == "loss":
            positive = np.concatenate([v for _, v in series.values()])
            if (positive > 0).all() and positive.max() / positive.min() > 10:
                ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(labels[title])
        ax.grid(True, alpha=0.3)
        lines = [h for a in handles_ax for h in a.get_legend_handles_labels()[0]]
        ax.legend(lines, [h.get_label() for h in lines], fontsize=8, loc="best")
    fig.tight_layout()
    return render(fig)


def log_images(writer, step: int, *, backbone: nn.Module, images: torch.Tensor,
               prepare: Callable[[torch.Tensor], torch.Tensor], objective: nn.Module | None = None,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
    """Write the attention (and, for MAE/SimMIM, reconstruction) figures to a TensorBoard
    SummaryWriter at `step` (main process only). Pictures that the model cannot give are skipped."""
    figures = {}
    try:
        figures["attention"] = attention_figure(backbone, images, prepare)
    except LaunchError:
        pass
    if objective is not None and objective.can_reconstruct:
        figures["reconstruction"] = reconstruction_figure(objective, images, prepare, mean, std)
    for tag, fig in figures.items():
        writer.add_image(f"images/{tag}", np.asarray(fig), step, dataformats="HWC")


# ---- the command ----------------------------------------------------------------------------------
def _sample_images(spec: str | None, size: int, count: int, cache: str | None) -> torch.Tensor:
    """`count` images from shards given on the command line, else from the embedded digits. Shard specs
    stored in a run folder are never used: they could be `pipe:` commands someone else wrote."""
    if spec is None:
        spec = digits_shards(cache)[1]
    stream = ShardStream(expand_shards(spec), batch_size=count, image_size=size, infinite=False)
    batch = next(iter(stream), None)
    if batch is None:
        raise LaunchError(f"no images in {spec}")
    return batch["image"]


def _run_parts(run_dir: Path) -> tuple[Path | None, Path | None, Path | None]:
    """(export folder, checkpoint folder, metrics file) of a run folder (or of an export folder)."""
    export = next((p for p in (run_dir / "export", run_dir) if (p / "backbone.json").is_file()), None)
    checkpoint = ckpt.find_checkpoint(run_dir)
    metrics = run_dir / "metrics.jsonl"
    return export, checkpoint, metrics if metrics.is_file() else None


def _load_run(run_dir: Path) -> tuple[nn.Module | None, nn.Module | None, Sequence[float], Sequence[float], int | None]:
    """(objective, backbone, data mean, data std, view size) of a run folder (its latest verified checkpoint) or
    of an export folder; None for what it does not hold."""
    export, checkpoint, _ = _run_parts(run_dir)
    if checkpoint is not None:
        run = restore(ckpt.verified(checkpoint))
        return run.objective, run.objective.export_backbone(), run.cfg.data.mean, run.cfg.data.std, \
            run.cfg.data.view_size
    if export is not None:
        backbone = ssl_vit.load_backbone(export)
        data_cfg = (backbone.export_meta.get("config") or {}).get("data") or {}
        return None, backbone, data_cfg.get("mean", IMAGENET_MEAN), data_cfg.get("std", IMAGENET_STD), \
            data_cfg.get("view_size")
    return None, None, IMAGENET_MEAN, IMAGENET_STD, None


def _input_size(backbone: nn.Module, size: int | None) -> int:
    """The run's view size where the backbone takes it, else the backbone's default size."""
    size = int(size or backbone.default_size[-1])
    return size if size % backbone.size_multiple == 0 else int(backbone.default_size[-1])


def run_figures(run_dir: str | Path, *, images: int = 6, data: str | None = None, cache: str | None = None,
                notes: list[str] | None = None, registers_vs: str | Path | None = None) -> dict[str, Image.Image]:
    """The figures of a run folder by name ("curves", "attention", "reconstruction"), those it can give, and
    "registers" (`registers_figure`) when `registers_vs` names another run or export folder: one of the two
    backbones must have registers, the other none. Checksums are verified before weights are read; sample
    images come from `data` (or the embedded digits), never from the run's own config. Why a picture is
    missing is appended to `notes`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LaunchError(f"{run_dir} is not a folder (give a run's output folder)")
    export, checkpoint, metrics = _run_parts(run_dir)
    if export is None and checkpoint is None and metrics is None:
        raise LaunchError(f"{run_dir} holds no export, checkpoint or metrics.jsonl: is it a run folder?")
    notes = [] if notes is None else notes
    objective, backbone, mean, std, size = _load_run(run_dir)
    other = None
    if registers_vs is not None:
        if backbone is None or not Path(registers_vs).is_dir():
            raise LaunchError(f"--registers-vs needs a backbone in {run_dir} and a run or export folder "
                              f"{registers_vs}")
        _, other_backbone, other_mean, other_std, other_size = _load_run(Path(registers_vs))
        if other_backbone is None:
            raise LaunchError(f"{registers_vs} holds no export or checkpoint to compare registers with")
        other = other_backbone.eval(), other_mean, other_std, other_size
    figures: dict[str, Image.Image] = {}
    sample = None
    if backbone is not None:  # read the sample images first: bad --data fails before anything is drawn
        backbone.eval()
        size = _input_size(backbone, size)
        sample = _sample_images(data, size, images, cache)
    if metrics is not None:
        figures["curves"] = curves_figure(read_metrics(metrics))
    else:
        notes.append("no metrics.jsonl: no curves")
    if backbone is not None and sample is not None:
        prepare = normalizer(mean, std, size)
        try:
            figures["attention"] = attention_figure(backbone, sample, prepare)
        except LaunchError as err:
            notes.append(f"attention maps skipped: {err}")
        if objective is not None and objective.can_reconstruct:
            figures["reconstruction"] = reconstruction_figure(objective, sample, prepare, mean, std)
        elif objective is not None:
            notes.append(f"no reconstructions: {type(objective).__name__} does not reconstruct images")
        if other is not None:
            other_backbone, other_mean, other_std, other_size = other
            prepare_other = normalizer(other_mean, other_std, _input_size(other_backbone, other_size))
            pair = [(backbone, prepare), (other_backbone, prepare_other)]
            if backbone.num_registers == 0:
                pair.reverse()
            (with_registers, prepare_with), (without, prepare_without) = pair
            figures["registers"] = registers_figure(with_registers, without, sample, prepare_with, prepare_without)
    return figures


def visualize_run(run_dir: str | Path, out_dir: str | Path | None = None, *, images: int = 6,
                  data: str | None = None, cache: str | None = None,
                  registers_vs: str | Path | None = None) -> list[Path]:
    """Write the figures of a run as PNG files to `out_dir` (default RUN_DIR/visualize); returns the paths."""
    notes: list[str] = []
    figures = run_figures(run_dir, images=images, data=data, cache=cache, notes=notes, registers_vs=registers_vs)
    for note in notes:
        if "skipped" in note:
            print(note, file=sys.stderr)
    out = Path(out_dir) if out_dir else Path(run_dir) / "visualize"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, fig in figures.items():
        fig.save(out / f"{name}.png")
        written.append(out / f"{name}.png")
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m launch.visualize RUN_DIR [--out DIR] [--images N] [--data SHARDS] [--cache DIR]
    [--registers-vs OTHER_RUN]`."""
    p = ArgumentParser(prog="python -m launch.visualize", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run's output folder (export/, checkpoints/, metrics.jsonl)")
    p.add_argument("--out", help="where the PNG files go (default: RUN_DIR/visualize)")
    p.add_argument("--images", type=int, default=6, help="sample images per figure")
    p.add_argument("--data", help="shards to take the sample images from (default: the embedded digits; the "
                                  "run's own data specs are never opened, they may hold pipe: commands)")
    p.add_argument("--cache", help="where the embedded digits shards are built")
    p.add_argument("--registers-vs", metavar="OTHER_RUN",
                   help="another run or export folder: registers.png compares the attention maps of the backbone "
                        "with registers (backbone_args.num_registers) to the one without")
    try:
        args = p.parse_args(argv)
        if args.images < 1:
            p.error("--images must be at least 1")
        written = visualize_run(args.run_dir, args.out, images=args.images, data=args.data, cache=args.cache,
                                registers_vs=args.registers_vs)
    except (ssl_vit.SslVitError, OSError, ValueError) as err:
        print(f"visualize: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
