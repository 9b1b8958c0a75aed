"""Export a run's backbone: `python export.py RUN_OR_CHECKPOINT OUT_DIR [--which ...] [--format native|timm]`.

RUN_OR_CHECKPOINT is a run's output folder (its latest checkpoint is used), a checkpoint folder
(`state.json` + `objective.safetensors`), or an export folder (re-written, e.g. in timm's layout).
Writes `backbone.safetensors` and `backbone.json` through `ssl_vit.save_backbone`, the one
implementation of the format; `ssl_vit.load_backbone(OUT_DIR)` rebuilds it. DINO and EsViT export
the teacher unless `--which student`. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn

import ssl_vit
from ssl_vit.export import META_FILE, read_meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run folder, checkpoint folder or export folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where backbone.safetensors and backbone.json go")
    p.add_argument("--which", choices=("teacher", "student"), default=None,
                   help="teacher (default for DINO/EsViT) or student")
    p.add_argument("--format", choices=("native", "timm"), default="native",
                   help="native, or timm's VisionTransformer key layout (ViT and SimpleViT presets)")
    return p.parse_args(argv)


def _checkpoint_of(source: Path) -> Path | None:
    from launch import checkpoint as ckpt

    if (source / "state.json").is_file() and (source / "objective.safetensors").is_file():
        return source
    return ckpt.latest(source) if source.is_dir() else None


def _pick(objective: nn.Module, which: str | None, name: str) -> nn.Module:
    default = objective.export_backbone()
    student = objective.backbone
    if which is None:
        return default
    if which == "student":
        return student
    if default is student:  # no teacher in this objective
        raise ValueError(f"--which teacher: objective '{name}' has no teacher (only DINO and EsViT have one); "
                         "drop --which or use --which student")
    return default


def export(source: str | Path, out_dir: str | Path, *, which: str | None = None, format: str = "native") -> Path:
    """Write the export; returns OUT_DIR. Raises ssl_vit / launch errors on bad input."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    checkpoint = _checkpoint_of(source)
    if checkpoint is None:
        if (source / META_FILE).is_file():  # an export: re-write it (e.g. in another layout)
            if which is not None:
                raise ValueError(f"--which needs a run or checkpoint; {source} is already an export of one module")
            meta = read_meta(source)
            model = ssl_vit.load_backbone(source)
            return ssl_vit.save_backbone(model, out_dir, objective=meta.get("objective"), step=meta.get("step"),
                                         config=meta.get("config"), format=format)
        raise FileNotFoundError(f"{source} is neither a run folder (with checkpoints/latest), a checkpoint folder "
                                "(state.json + objective.safetensors) nor an export folder (backbone.json)")
    from safetensors.torch import load_file

    from launch.checkpoint import read_state
    from launch.config import read_yaml
    from launch.errors import LaunchError
    from launch.loop import build_objective

    cfg = read_yaml(checkpoint / "config.yaml")
    state = read_state(checkpoint)
    _, objective = build_objective(cfg)
    try:
        weights = load_file(str(checkpoint / "objective.safetensors"))
        objective.load_state_dict(weights)
    except Exception as err:
        raise LaunchError(f"checkpoint {checkpoint} does not fit its own config: {str(err).splitlines()[0]}") from None
    module = _pick(objective, which, cfg.get("objective"))
    return ssl_vit.save_backbone(module, out_dir, objective=cfg.get("objective"), step=state.get("step"),
                                 config=cfg, format=format, extra={"exported": which or "default"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = export(args.source, args.out_dir, which=args.which, format=args.format)
    except (ssl_vit.SslVitError, FileNotFoundError, ValueError) as err:
        print(f"export.py: error: {err}", file=sys.stderr)
        return 2
    print(f"exported: {out} (load with ssl_vit.load_backbone('{out}'))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
