"""Pictures of a run: class-token attention maps, MAE/SimMIM reconstructions, loss and learning-rate curves.

`python -m launch.visualize RUN_DIR` writes `attention.png`, `reconstruction.png` (objectives with a
`reconstruct` method) and `curves.png` to RUN_DIR/visualize. The attention maps are the last
layer's class-token attention over the patches, per head and averaged, as in DINO's Figure 1
(Caron et al. 2021); models without a class token show the attention each patch receives. Drawn
with PIL only. `log_images(writer, step, ...)` puts the same pictures into TensorBoard for the
launcher.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

import ssl_vit
from ssl_vit import Recorder

from .errors import LaunchError
from .knn import IMAGENET_MEAN, IMAGENET_STD, normalizer

__all__ = ["attention_maps", "attention_figure", "reconstruction_figure", "curves_figure", "log_images", "main"]

TILE = 96  # pixels per picture in a figure
# anchor colours of a dark-to-bright heat map (black, purple, red, orange, pale yellow)
_HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def heatmap(values: np.ndarray) -> np.ndarray:
    """(h, w) in [0, 1] -> (h, w, 3) uint8 colours."""
    pos = np.clip(values, 0, 1) * (len(_HEAT) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_HEAT) - 2)
    frac = (pos - lo)[..., None]
    return (_HEAT[lo] * (1 - frac) + _HEAT[lo + 1] * frac).round().astype(np.uint8)


def _to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 or [0, 1] float (3, H, W) -> a TILE-high PIL image (nearest: small images stay crisp)."""
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    array = image.permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")
    return pil.resize((round(TILE * pil.width / pil.height), TILE), Image.NEAREST)


def _grid(rows: list[list[Image.Image]], labels: Sequence[str] = (), pad: int = 4) -> Image.Image:
    """Tiles in rows, with optional column labels on top."""
    width = max(sum(t.width for t in row) + pad * (len(row) + 1) for row in rows)
    top = 14 if labels else 0
    height = top + sum(max(t.height for t in row) + pad for row in rows) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = top + pad
    for r, row in enumerate(rows):
        x = pad
        for c, tile in enumerate(row):
            canvas.paste(tile, (x, y))
            if r == 0 and c < len(labels):
                draw.text((x, 2), labels[c], fill="black")
            x += tile.width + pad
        y += max(t.height for t in row) + pad
    return canvas


