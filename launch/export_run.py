"""`python export.py RUN_OR_CHECKPOINT OUT_DIR [--which teacher|student] [--format native|timm|onnx]`.

RUN_OR_CHECKPOINT is a run's output folder (its latest checkpoint is used), a checkpoint folder, or an
export folder (re-written, e.g. in timm's layout). Checksums are verified before anything is read; the
backbone is written through `ssl_vit.save_backbone`, the one implementation of the format, and
`ssl_vit.load_backbone(OUT_DIR)` rebuilds it. DINO and EsViT export the teacher unless `--which student`.
Bad input or a damaged folder: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn

import ssl_vit
from ssl_vit.export import META_FILE, read_meta

from . import checkpoint as ckpt
from .args import ArgumentParser
from .build import restore
from .errors import LaunchError
from .onnx_export import export_onnx, onnx_meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run folder, checkpoint folder or export folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where backbone.safetensors and backbone.json go")
    p.add_argument("--which", choices=("teacher", "student"), default=None,
                   help="teacher (default for DINO/EsViT) or student")
    p.add_argument("--format", choices=("native", "timm", "onnx"), default="native",
                   help="native, timm's VisionTransformer key layout (ViT and SimpleViT presets), or onnx "
                        "(backbone.onnx: images -> pooled, patch_tokens)")
    return p.parse_args(argv)


def pick_module(objective: ssl_vit.Objective, which: str | None, name: str) -> nn.Module:
    """The module `--which` names: the default export (teacher where there is one) or the student."""
    default = objective.export_backbone()
    if which == "student":
        return objective.backbone
    if which == "teacher" and not objective.exports_teacher:
        raise LaunchError(f"--which teacher: objective '{name}' has no teacher (only DINO and EsViT have one); "
                          "drop --which or use --which student")
    return default


def export(source: str | Path, out_dir: str | Path, *, which: str | None = None, format: str = "native") -> Path:
    """Write the export; returns OUT_DIR. LaunchError / ssl_vit errors on bad input."""
    source = Path(source)
    if not source.exists():
        raise LaunchError(f"{source} does not exist")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise LaunchError(f"OUT_DIR {out_dir} is a file; give a new or empty folder (or an export to replace)")
    if Path(out_dir).resolve() == source.resolve():
        raise LaunchError(f"OUT_DIR {out_dir} is the source itself; write the export elsewhere")
    checkpoint = ckpt.find_checkpoint(source) if source.is_dir() else None
    if checkpoint is None:
        if (source / META_FILE).is_file():  # an export: re-write it (e.g. in another layout)
            if which is not None:
                raise LaunchError(f"--which needs a run or checkpoint; {source} is already an export of one module")
            meta = read_meta(source)
            model = ssl_vit.load_backbone(source)
            if format == "onnx":
                return export_onnx(model, out_dir, meta=onnx_meta(model, objective=meta.get("objective"),
                                                                  step=meta.get("step"), config=meta.get("config")))
            return ssl_vit.save_backbone(model, out_dir, objective=meta.get("objective"), step=meta.get("step"),
                                         config=meta.get("config"), format=format)
        raise LaunchError(f"{source} is neither a run folder (with checkpoints/), a checkpoint folder nor an "
                          "export folder (backbone.json)")
    run = restore(ckpt.verified(checkpoint))
    module = pick_module(run.objective, which, run.cfg.objective)
    if format == "onnx":
        return export_onnx(module, out_dir, meta=onnx_meta(module, objective=run.cfg.objective,
                                                           step=run.state.get("step"), config=run.cfg.as_dict(),
                                                           extra={"exported": which or "default"}))
    return ssl_vit.save_backbone(module, out_dir, objective=run.cfg.objective, step=run.state.get("step"),
                                 config=run.cfg.as_dict(), format=format, extra={"exported": which or "default"})


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        out = export(args.source, args.out_dir, which=args.which, format=args.format)
    except (ssl_vit.SslVitError, OSError) as err:
        print(f"export.py: error: {err}", file=sys.stderr)
        return 2
    how = ("run backbone.onnx with an ONNX runtime" if args.format == "onnx"
           else f"load with ssl_vit.load_backbone('{out}')")
    print(f"exported: {out} ({how})")
    return 0
