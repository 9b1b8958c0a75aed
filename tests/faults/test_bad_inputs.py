"""A table of bad inputs across pretrain.py, export.py, linear_probe.py, `python -m launch.visualize`,
`python -m launch.make_shards` and the Python API. Each command case: exit status 2, a single line on stderr
without "Traceback", and every folder of the case byte-identical to before (the tree is hashed before and
after). Each API case: the specific exception, a subclass of ssl_vit.SslVitError, with a one-line message."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from types import SimpleNamespace

import pytest
import torch

import ssl_vit
from launch.cli import main as pretrain_main
from launch.export_run import main as export_main
from launch.make_shards import main as shards_main
from launch.probe import main as probe_main
from launch.visualize import main as visualize_main
from ssl_vit.errors import (
    BadArgument,
    CorruptCheckpoint,
    ExportNotFound,
    IncompatibleBackbone,
    InputDtypeError,
    InputShapeError,
    MalformedExport,
    UnknownNameError,
    WeightsMismatch,
)
from ssl_vit.files import write_manifest

from .common import call, one_error_line, pretrain, tiny, tree_hash

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOOLS = {"pretrain": pretrain_main, "export": export_main, "probe": probe_main, "visualize": visualize_main,
         "make_shards": shards_main}


@pytest.fixture(scope="module")
def ws(cache, tmp_path_factory):
    """The folders the cases read: a 1-step run with its export, damaged copies, a file, an empty folder..."""
    root = tmp_path_factory.mktemp("bad-inputs")
    run = root / "run"
    rc, err, _ = pretrain(tiny(cache, "--steps", "1", "--out", str(run)))
    assert rc == 0, err
    export = run / "export"
    trunc = root / "trunc"
    shutil.copytree(export, trunc)
    weights = trunc / "backbone.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    afile = root / "afile.txt"
    afile.write_text("not a folder\n")
    (root / "empty").mkdir()
    (root / "plain").mkdir()
    (root / "plain" / "notes.txt").write_text("someone's files\n")
    (root / "notimages").mkdir()
    for i in range(3):
        (root / "notimages" / f"img{i}.png").write_bytes(b"not a png" * 10)
    (root / "bad.yaml").write_text("optim: [1, 2\n")
    (root / "code.yaml").write_text("optim: !!python/object/apply:os.system ['touch PWNED']\n")
    with tarfile.open(root / "text.tar", "w") as tar:
        tar.add(afile, arcname="a.txt")
    # exports that verify (checksums re-written) but whose backbone.json is wrong
    for name, change in {"malformed": {"step": "four"}, "unknown_name": {"registry_name": "no_such_vit"},
                         "mismatch": {"overrides": {"dim": 32}}, "bad_json": None}.items():
        folder = root / name
        shutil.copytree(export, folder)
        meta_path = folder / "backbone.json"
        if change is None:
            meta_path.write_text("{not json")
        else:
            meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **change}))
        write_manifest(folder)
    return SimpleNamespace(root=root, run=run, export=export, trunc=trunc, afile=afile, empty=root / "empty",
                           plain=root / "plain", notimages=root / "notimages", cache=cache,
                           step=run / "checkpoints" / "step_0000001")


def P(ws, *extra: str) -> list[str]:
    """pretrain.py with the tiny settings into ws.out, plus `extra`."""
    return tiny(ws.cache, "--steps", "2", "--out", str(ws.out), *extra)


def S(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


# id: (tool, argv from ws, a word the line must hold)
CASES = {
    # --- pretrain.py: the list -----------------------------------------------------------------------
    "clip_grad_negative": ("pretrain", lambda w: P(w, *S("optim.clip_grad=-1")), "optim.clip_grad"),
    "stop_at_negative": ("pretrain", lambda w: P(w, *S("train.stop_at=-3")), "train.stop_at"),
    "lr_not_a_number": ("pretrain", lambda w: P(w, *S("optim.lr=abc")), "optim.lr"),
    "betas_scalar": ("pretrain", lambda w: P(w, *S("optim.betas=0.9")), "optim.betas"),
    "seed_not_an_int": ("pretrain", lambda w: P(w, *S("train.seed=abc")), "train.seed"),
    "lr_negative": ("pretrain", lambda w: P(w, *S("optim.lr=-1")), "optim.lr"),
    "num_workers_negative": ("pretrain", lambda w: P(w, *S("data.num_workers=-1")), "data.num_workers"),
    "mixed_precision_fp8": ("pretrain", lambda w: P(w, *S("train.mixed_precision=fp8")), "fp8"),
    "std_zero": ("pretrain", lambda w: P(w, *S("data.std=[0,0,0]")), "data.std"),
    "missing_backbone": ("pretrain", lambda w: [a for a in P(w) if a not in ("--backbone", "vit")], "backbone"),
    "out_is_a_file": ("pretrain", lambda w: P(w, "--out", str(w.afile)), "is a file"),
    "out_inside_a_file": ("pretrain", lambda w: P(w, "--out", str(w.afile / "sub")), "--out"),
    "out_read_only": ("pretrain", lambda w: P(w, "--out", str(w.root / "ro" / "run")), "not writable"),
    "out_unwritable_fs": ("pretrain", lambda w: P(w, "--out", "/proc/ssl_vit_fault_run"), "--out"),
    # --- pretrain.py: more config --------------------------------------------------------------------------------
    "missing_objective": ("pretrain", lambda w: [a for a in P(w) if a not in ("--objective", "mae")], "objective"),
    "max_bad_steps_zero": ("pretrain", lambda w: P(w, *S("train.max_bad_steps=0")), "train.max_bad_steps"),
    "keep_checkpoints_zero": ("pretrain", lambda w: P(w, *S("train.keep_checkpoints=0")), "keep_checkpoints"),
    "batch_size_zero": ("pretrain", lambda w: P(w, *S("data.batch_size=0")), "data.batch_size"),
    "steps_zero": ("pretrain", lambda w: P(w, "--steps", "0"), "train.steps"),
    "steps_not_an_int": ("pretrain", lambda w: P(w, "--steps", "abc"), "--steps"),
    "lr_nan": ("pretrain", lambda w: P(w, *S("optim.lr=nan")), "optim.lr"),
    "lr_inf": ("pretrain", lambda w: P(w, *S("optim.lr=inf")), "optim.lr"),
    "image_size_zero": ("pretrain", lambda w: P(w, *S("data.image_size=0")), "data.image_size"),
    "mean_wrong_length": ("pretrain", lambda w: P(w, *S("data.mean=[0.5]")), "data.mean"),
    "betas_out_of_range": ("pretrain", lambda w: P(w, *S("optim.betas=[0.9,1.5]")), "optim.betas"),
    "grad_accum_zero": ("pretrain", lambda w: P(w, *S("optim.grad_accum=0")), "optim.grad_accum"),
    "log_every_negative": ("pretrain", lambda w: P(w, *S("train.log_every=-1")), "train.log_every"),
    "clip_mode_unknown": ("pretrain", lambda w: P(w, *S("optim.clip_mode=foo")), "optim.clip_mode"),
    "lr_scaling_unknown": ("pretrain", lambda w: P(w, *S("optim.lr_scaling=cubic")), "optim.lr_scaling"),
    "weight_decay_negative": ("pretrain", lambda w: P(w, *S("optim.weight_decay=-0.1")), "optim.weight_decay"),
    "eps_zero": ("pretrain", lambda w: P(w, *S("optim.eps=0")), "optim.eps"),
    "compile_not_a_bool": ("pretrain", lambda w: P(w, *S("train.compile=maybe")), "train.compile"),
    "checkpoint_every_negative": ("pretrain", lambda w: P(w, *S("train.checkpoint_every=-1")), "checkpoint_every"),
    "shuffle_buffer_negative": ("pretrain", lambda w: P(w, *S("data.shuffle_buffer=-1")), "data.shuffle_buffer"),
    "backbone_args_not_a_mapping": ("pretrain", lambda w: P(w, *S("backbone_args=5")), "backbone_args"),
    "backbone_arg_wrong_type": ("pretrain", lambda w: P(w, *S("backbone_args.dim=abc")), "dim"),
    "objective_arg_unknown": ("pretrain", lambda w: P(w, *S("objective_args.no_such_arg=1")), "no_such_arg"),
    "profile_unknown": ("pretrain", lambda w: P(w, *S("profile=nope")), "profile"),
    "unknown_key": ("pretrain", lambda w: P(w, *S("optim.lrr=1")), "optim.lr"),
    "set_without_value": ("pretrain", lambda w: P(w, *S("optim")), "key=value"),
    "config_missing": ("pretrain", lambda w: P(w, "--config", str(w.root / "nope.yaml")), "does not exist"),
    "config_bad_yaml": ("pretrain", lambda w: P(w, "--config", str(w.root / "bad.yaml")), "YAML"),
    "config_python_tag": ("pretrain", lambda w: P(w, "--config", str(w.root / "code.yaml")), "code.yaml"),
    "unknown_objective": ("pretrain", lambda w: P(w, "--objective", "dinno"), "dino"),
    "unknown_backbone": ("pretrain", lambda w: P(w, "--backbone", "vitt"), "vitt"),
    "incompatible_pair": ("pretrain", lambda w: P(w, "--objective", "mp3", "--backbone", "cvt"), "pos_free"),
    "data_missing": ("pretrain", lambda w: P(w, "--data", str(w.root / "nope-{000..002}.tar")), "does not exist"),
    "data_empty_folder": ("pretrain", lambda w: P(w, "--data", str(w.empty)), "no .tar"),
    "data_without_images": ("pretrain", lambda w: P(w, "--data", str(w.root / "text.tar")), "no images"),
    "view_size_too_small": ("pretrain", lambda w: P(w, *S("data.view_size=7")), "view"),
    "resume_nothing": ("pretrain", lambda w: P(w, "--resume"), "no checkpoint"),
    "resume_not_a_checkpoint": ("pretrain", lambda w: P(w, "--resume", str(w.plain)), "is not a checkpoint"),
    "resume_an_export": ("pretrain", lambda w: P(w, "--resume", str(w.export)), "is not a checkpoint"),
    "resume_and_overwrite": ("pretrain", lambda w: P(w, "--resume", "--overwrite"), "exclude each other"),
    "resume_other_backbone": ("pretrain", lambda w: [*P(w, "--backbone", "simple_vit", "--resume", str(w.step)),
                                                     "--steps", "1"], "belongs to backbone"),
    "resume_other_schedule": ("pretrain", lambda w: P(w, "--resume", str(w.step)), "--steps 1"),
    "out_holds_another_run": ("pretrain", lambda w: P(w, "--out", str(w.run)), "already holds"),
    # --- export.py ---------------------------------------------------------------------------------------------
    "export_no_arguments": ("export", lambda w: [], "required"),
    "export_source_missing": ("export", lambda w: [str(w.root / "nope"), str(w.out)], "does not exist"),
    "export_source_is_out": ("export", lambda w: [str(w.export), str(w.export)], "source itself"),
    "export_source_not_a_run": ("export", lambda w: [str(w.plain), str(w.out)], "neither a run"),
    "export_source_a_file": ("export", lambda w: [str(w.afile), str(w.out)], "neither a run"),
    "export_which_teacher_mae": ("export", lambda w: [str(w.run), str(w.out), "--which", "teacher"], "no teacher"),
    "export_which_of_an_export": ("export", lambda w: [str(w.export), str(w.out), "--which", "student"],
                                  "--which"),
    "export_format_unknown": ("export", lambda w: [str(w.run), str(w.out), "--format", "tflite"], "--format"),
    "export_out_is_a_file": ("export", lambda w: [str(w.run), str(w.afile)], "is a file"),
    "export_out_holds_files": ("export", lambda w: [str(w.run), str(w.plain)], "not a backbone export"),
    "export_truncated_weights": ("export", lambda w: [str(w.trunc), str(w.out)], "backbone.safetensors"),
    "export_malformed_meta": ("export", lambda w: [str(w.root / "malformed"), str(w.out)], "step"),
    # --- linear_probe.py ---------------------------------------------------------------------------------------
    "probe_no_weights": ("probe", lambda w: [], "--weights"),
    "probe_weights_missing": ("probe", lambda w: ["--weights", str(w.root / "nope")], "missing"),
    "probe_weights_not_an_export": ("probe", lambda w: ["--weights", str(w.plain)], "not a backbone export"),
    "probe_truncated_weights": ("probe", lambda w: ["--weights", str(w.trunc)], "backbone.safetensors"),
    "probe_unknown_backbone": ("probe", lambda w: ["--weights", str(w.root / "unknown_name")], "no_such_vit"),
    "probe_weights_mismatch": ("probe", lambda w: ["--weights", str(w.root / "mismatch")], "do not fit"),
    "probe_meta_not_json": ("probe", lambda w: ["--weights", str(w.root / "bad_json")], "not valid JSON"),
    "probe_epochs_zero": ("probe", lambda w: ["--weights", str(w.export), "--epochs", "0"], "--epochs"),
    "probe_k_zero": ("probe", lambda w: ["--weights", str(w.export), "--k", "0"], "--k"),
    "probe_temperature_zero": ("probe", lambda w: ["--weights", str(w.export), "--temperature", "0"], "--temperature"),
    "probe_lr_negative": ("probe", lambda w: ["--weights", str(w.export), "--lrs", "-1"], "--lrs"),
    "probe_train_without_val": ("probe", lambda w: ["--weights", str(w.export), "--train", str(w.root / "text.tar")],
                                "--val"),
    "probe_epochs_not_an_int": ("probe", lambda w: ["--weights", str(w.export), "--epochs", "x"], "--epochs"),
    "probe_image_size_bad": ("probe", lambda w: ["--weights", str(w.export), "--image-size", "7",
                                                 "--cache", str(w.cache)], "--image-size"),
    "probe_data_missing": ("probe", lambda w: ["--weights", str(w.export), "--train", str(w.root / "n.tar"),
                                               "--val", str(w.root / "n.tar")], "does not exist"),
    # --- python -m launch.visualize ----------------------------------------------------------------------------
    "visualize_no_arguments": ("visualize", lambda w: [], "run_dir"),
    "visualize_missing": ("visualize", lambda w: [str(w.root / "nope")], "not a folder"),
    "visualize_a_file": ("visualize", lambda w: [str(w.afile)], "not a folder"),
    "visualize_empty_folder": ("visualize", lambda w: [str(w.empty)], "is it a run folder"),
    "visualize_images_zero": ("visualize", lambda w: [str(w.run), "--images", "0"], "--images"),
    "visualize_truncated_weights": ("visualize", lambda w: [str(w.trunc)], "backbone.safetensors"),
    "visualize_data_missing": ("visualize", lambda w: [str(w.export), "--data", str(w.root / "n.tar")],
                               "does not exist"),
    "visualize_out_unwritable": ("visualize", lambda w: [str(w.export), "--out", "/proc/ssl_vit_fault_vis"],
                                 "ssl_vit_fault_vis"),
    # --- python -m launch.make_shards --------------------------------------------------------------------------
    "shards_no_arguments": ("make_shards", lambda w: [], "required"),
    "shards_input_missing": ("make_shards", lambda w: [str(w.root / "nope"), str(w.out)], "does not exist"),
    "shards_input_empty": ("make_shards", lambda w: [str(w.empty), str(w.out)], "no images"),
    "shards_no_readable_image": ("make_shards", lambda w: [str(w.notimages), str(w.out)], "image"),
    "shards_out_is_a_file": ("make_shards", lambda w: [str(w.notimages), str(w.afile)], "file"),
    "shards_size_zero": ("make_shards", lambda w: [str(w.notimages), str(w.out), "--shard-size", "0"], "--shard-size"),
    "shards_size_not_an_int": ("make_shards", lambda w: [str(w.notimages), str(w.out), "--shard-size", "x"],
                               "--shard-size"),
}

# Known failures: the fix is named in the reason (and in the report of the fault suite).
XFAIL: dict[str, str] = {}
API_XFAIL: dict[str, str] = {}


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=XFAIL[case])] if case in XFAIL else []
        yield pytest.param(case, marks=marks, id=case)


@pytest.mark.parametrize("case", list(_params()))
def test_bad_command_line(case, ws, tmp_path):
    tool, argv, word = CASES[case]
    ws = SimpleNamespace(**vars(ws), out=tmp_path / "out")  # the output folder of this case: never created
    if case == "out_read_only":
        ro = ws.root / "ro"
        ro.mkdir(exist_ok=True)
        ro.chmod(0o555)
        if os.access(ro, os.W_OK):
            pytest.skip("permission bits do not bind this user (root); out_unwritable_fs covers it")
    args = argv(ws)
    if tool in ("probe", "visualize") and "--cache" not in args and args:
        args = [*args, "--cache", str(ws.cache)]
    before = tree_hash(ws.root)
    rc, err, _ = call(TOOLS[tool], args)
    assert rc == 2, err
    one_error_line(err, word)
    assert tree_hash(ws.root) == before
    assert not ws.out.exists()


# id: (callable taking ws, the exception it must raise)
API = {
    "create_backbone_dim_str": (lambda w: ssl_vit.create_backbone("vit_tiny", dim="abc"), BadArgument),
    "create_backbone_depth_float": (lambda w: ssl_vit.create_backbone("vit_tiny", depth=2.5), BadArgument),
    "create_backbone_unknown_arg": (lambda w: ssl_vit.create_backbone("vit_tiny", no_such_arg=1), BadArgument),
    "create_backbone_unknown_name": (lambda w: ssl_vit.create_backbone("vit_tinyy"), UnknownNameError),
    "create_backbone_name_not_str": (lambda w: ssl_vit.create_backbone(5), BadArgument),
    "forward_uint8": (lambda w: _vit().forward_features(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)),
                      InputDtypeError),
    "forward_numpy": (lambda w: _vit().forward_features(torch.zeros(1, 3, 32, 32).numpy()), InputDtypeError),
    "forward_rank_3": (lambda w: _vit().forward_features(torch.zeros(3, 32, 32)), InputShapeError),
    "forward_rank_5": (lambda w: _vit().forward_features(torch.zeros(1, 3, 2, 32, 32)), InputShapeError),
    "forward_one_channel": (lambda w: _vit().forward_features(torch.zeros(1, 1, 32, 32)), InputShapeError),
    "forward_size_not_multiple": (lambda w: _vit().forward_features(torch.zeros(1, 3, 30, 30)), InputShapeError),
    "call_uint8": (lambda w: _vit()(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), InputDtypeError),
    "objective_incompatible": (lambda w: ssl_vit.create_objective("mp3", ssl_vit.create_backbone("cvt_tiny")),
                               IncompatibleBackbone),
    "objective_unknown": (lambda w: ssl_vit.create_objective("maee", _vit()), UnknownNameError),
    "load_backbone_missing": (lambda w: ssl_vit.load_backbone(w.root / "nope"), ExportNotFound),
    "load_backbone_empty": (lambda w: ssl_vit.load_backbone(w.empty), ExportNotFound),
    "load_backbone_truncated": (lambda w: ssl_vit.load_backbone(w.trunc), CorruptCheckpoint),
    "load_backbone_malformed": (lambda w: ssl_vit.load_backbone(w.root / "malformed"), MalformedExport),
    "load_backbone_not_json": (lambda w: ssl_vit.load_backbone(w.root / "bad_json"), MalformedExport),
    "load_backbone_unknown_name": (lambda w: ssl_vit.load_backbone(w.root / "unknown_name"), UnknownNameError),
    "load_backbone_mismatch": (lambda w: ssl_vit.load_backbone(w.root / "mismatch"), WeightsMismatch),
    "load_backbone_checkpoint": (lambda w: ssl_vit.load_backbone(w.step), ExportNotFound),
}


def _vit() -> ssl_vit.Backbone:
    return ssl_vit.create_backbone("vit_tiny")


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=API_XFAIL[c]))
                                  if c in API_XFAIL else c for c in API])
def test_bad_api_input(case, ws):
    fn, exc = API[case]
    assert issubclass(exc, ssl_vit.SslVitError)
    before = tree_hash(ws.root)
    with pytest.raises(exc) as info:
        fn(ws)
    message = str(info.value)
    assert message and "\n" not in message.strip(), message
    assert tree_hash(ws.root) == before


def test_the_table_is_big_enough():
    assert len(CASES) + len(API) >= 60
    assert {tool for tool, _, _ in CASES.values()} == set(TOOLS)
