"""One self-contained HTML report of a run: `python -m launch.report RUN [--data SHARDS] [--out FILE]`.

Writes RUN/report.html (or FILE) with the resolved config (the checkpoint's `config.yaml`, shown as
escaped text), the training curves, the linear-probe and k-NN results (`results.json` files found in
the run folder, or given with `--probe`), attention maps, MAE/SimMIM reconstructions, the UMAP
picture of `launch.embed` (`embeddings/umap.png`) when there is one, and with `--registers-vs OTHER`
the attention maps with and without register tokens side by side (one of the two has registers).
Everything is inline: pictures are base64 PNG data URIs, the style sheet is in the page, there are no
scripts and no external references, so the file opens offline and can be mailed or attached as it is.
Nothing read from the run folder is executed: the config is shown as text, JSON is read as data, the
UMAP PNG is decoded and re-encoded, and sample images come from `--data` or the embedded digits, never
from the run's stored shard specs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

import ssl_vit

from . import checkpoint as ckpt
from .args import ArgumentParser
from .errors import LaunchError
from .visualize import metric_panels, read_metrics, run_figures

__all__ = ["SECTIONS", "build_report", "find_results", "png_data_uri", "main"]

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; } figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.85em; border-radius: 4px; }
table { border-collapse: collapse; margin: 0.5em 0 1em; } th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; }
th { background: #f0f0f0; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #8a6d3b; background: #fcf8e3; padding: 0.4em 0.8em; border-radius: 4px; }
"""

SECTIONS = ("summary", "config", "curves", "results", "attention", "reconstruction", "umap")


