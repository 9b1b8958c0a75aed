"""`pretrain.py`: the command line of the launcher.

    accelerate launch pretrain.py --objective NAME --backbone NAME [--data SHARDS] [--val-data SHARDS]
        [--config FILE] [--set key=value ...] [--out DIR] [--steps N] [--resume [PATH] | --overwrite]

`python pretrain.py ...` runs the same in one process. Bad input (names, pairs, config, data,
resume target, a damaged checkpoint) ends with one line on stderr and exit status 2, before anything is
written; a run that diverges stops with one line and exit status 3, its last good checkpoint intact.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from typing import NoReturn

from ssl_vit.errors import SslVitError

from . import config
from .args import ArgumentParser
from .errors import LaunchError
from .loop import train
from .plan import plan

EXAMPLES = """\
examples:
  accelerate launch pretrain.py --objective dino --backbone cvt          # demo on the embedded digits
  accelerate launch pretrain.py --objective mae --backbone vit_small_patch16 \\
      --data 'shards/train-{000000..000099}.tar' --set data.batch_size=128 --steps 100000
  python pretrain.py --objective dino --backbone vit_tiny --out runs/x --resume   # continue runs/x
  python -m launch.make_shards clips/ video_shards/          # a folder of .npy clips (--video: frame folders)
  accelerate launch pretrain.py --objective mae --backbone vit_3d --data video_shards/
"""


def _names() -> str:
    import ssl_vit

    try:
        objectives = ", ".join(ssl_vit.list_objectives())
        backbones = ", ".join(ssl_vit.list_backbones())
    except Exception as err:  # a broken plugin must not hide --help
        return f"(could not list the registries: {err})"
    wrap = lambda s: textwrap.fill(s, 100, initial_indent="  ", subsequent_indent="  ")
    return f"objectives:\n{wrap(objectives)}\n\nbackbones:\n{wrap(backbones)}\n"


class _Parser(ArgumentParser):

    def format_help(self) -> str:
        return super().format_help() + "\n" + _names() + "\n" + EXAMPLES


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pretrain.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Self-supervised pretraining of a backbone with an objective, on Accelerate. "
                            "Configs: configs/defaults.yaml < configs/objectives/<objective>.yaml < "
                            "configs/backbones/<backbone>.yaml < configs/profiles/<profile>.yaml < --config < --set.")
    p.add_argument("--objective", help="objective registry name (listed below)")
    p.add_argument("--backbone", help="backbone registry name (listed below)")
    p.add_argument("--data", help="training shards: a .tar, a folder of .tar, a brace pattern "
                                  "('shards/train-{000000..000099}.tar') or a pipe: URL; default: the embedded digits")
    p.add_argument("--val-data", help="validation shards (same forms as --data)")
    p.add_argument("--config", help="a YAML file merged over the presets")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--out", help="output folder (checkpoints, export, logs); default runs/<objective>-<backbone>")
    p.add_argument("--steps", type=int, help="optimizer steps of the schedule (train.steps)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                   help="continue from the latest checkpoint of --out, or from PATH (a checkpoint or output folder)")
    p.add_argument("--init", metavar="PATH", help="start the backbone from these weights (continued pretraining): an "
                                                  "export folder, or a timm-layout .safetensors file (ViT family)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds another run (its checkpoints, export and logs are deleted)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (2 for bad input)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = parser().parse_args(argv)
        cli: dict = {}
        if args.data is not None:
            cli.setdefault("data", {})["train"] = args.data
        if args.val_data is not None:
            cli.setdefault("data", {})["val"] = args.val_data
        if args.steps is not None:
            cli.setdefault("train", {})["steps"] = args.steps
        if args.out is not None:
            cli["out"] = args.out
        if args.init is not None:
            cli["init"] = args.init
        cfg, sources = config.resolve(args.objective, args.backbone, config_file=args.config, sets=args.set, cli=cli,
                                      profile_hint="demo")
        if cfg["data"]["train"] is not None and cfg["profile"] == "demo" and _profile_was_auto(args):
            # data given through --config / --set: no demo profile after all
            cfg, sources = config.resolve(args.objective, args.backbone, config_file=args.config, sets=args.set,
                                          cli=cli, profile_hint=None)
        train(plan(config.parse(cfg), args.resume, overwrite=args.overwrite))
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except SslVitError as err:  # a damaged checkpoint (CorruptCheckpoint), a bad input tensor, ...
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except OSError as err:  # a folder that cannot be written after all (read-only file system, /proc, ...)
        print(f"error: {err.strerror or err}: {err.filename or ''} (choose another --out)", file=sys.stderr,
              flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: resume with --resume", file=sys.stderr)
        return 130
    return 0


def run(argv: list[str] | None = None) -> NoReturn:
    """Entry point of `pretrain.py` and `ssl-vit-pretrain`: `main`, then `exit_process` with its status."""
    exit_process(main(argv))


def exit_process(status: int) -> NoReturn:
    """End this process with `status`; a process of a multi-process launch skips interpreter finalisation.

    By the time `main` returns, every file of the run is written (atomically) and the process group is
    destroyed. What finalisation would still do is free module globals while gloo's worker threads release
    the last tensors of finished collectives; such a thread that needs the GIL then is terminated by Python
    inside a C++ destructor and the process aborts ("terminate called without an active exception",
    SIGABRT) after a successful run, which the launcher reports as a failed job. It happens under CPU
    contention only, at the end of FSDP runs most (torch's own discussion: pytorch/pytorch#179291).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _profile_was_auto(args: argparse.Namespace) -> bool:
    return not any(s.split("=", 1)[0].strip() == "profile" for s in args.set)
