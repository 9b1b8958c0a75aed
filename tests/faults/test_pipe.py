"""A `pipe:` command planted in a run or export folder (config.yaml, backbone.json `data.train` / `data.val`,
checksums re-written so the folder verifies, as whoever planted it would) is data, never run: the file it would
create never appears whichever tool opens the folder."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from launch.export_run import main as export_main
from launch.probe import main as probe_main
from launch.visualize import main as visualize_main
from ssl_vit.files import write_manifest

from .common import call, pretrain, tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_args(cache, out, *extra: str) -> list[str]:
    return tiny(cache, "--steps", "2", "--set", "train.checkpoint_every=1", "--out", str(out), *extra)


@pytest.fixture(scope="module")
def good_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "run"
    rc, err, _ = pretrain(run_args(cache, out))
    assert rc == 0, err
    return out


def plant_yaml(path, command: str) -> None:
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["train"] = cfg["data"]["val"] = command
    path.write_text(yaml.safe_dump(cfg))


@pytest.fixture
def planted(good_run, tmp_path):
    """A copy of the run with the command in config.yaml of the run, of every checkpoint and of the export, and
    in backbone.json; returns (run folder, the file the command would create)."""
    pwned = tmp_path / "PWNED"
    command = f"pipe:touch {pwned}; cat x.tar"
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    plant_yaml(run / "config.yaml", command)
    for folder in [*run.glob("checkpoints/step_*"), run / "export"]:
        plant_yaml(folder / "config.yaml", command)
        write_manifest(folder)
    meta_path = run / "export" / "backbone.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["data"]["train"] = meta["config"]["data"]["val"] = command
    meta_path.write_text(json.dumps(meta))
    write_manifest(run / "export")
    return run, pwned


TOOLS = ["visualize_run", "visualize_export", "linear_probe", "export_run", "export_export", "resume"]


@pytest.mark.parametrize("tool", TOOLS)
def test_planted_pipe_command_never_runs(tool, planted, cache, tmp_path):
    run, pwned = planted
    if tool == "visualize_run":
        rc, err, _ = call(visualize_main, [str(run), "--cache", str(cache), "--images", "2"])
    elif tool == "visualize_export":
        rc, err, _ = call(visualize_main, [str(run / "export"), "--cache", str(cache), "--images", "2"])
    elif tool == "linear_probe":
        rc, err, _ = call(probe_main, ["--weights", str(run / "export"), "--cache", str(cache), "--epochs", "1",
                                       "--no-knn", "--workers", "0", "--lrs", "0.1"])
    elif tool == "export_run":
        rc, err, _ = call(export_main, [str(run), str(tmp_path / "exported")])
    elif tool == "export_export":
        rc, err, _ = call(export_main, [str(run / "export"), str(tmp_path / "exported")])
    else:
        rc, err, _ = pretrain(run_args(cache, run, "--resume"))
    assert not pwned.exists(), f"{tool} ran the planted command"
    assert rc == 0, err  # the tools work on the folder: they read its config as data only


def test_pipe_url_from_the_command_line_is_still_accepted(cache, tmp_path):
    """The user's own --data may be a pipe: URL (streaming from object stores): it is not refused wholesale."""
    from launch.digits import digits_shards

    train, _ = digits_shards(str(cache))
    from launch.data import expand_shards

    first = expand_shards(train)[0]
    marker = tmp_path / "RAN"
    out = tmp_path / "run"
    rc, err, _ = pretrain(tiny(cache, "--steps", "1", "--out", str(out), "--set", "profile=demo", "--data",
                               f"pipe:touch {marker}; cat {first}"))
    assert rc == 0, err
    assert marker.exists()
