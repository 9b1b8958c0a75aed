"""ONNX export of a backbone: `python export.py RUN OUT --format onnx`.

The folder holds `backbone.onnx`, `onnx.json` (backbone.json's fields plus what the graph takes and gives)
and `checksums.json` (ssl_vit.files, written last). The graph has one input `images`, float
(B, C, H, W) at the backbone's default size ((B, C, T, H, W) for video), with a dynamic batch axis, and
two outputs: `pooled` (B, D) and `patch_tokens` (B, N, D), as `forward_features` gives them without a
mask. The TorchScript exporter runs first (fast, dynamic axes); where it cannot convert an op, the
dynamo exporter (torch.export + onnxscript) is tried; a family neither can export is one LaunchError
naming the family and the op that failed. onnx (and onnxscript for the dynamo path) is imported only
here, at export time.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_vit.export import backbone_spec
from ssl_vit.files import MANIFEST, atomic_dir, write_manifest

from .errors import LaunchError

__all__ = ["ONNX_FILE", "ONNX_META", "OPSET", "export_onnx", "onnx_meta"]

ONNX_FILE = "backbone.onnx"
ONNX_META = "onnx.json"
OPSET = 18
INPUT, OUTPUTS = "images", ("pooled", "patch_tokens")


class _Features(nn.Module):
    """images -> (pooled, patch_tokens): the backbone's forward_features without mask or keep."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone.forward_features(images)
        return out.pooled, out.patch_tokens


def onnx_meta(module: nn.Module, *, objective: str | None = None, step: int | None = None,
              config: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """backbone.json's fields for `module` (how to rebuild it, what trained it, its sizes and config)."""
    module = getattr(module, "module", module)
    meta: dict[str, Any] = {**backbone_spec(module), "class": type(module).__name__, "objective": objective,
                            "step": step, "embed_dim": int(module.embed_dim),
                            "default_size": [int(s) for s in module.default_size],
                            "in_channels": int(module.in_channels),
                            "num_prefix_tokens": int(module.num_prefix_tokens)}
    if extra:
        meta.update(extra)
    if config is not None:
        meta["config"] = config
    return meta


def _family(module: nn.Module) -> str:
    """The registry name (e.g. `cvt_tiny`), or the class name of a class-built backbone."""
    return module.registry_name or type(module).__name__


def _failed_op(err: BaseException) -> str:
    """The op an exporter error names (`aten::foo`), else the first line of its innermost cause."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    for e in chain:  # the message only: the TorchScript exporter appends the whole graph after it
        head = str(e).split("Torch IR graph", 1)[0]
        found = re.search(r"(aten::[A-Za-z0-9_.]+|prim::[A-Za-z0-9_]+|onnx::[A-Za-z0-9_]+)", head)
        if found:
            return found.group(1)
        found = re.search(r"operator '?([A-Za-z0-9_.]+)", head)
        if found:
            return f"aten::{found.group(1)}"
    root = chain[-1]
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(root))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(root).__name__}: {first}"[:200]


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The TorchScript exporter, with a dynamic batch axis on the input and both outputs."""
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        torch.onnx.export(wrapper, (example,), str(path), input_names=[INPUT], output_names=list(OUTPUTS),
                          opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUT: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUTS}})


def _export_dynamo(wrapper: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The dynamo exporter (torch.export, onnxscript), with a symbolic batch dimension."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError:
        raise LaunchError("the dynamo ONNX exporter needs onnxscript: pip install onnxscript") from None
    quiet = io.StringIO()  # the dynamo exporter prints its steps, and its graph when it fails
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        torch.onnx.export(wrapper, (example,), str(path), input_names=[INPUT], output_names=list(OUTPUTS),
                          opset_version=OPSET, dynamo=True, external_data=False, verbose=False, report=False,
                          dynamic_shapes={INPUT: {0: torch.export.Dim("batch", min=1)}})


def export_onnx(module: nn.Module, out_dir: str | Path, *, meta: dict[str, Any]) -> Path:
    """Write `module` as `out_dir/backbone.onnx` + `onnx.json` (`meta` plus the graph's signature) +
    checksums.json, atomically (an existing ONNX export is replaced whole). Returns out_dir.

    LaunchError (one line) when onnx is not installed, when `out_dir` holds something else, or when
    the family cannot be exported (naming the family and the op).
    """
    try:
        import onnx
    except ImportError:
        raise LaunchError("--format onnx needs the onnx package: pip install onnx onnxscript") from None
    module = getattr(module, "module", module)
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not ((out / ONNX_META).is_file() or (out / MANIFEST).is_file()):
        raise LaunchError(f"{out} exists and is not an export; it would be replaced whole: choose a new or "
                          "empty folder")
    family = _family(module)
    backbone = copy.deepcopy(module).to("cpu", torch.float32).eval()
    wrapper = _Features(backbone).eval()
    size = [int(s) for s in backbone.default_size]
    example = torch.randn(2, int(backbone.in_channels), *size)  # batch 2: a batch of 1 could be specialised
    with torch.no_grad():
        pooled, tokens = wrapper(example)
    with atomic_dir(out) as tmp:
        path = tmp / ONNX_FILE
        exporter = "torchscript"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with torch.no_grad():
                    _export_torchscript(wrapper, example, path)
            except Exception as first:  # noqa: BLE001 (any converter failure: try the other exporter)
                path.unlink(missing_ok=True)
                exporter = "dynamo"
                try:
                    _export_dynamo(wrapper, example, path)
                except LaunchError:
                    raise
                except Exception as second:  # noqa: BLE001
                    raise LaunchError(
                        f"--format onnx: backbone family '{family}' cannot be exported to ONNX: op "
                        f"{_failed_op(first)} has no ONNX conversion (dynamo exporter: {_failed_op(second)}); "
                        "use --format native"
                    ) from None
        try:
            onnx.checker.check_model(str(path))
        except Exception as err:  # noqa: BLE001
            raise LaunchError(f"--format onnx: the ONNX graph of '{family}' is invalid: {_failed_op(err)}") from None
        video = len(size) == 3
        signature = {
            "file": ONNX_FILE, "opset": OPSET, "exporter": exporter,
            "inputs": {INPUT: {"shape": ["batch", int(backbone.in_channels), *size], "dtype": "float32",
                               "layout": "BCTHW" if video else "BCHW"}},
            "outputs": {"pooled": {"shape": ["batch", int(pooled.shape[-1])], "dtype": "float32"},
                        "patch_tokens": {"shape": ["batch", int(tokens.shape[1]), int(tokens.shape[2])],
                                         "dtype": "float32"}},
        }
        full = {**meta, "format": "onnx", "onnx": signature}
        (tmp / ONNX_META).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        write_manifest(tmp)
    return out
