"""A sharded (FSDP) checkpoint folder is data: a `.metadata` or a non-tensor entry planted to run code when
unpickled is refused with CorruptCheckpoint, and the file its code would create never appears. torch's own
reader and planner do run it (checked here too, so the planted payloads are known to be live)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from launch.sharded_io import load, read_metadata
from ssl_vit import CorruptCheckpoint


class Planted:
    """Unpickling this creates `marker` (what a planted payload could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _save(folder: Path, extra: object = 1.0) -> dict:
    model = torch.nn.Linear(3, 4)
    state = {"model": model.state_dict(), "optim": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}],
                                                     "extra": extra}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return state


def _load(folder: Path, safe: bool = True) -> dict:
    target = {"model": {k: torch.zeros_like(v) for k, v in torch.nn.Linear(3, 4).state_dict().items()},
              "optim": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0)}], "extra": None}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if safe:
            load(target, folder, no_dist=True)
        else:
            dcp.load(target, checkpoint_id=str(folder), no_dist=True)
    return target


def test_safe_reader_round_trips_a_checkpoint(tmp_path):
    saved = _save(tmp_path / "ck")
    loaded = _load(tmp_path / "ck")
    for k, v in saved["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["optim"]["param_groups"][0]["lr"] == 0.1 and loaded["optim"]["extra"] == 1.0
    assert set(read_metadata(tmp_path / "ck").state_dict_metadata) >= {"model.weight", "model.bias"}


def test_planted_metadata_is_refused(tmp_path):
    folder, marker = tmp_path / "ck", tmp_path / "ran"
    _save(folder)
    (folder / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(CorruptCheckpoint, match="not part of a checkpoint's metadata"):
        read_metadata(folder)
    with pytest.raises(CorruptCheckpoint):
        _load(folder)
    assert not marker.exists()
    with pytest.raises(AttributeError):  # torch's reader runs the payload, then fails on the result (None)
        dcp.FileSystemReader(str(folder)).read_metadata()
    assert marker.exists()


def test_planted_non_tensor_entry_is_refused(tmp_path):
    folder, marker = tmp_path / "ck", tmp_path / "ran"
    _save(folder, extra=Planted(marker))
    marker.unlink(missing_ok=True)
    with pytest.raises(CorruptCheckpoint, match="optim.extra"):
        _load(folder)
    assert not marker.exists()
    _load(folder, safe=False)  # torch's default planner unpickles it and runs it
    assert marker.exists()
