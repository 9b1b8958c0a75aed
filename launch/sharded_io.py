"""Reading a `torch.distributed.checkpoint` folder without running anything it holds.

torch's `FileSystemReader` unpickles the folder's `.metadata` with plain `pickle.load`, and its
`DefaultLoadPlanner` reads every non-tensor entry (an optimizer's param groups) with
`torch.load(weights_only=False)`: a checkpoint folder someone else wrote could run code on `--resume` or
`export.py`. Here `.metadata` goes through an unpickler that only builds the checkpoint format's own
metadata classes, torch dtypes and sizes, and every non-tensor entry must load with `weights_only=True`
first. Anything else is `CorruptCheckpoint` naming the file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException

from ssl_vit import CorruptCheckpoint

__all__ = ["SafeLoadPlanner", "SafeReader", "load", "read_metadata"]

_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.strided and other layouts are pickled through it
    ("pathlib", "PosixPath"),  # _StorageInfo.relative_path
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what a `.metadata` file of torch.distributed.checkpoint holds."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES and isinstance(getattr(dcp_metadata, name, None), type):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_metadata(folder: str | Path) -> dcp_metadata.Metadata:
    """The `Metadata` of a torch.distributed.checkpoint folder; CorruptCheckpoint when `.metadata` is
    missing, damaged or refers to anything outside the format."""
    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError) as err:
        raise CorruptCheckpoint(f"{path}: not a readable checkpoint metadata file ({err})") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CorruptCheckpoint(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


class SafeReader(dcp.FileSystemReader):
    """`FileSystemReader` whose metadata comes from `read_metadata` (tensors were already read with
    `torch.load(weights_only=True)` by torch)."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(str(folder))
        self.folder = Path(folder)

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = read_metadata(self.folder)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """`DefaultLoadPlanner` that refuses a non-tensor entry `torch.load(weights_only=True)` cannot read."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        start = value.tell()
        try:
            torch.load(value, weights_only=True)
        except Exception as err:
            raise CorruptCheckpoint(f"checkpoint entry {read_item.dest_index.fqn}: refused, it is not plain data "
                                    f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        value.seek(start)  # the same bytes, now known to hold only what weights_only allows
        super().load_bytes(read_item, value)


def load(state: dict[str, Any], folder: str | Path, *, allow_partial_load: bool = False,
         no_dist: bool = False) -> None:
    """`torch.distributed.checkpoint.load(state)` from `folder` through `SafeReader` and `SafeLoadPlanner`
    (a collective unless `no_dist`). CorruptCheckpoint for a planted or damaged file; any other failure of
    a process (a name or shape that does not fit) as RuntimeError with its first line."""
    read_metadata(folder)  # refused here, before torch's planning reads it on every process
    try:
        dcp.load(state, storage_reader=SafeReader(folder),
                 planner=SafeLoadPlanner(allow_partial_load=allow_partial_load), no_dist=no_dist)
    except CheckpointException as err:  # torch gathers every process's failure into one BaseException
        failures = [exc for exc, _ in err.failures.values()]
        for exc in failures:
            if isinstance(exc, CorruptCheckpoint):
                raise exc from None
        first = str(failures[0]).strip().splitlines() if failures else []
        raise RuntimeError(first[-1] if first else "checkpoint load failed") from None