def png_data_uri(image: Image.Image) -> str:
    """A PIL image as a `data:image/png;base64,...` URI."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(image: Image.Image, alt: str, caption: str) -> str:
    return (f'<figure><img src="{png_data_uri(image)}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _config_text(run_dir: Path) -> tuple[str, str]:
    """(resolved config YAML as text, where it came from): the newest intact checkpoint's, else the
    export's, else the run folder's. Shown as text only, never parsed into objects."""
    checkpoint = ckpt.find_checkpoint(run_dir)
    candidates = ([checkpoint / "config.yaml"] if checkpoint is not None else []) + [
        run_dir / "export" / "config.yaml", run_dir / "config.yaml"]
    for path in candidates:
        if path.is_file():
            return path.read_text(errors="replace"), str(path)
    return "", ""


def find_results(run_dir: Path, extra: Sequence[str | Path] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """Probe results of a run: `results.json` in the run folder, its export folder and their direct
    subfolders (`launch.probe` writes EXPORT/results.json and EXPORT/random_init/results.json), plus
    `extra` files. LaunchError for an `extra` file that is missing or not a JSON object."""
    found: list[Path] = []
    for base in (run_dir, run_dir / "export"):
        found += [base / "results.json", *sorted(base.glob("*/results.json"))]
    out: list[tuple[Path, dict[str, Any]]] = []
    seen: set[Path] = set()
    for path in [Path(p) for p in extra] + found:
        given = path in [Path(p) for p in extra]
        resolved = path.resolve()
        if resolved in seen or (not given and not path.is_file()):
            continue
        seen.add(resolved)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            if given:
                raise LaunchError(f"--probe {path}: cannot read it as JSON ({err})") from None
            continue
        if not isinstance(data, dict):
            if given:
                raise LaunchError(f"--probe {path}: not a results.json object of launch.probe")
            continue
        out.append((path, data))
    return out


def _num(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value)) if value is not None else "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _results_html(results: list[tuple[Path, dict[str, Any]]], records: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for path, r in results:
        kind = "random init" if r.get("random_init") else "pretrained"
        parts.append(f"<h3>{html.escape(str(r.get('backbone', '?')))} ({kind}, "
                     f"{html.escape(str(r.get('features', '?')))} features)</h3>"
                     f'<p class="meta">{html.escape(str(path))}: {_num(r.get("train_samples"))} train / '
                     f'{_num(r.get("val_samples"))} val samples, {_num(r.get("num_classes"))} classes</p>')
        rows = ['<table><tr><th>head</th><th>top-1 (%)</th><th>top-5 (%)</th></tr>']
        for row in r.get("linear") or []:
            if isinstance(row, dict):
                rows.append(f"<tr><td>linear, lr {_num(row.get('lr'), 4)}</td><td class=num>{_num(row.get('top1'))}"
                            f"</td><td class=num>{_num(row.get('top5'))}</td></tr>")
        best = r.get("best")
        if isinstance(best, dict):
            rows.append(f"<tr><th>best linear (lr {_num(best.get('lr'), 4)})</th><td class=num>"
                        f"<b>{_num(best.get('top1'))}</b></td><td class=num>{_num(best.get('top5'))}</td></tr>")
        knn = r.get("knn")
        if isinstance(knn, dict):
            rows.append(f"<tr><td>k-NN (k={_num(knn.get('k'))}, T={_num(knn.get('temperature'))})</td>"
                        f"<td class=num>{_num(knn.get('top1'))}</td><td class=num>{_num(knn.get('top5'))}</td></tr>")
        parts.append("".join(rows) + "</table>")
    monitor = metric_panels(records).get("k-NN accuracy", {})
    for name, (steps, values) in monitor.items():
        parts.append(f"<p>k-NN monitor during training ({html.escape(name)}): {values[-1]:.2f} % at step "
                     f"{int(steps[-1])} (best {values.max():.2f} %)</p>")
    if not parts:
        parts.append(_note("no probe results: run `python -m launch.probe --weights RUN/export ...` (it writes "
                           "RUN/export/results.json) or give --probe RESULTS_JSON"))
    return "".join(parts)


def _umap(run_dir: Path) -> Image.Image | None:
    """The UMAP picture of `launch.embed`, decoded (and so checked to be a PNG) before it is re-encoded."""
    for path in (run_dir / "embeddings" / "umap.png", run_dir / "export" / "embeddings" / "umap.png"):
        if path.is_file():
            try:
                with Image.open(path) as img:
                    if img.format != "PNG":
                        return None
                    img.load()
                    return img.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError):
                return None
    return None


def build_report(run_dir: str | Path, *, data: str | None = None, cache: str | None = None, images: int = 6,
                 probe: Sequence[str | Path] = (), registers_vs: str | Path | None = None) -> str:
    """The report of a run folder as one HTML string (see the module docstring); `registers_vs` adds the
    "registers" section (`launch.visualize.registers_figure`)."""
    run_dir = Path(run_dir)
    notes: list[str] = []
    results = find_results(run_dir, probe)  # bad --probe fails before the (slow) figures
    figures = run_figures(run_dir, images=images, data=data, cache=cache, notes=notes, registers_vs=registers_vs)
    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    config, config_from = _config_text(run_dir)
    steps = [r["step"] for r in records if isinstance(r.get("step"), (int, float))]
    title = f"ssl-vit run report: {run_dir.resolve().name}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    summary = [f"folder {run_dir.resolve()}", f"{len(records)} metric records"]
    if steps:
        summary.append(f"steps {min(steps):g} to {max(steps):g}")
    body.append(f'<section id="summary"><p class="meta">{html.escape("; ".join(summary))}</p></section>')

    body.append('<section id="config"><h2>Resolved config</h2>')
    if config:
        body.append(f'<p class="meta">{html.escape(config_from)}</p><pre>{html.escape(config)}</pre>')
    else:
        body.append(_note("no config.yaml in the run folder"))
    body.append("</section>")

    captions = {
        "curves": ("Training curves", "one panel per metric family of metrics.jsonl; raw series faint, EMA solid"),
        "attention": ("Attention maps", "last-layer attention of the exported backbone on sample images"),
        "reconstruction": ("Reconstructions", "original, masked input and reconstruction in pixel space"),
        "registers": ("Attention with and without registers", "last-layer attention of the backbone with "
                      "register tokens next to the one without (Darcet et al. 2024, Fig. 1)"),
    }
    keys = ("curves", "results", "attention", "reconstruction") + (("registers",) if registers_vs else ())
    for key in keys:
        if key == "results":
            body.append(f'<section id="results"><h2>Probe and k-NN results</h2>{_results_html(results, records)}'
                        "</section>")
            continue
        heading, caption = captions[key]
        body.append(f'<section id="{key}"><h2>{heading}</h2>')
        if key in figures:
            body.append(_figure(figures[key], heading, caption))
        else:
            body.append(_note(next((n for n in notes if key[:6] in n), f"no {heading.lower()} for this run")))
        body.append("</section>")

    umap = _umap(run_dir)
    body.append('<section id="umap"><h2>Embeddings (UMAP)</h2>')
    body.append(_figure(umap, "UMAP of the embeddings", "launch.embed's UMAP of pooled features, by label")
                if umap is not None else _note("no embeddings/umap.png (python -m launch.embed writes it)"))
    body.append("</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m launch.report RUN [--data SHARDS] [--out FILE] [--probe RESULTS_JSON ...]`."""
    p = ArgumentParser(prog="python -m launch.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run's output folder (checkpoints/, export/, metrics.jsonl)")
    p.add_argument("--out", help="the HTML file to write (default: RUN/report.html)")
    p.add_argument("--data", help="shards to take the sample images from (default: the embedded digits; the "
                                  "run's own data specs are never opened, they may hold pipe: commands)")
    p.add_argument("--probe", action="append", default=[], metavar="RESULTS_JSON",
                   help="a results.json of launch.probe to include (repeatable; the run folder's are found)")
    p.add_argument("--images", type=int, default=6, help="sample images per figure")
    p.add_argument("--cache", help="where the embedded digits shards are built")
    p.add_argument("--registers-vs", metavar="OTHER_RUN",
                   help="another run or export folder: one backbone with register tokens, one without; adds "
                        "their attention maps side by side")
    try:
        args = p.parse_args(argv)
        if args.images < 1:
            p.error("--images must be at least 1")
        page = build_report(args.run_dir, data=args.data, cache=args.cache, images=args.images, probe=args.probe,
                            registers_vs=args.registers_vs)
        out = Path(args.out) if args.out else Path(args.run_dir) / "report.html"
        if out.is_dir():
            raise LaunchError(f"--out {out} is a folder; give the HTML file to write")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except (ssl_vit.SslVitError, OSError, ValueError) as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