@torch.no_grad()
def attention_maps(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Last attention layer's maps over the final token grid: x (B, C, H, W) -> (B, heads, h, w), each
    map scaled to [0, 1], and what they show ("class token" or "received")."""
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
    if prefix >= 1:
        maps, what = last[:, :, 0, prefix:], "class token"
    else:
        maps, what = last.mean(dim=2), "received"
    maps = maps.reshape(*maps.shape[:2], h, w)
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12), what


def _overlay(image: Image.Image, values: np.ndarray, alpha: float = 0.6) -> Image.Image:
    heat = Image.fromarray(heatmap(values)).resize(image.size, Image.NEAREST)
    return Image.blend(image, heat, alpha)


def attention_figure(backbone: nn.Module, images: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
                     max_heads: int = 6) -> Image.Image:
    """Rows of: image, mean-over-heads map on the image, then each head's map. images: uint8 (B, 3, H, W)."""
    x = prepare(images)
    maps, what = attention_maps(backbone, x)
    heads = min(maps.shape[1], max_heads)
    rows = []
    for b in range(images.shape[0]):
        picture = _to_pil(torch.nn.functional.interpolate(images[b:b + 1].float(), size=x.shape[-2:])[0] / 255)
        mean = maps[b].mean(0)
        mean = (mean - mean.min()) / (mean.max() - mean.min()).clamp_min(1e-12)
        row = [picture, _overlay(picture, mean.cpu().numpy())]
        row += [Image.fromarray(heatmap(maps[b, i].cpu().numpy())).resize(picture.size, Image.NEAREST)
                for i in range(heads)]
        rows.append(row)
    labels = ["image", f"mean ({what})"] + [f"head {i}" for i in range(heads)]
    return _grid(rows, labels)


@torch.no_grad()
def reconstruction_figure(objective: nn.Module, images: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
                          mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Rows of: original, masked input, reconstruction (objectives with `reconstruct`: MAE, SimMIM)."""
    if not objective.can_reconstruct:
        raise LaunchError(f"objective {type(objective).__name__} has no reconstruct(); only MAE/SimMIM runs have "
                          "reconstructions")
    was_training = objective.training
    objective.eval()
    try:
        x = prepare(images)
        masked, recon, _mask = objective.reconstruct(x)
    finally:
        objective.train(was_training)
    m = x.new_tensor(mean).view(1, -1, 1, 1)
    s = x.new_tensor(std).view(1, -1, 1, 1)
    hidden = masked == 0  # hidden pixels are zeroed in normalised space; show them grey
    shown = [(t * s + m) for t in (x, masked, recon)]
    shown[1] = torch.where(hidden.all(dim=1, keepdim=True), torch.full_like(shown[1], 0.5), shown[1])
    rows = [[_to_pil(t[b]) for t in shown] for b in range(x.shape[0])]
    return _grid(rows, ["original", "masked input", "reconstruction"])


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return records


def _plot(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: dict[str, list[tuple[float, float]]],
          title: str, log_y: bool = False) -> None:
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline="black")
    draw.text((x0, y0 - 14), title, fill="black")
    points = [p for s in series.values() for p in s if math.isfinite(p[1]) and (p[1] > 0 or not log_y)]
    if not points:
        draw.text((x0 + 8, y0 + 8), "no data", fill="black")
        return
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs, ys = [p[0] for p in points], [fy(p[1]) for p in points]
    xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ymin, ymax = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    sx = lambda v: x0 + 4 + (v - xmin) / (xmax - xmin) * (x1 - x0 - 8)
    sy = lambda v: y1 - 4 - (fy(v) - ymin) / (ymax - ymin) * (y1 - y0 - 8)
    for i, (name, pts) in enumerate(series.items()):
        pts = [p for p in pts if math.isfinite(p[1]) and (p[1] > 0 or not log_y)]
        colour = colours[i % len(colours)]
        if len(pts) > 1:
            draw.line([(sx(a), sy(b)) for a, b in pts], fill=colour, width=2)
        elif pts:
            draw.ellipse([sx(pts[0][0]) - 2, sy(pts[0][1]) - 2, sx(pts[0][0]) + 2, sy(pts[0][1]) + 2], fill=colour)
        draw.text((x1 - 150, y0 + 4 + 12 * i), name, fill=colour)
    top, bottom = (10 ** ymax, 10 ** ymin) if log_y else (ymax, ymin)
    draw.text((x0 + 4, y0 + 2), f"{top:.4g}", fill="black")
    draw.text((x0 + 4, y1 - 14), f"{bottom:.4g}", fill="black")
    draw.text((x0, y1 + 2), f"step {xmin:g}", fill="black")
    draw.text((x1 - 70, y1 + 2), f"step {xmax:g}", fill="black")


def curves_figure(records: list[dict[str, Any]]) -> Image.Image:
    """Two panels from metrics.jsonl records: every `*loss*` series, and the learning rate(s)."""
    losses: dict[str, list] = {}
    rates: dict[str, list] = {}
    for r in records:
        step = r.get("step")
        if step is None:
            continue
        for k, v in r.items():
            if not isinstance(v, (int, float)) or k in ("step", "time"):
                continue
            name = k.rsplit("/", 1)[-1]
            if "loss" in name:
                losses.setdefault(k, []).append((float(step), float(v)))
            elif name == "lr" or name.startswith("lr"):
                rates.setdefault(k, []).append((float(step), float(v)))
    canvas = Image.new("RGB", (900, 360), "white")
    draw = ImageDraw.Draw(canvas)
    _plot(draw, (20, 30, 440, 330), losses, "loss")
    _plot(draw, (470, 30, 880, 330), rates, "learning rate")
    return canvas


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
    from .data import ShardStream, expand_shards

    if spec is None:
        from .digits import digits_shards
        spec = digits_shards(cache)[1]
    stream = ShardStream(expand_shards(spec), batch_size=count, image_size=size, infinite=False)
    batch = next(iter(stream), None)
    if batch is None:
        raise LaunchError(f"no images in {spec}")
    return batch["image"]


def _run_parts(run_dir: Path) -> tuple[Path | None, Path | None, Path | None]:
    """(export folder, checkpoint folder, metrics file) of a run folder (or of an export folder)."""
    from . import checkpoint as ckpt

    export = next((p for p in (run_dir / "export", run_dir) if (p / "backbone.json").is_file()), None)
    checkpoint = ckpt.find_checkpoint(run_dir)
    metrics = run_dir / "metrics.jsonl"
    return export, checkpoint, metrics if metrics.is_file() else None


def visualize_run(run_dir: str | Path, out_dir: str | Path | None = None, *, images: int = 6,
                  data: str | None = None, cache: str | None = None) -> list[Path]:
    """Write the figures of a run; returns the PNG paths written. Checksums are verified before weights
    are read; sample images come from `data` (or the embedded digits), never from the run's own config."""
    from . import checkpoint as ckpt
    from .build import restore

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LaunchError(f"{run_dir} is not a folder (give a run's output folder)")
    export, checkpoint, metrics = _run_parts(run_dir)
    if export is None and checkpoint is None and metrics is None:
        raise LaunchError(f"{run_dir} holds no export, checkpoint or metrics.jsonl: is it a run folder?")
    objective = backbone = None
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, None
    if checkpoint is not None:
        run = restore(ckpt.verified(checkpoint))
        objective, backbone = run.objective, run.objective.export_backbone()
        mean, std, size = run.cfg.data.mean, run.cfg.data.std, run.cfg.data.view_size
    elif export is not None:
        backbone = ssl_vit.load_backbone(export)
        data_cfg = (backbone.export_meta.get("config") or {}).get("data") or {}
        mean, std, size = data_cfg.get("mean", mean), data_cfg.get("std", std), data_cfg.get("view_size")
    out = Path(out_dir) if out_dir else run_dir / "visualize"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if metrics is not None:
        curves_figure(read_metrics(metrics)).save(out / "curves.png")
        written.append(out / "curves.png")
    if backbone is not None:
        backbone.eval()
        size = int(size or backbone.default_size[-1])
        if size % backbone.size_multiple:
            size = int(backbone.default_size[-1])
        sample = _sample_images(data, size, images, cache)
        prepare = normalizer(mean, std, size)
        try:
            attention_figure(backbone, sample, prepare).save(out / "attention.png")
            written.append(out / "attention.png")
        except LaunchError as err:
            print(f"attention maps skipped: {err}", file=sys.stderr)
        if objective is not None and objective.can_reconstruct:
            reconstruction_figure(objective, sample, prepare, mean, std).save(out / "reconstruction.png")
            written.append(out / "reconstruction.png")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.visualize", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run's output folder (export/, checkpoints/, metrics.jsonl)")
    p.add_argument("--out", help="where the PNG files go (default: RUN_DIR/visualize)")
    p.add_argument("--images", type=int, default=6, help="sample images per figure")
    p.add_argument("--data", help="shards to take the sample images from (default: the embedded digits; the "
                                  "run's own data specs are never opened, they may hold pipe: commands)")
    p.add_argument("--cache", help="where the embedded digits shards are built")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error("--images must be at least 1")
    try:
        written = visualize_run(args.run_dir, args.out, images=args.images, data=args.data, cache=args.cache)
    except (ssl_vit.SslVitError, FileNotFoundError, ValueError) as err:
        print(f"visualize: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
