"""Launcher config: merge order, unknown keys with the closest names, --set parsing, bad YAML."""

from __future__ import annotations

import pytest
import yaml

from launch.config import parse_set, preset_file, resolve
from launch.errors import LaunchError


def test_merge_order_defaults_objective_backbone_profile_file_set(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("optim:\n  lr: 0.123\n  clip_grad: 7.0\ndata:\n  batch_size: 5\n")
    cfg, sources = resolve("dino", "cvt", config_file=str(user), profile_hint="demo",
                           sets=["optim.clip_grad=9.5", "objective_args.num_local_crops=3"])
    assert cfg["optim"]["weight_decay_end"] == 0.4          # objective file over defaults
    assert cfg["data"]["image_size"] == 32                  # demo profile over the backbone preset (224)
    assert cfg["optim"]["lr"] == 0.123                      # --config over the profile (demo/dino.yaml: 2.5e-4)
    assert cfg["data"]["batch_size"] == 5
    assert cfg["optim"]["clip_grad"] == 9.5                 # --set over --config
    assert cfg["objective_args"]["num_local_crops"] == 3   # free keys pass through, --set over the profile
    names = [s.rsplit("/", 2)[-2] + "/" + s.rsplit("/", 1)[-1] for s in sources]
    assert names == ["configs/defaults.yaml", "objectives/dino.yaml", "backbones/cvt.yaml", "profiles/demo.yaml",
                     "demo/dino.yaml", f"{tmp_path.name}/user.yaml"]


def test_no_profile_when_data_is_given():
    cfg, _ = resolve("mae", "vit_tiny", cli={"data": {"train": "x.tar"}}, profile_hint=None)
    assert cfg["profile"] == "none" and cfg["data"]["image_size"] == 224
    assert cfg["optim"]["betas"] == [0.9, 0.95]             # mae.yaml


@pytest.mark.parametrize("key, hint", [("optim.lrr=1", "optim.lr"), ("data.batchsize=3", "data.batch_size"),
                                       ("trian.steps=3", "train.steps")])
def test_unknown_key_names_closest(key, hint):
    with pytest.raises(LaunchError, match=f"unknown config key .*closest: .*{hint}"):
        resolve("dino", "vit_tiny", sets=[key])


def test_unknown_key_in_file_and_malformed_yaml(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("train:\n  stepz: 3\n")
    with pytest.raises(LaunchError, match="train.stepz.*train.steps"):
        resolve("dino", "vit_tiny", config_file=str(bad_key))
    broken = tmp_path / "b.yaml"
    broken.write_text("optim: {lr: [1, 2\n")
    with pytest.raises(LaunchError, match="not valid YAML"):
        resolve("dino", "vit_tiny", config_file=str(broken))
    unsafe = tmp_path / "c.yaml"
    unsafe.write_text("optim: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(LaunchError, match="not valid YAML"):  # safe_load refuses python tags
        resolve("dino", "vit_tiny", config_file=str(unsafe))


def test_parse_set_types_and_errors():
    tree = parse_set(["a.b=3", "a.c=[1, 2]", "d=null", "e=1e-3", "f=text"])
    assert tree == {"a": {"b": 3, "c": [1, 2]}, "d": None, "e": 1e-3, "f": "text"}
    with pytest.raises(LaunchError, match="key=value"):
        parse_set(["novalue"])


def test_preset_file_family_prefix():
    assert preset_file("backbones", "cvt_tiny").name == "cvt.yaml"
    assert preset_file("backbones", "vit_small_patch16").name == "vit.yaml"
    assert preset_file("backbones", "simple_vit") is None
    defaults = yaml.safe_load(preset_file("objectives", "dino").read_text())
    assert defaults["optim"]["clip_grad"] == 3.0


def test_typed_config_has_exactly_the_default_keys():
    import dataclasses

    from launch.config import CONFIG_DIR, RunConfig, parse, read_yaml

    defaults = read_yaml(CONFIG_DIR / "defaults.yaml")

    def keys(cls) -> set[str]:
        out = set()
        for f in dataclasses.fields(cls):
            section = f.metadata.get("section")
            out |= {f"{f.name}.{k}" for k in keys(section)} if section else {f.name}
        return out

    def yaml_keys(tree, prefix="") -> set[str]:
        out = set()
        for k, v in tree.items():
            out |= yaml_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v and k not in FREE else {prefix + k}
        return out

    FREE = ("backbone_args", "objective_args")
    assert keys(RunConfig) == yaml_keys(defaults)
    cfg = parse(resolve("dino", "cvt", profile_hint="demo")[0])
    assert cfg.data.image_size == 32 and cfg.optim.betas == (0.9, 0.999) and isinstance(cfg.optim.lr, float)
    assert parse(cfg.as_dict()) == cfg


@pytest.mark.parametrize("item,expect", [
    ("optim.clip_grad=-1", "optim.clip_grad"), ("train.stop_at=-3", "train.stop_at"), ("optim.lr=abc", "optim.lr"),
    ("optim.betas=0.9", "optim.betas"), ("train.seed=abc", "train.seed"), ("optim.lr=-1", "optim.lr"),
    ("data.num_workers=-1", "data.num_workers"), ("train.mixed_precision=fp8", "fp8"),
    ("data.std=[0,0,0]", "data.std"), ("data.mean=[0.5]", "data.mean"), ("train.steps=2.5", "train.steps"),
    ("optim.lr_scaling=cubic", "linear | sqrt | none"), ("data.resampled=3", "true or false"),
    ("train.stop_at=99999999", "past train.steps"), ("optim.lr=.inf", "optim.lr"),
    ("train.strategy=zero3", "ddp | fsdp"),
])
def test_bad_values_name_the_key_and_what_is_allowed(item, expect):
    from launch.config import parse

    with pytest.raises(LaunchError) as err:
        parse(resolve("mae", "vit_tiny", sets=[item], profile_hint=None)[0])
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_a_bare_no_is_the_choice_no():
    """`--set train.mixed_precision=no` (YAML reads `no` as false) is the choice "no"; false stays refused where
    "no" is not a choice."""
    from launch.config import parse

    assert parse(resolve("mae", "vit_tiny", sets=["train.mixed_precision=no"], profile_hint=None)[0]
                 ).train.mixed_precision == "no"
    with pytest.raises(LaunchError, match="train.strategy"):
        parse(resolve("mae", "vit_tiny", sets=["train.strategy=no"], profile_hint=None)[0])


def test_objective_and_backbone_are_required():
    from launch.config import parse

    with pytest.raises(LaunchError, match="--backbone is required"):
        parse(resolve("mae", None, profile_hint=None)[0])


def test_stored_config_missing_newer_keys_reads_with_defaults():
    """A run folder written before a key existed stays readable (export, probe, pictures); unknown keys do not."""
    from launch.config import CONFIG_DIR, parse_stored, read_yaml

    tree = read_yaml(CONFIG_DIR / "defaults.yaml") | {"objective": "dino", "backbone": "vit"}
    del tree["train"]["strategy"]
    tree["optim"]["lr"] = 0.123
    cfg = parse_stored(tree, "old/config.yaml")
    assert cfg.train.strategy == "ddp" and cfg.optim.lr == 0.123
    tree["train"]["no_such_key"] = 1
    with pytest.raises(LaunchError, match="unknown config key 'train.no_such_key' in old/config.yaml"):
        parse_stored(tree, "old/config.yaml")
