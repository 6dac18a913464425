"""Tests of calm_models.config: typed nested dataclasses, files, overrides, precedence, diffs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from calm_models.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    diff_configs,
    flatten_config,
    load_config_file,
    resolve_config,
    save_config,
    validate_config,
)
from calm_models.optim import OptimConfig, ScheduleConfig


@dataclass
class ModelCfg:
    hidden_size: int = 64
    num_layers: int = 2
    dropout: float = 0.0
    activation: Literal["gelu", "silu"] = "silu"
    tie_embeddings: bool = True

    def validate(self) -> list[str]:
        return (
            []
            if self.hidden_size % 2 == 0
            else [f"hidden_size must be even, got {self.hidden_size}"]
        )


@dataclass
class DataCfg:
    train_files: list[str] = field(default_factory=list)
    block_len: int = 64
    cache_dir: str | None = None


@dataclass
class RunCfg:
    name: str = "run"
    seed: int = 0
    compile: bool = False
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


# ---------------------------------------------------------------------------------------------
# config_from_dict
# ---------------------------------------------------------------------------------------------


def test_from_dict_builds_nested_dataclasses_with_coercion():
    cfg = config_from_dict(
        RunCfg,
        {
            "seed": 3,
            "model": {"hidden_size": 128, "dropout": 0, "activation": "gelu"},
            "data": {"train_files": ["a.jsonl", "b.jsonl"], "cache_dir": None},
            "optim": {"lr": "1e-3", "betas": [0.8, 0.9]},
            "compile": "true",
        },
    )
    assert isinstance(cfg.model, ModelCfg) and isinstance(cfg.optim, OptimConfig)
    assert cfg.model.hidden_size == 128 and cfg.model.activation == "gelu"
    assert type(cfg.model.dropout) is float and cfg.model.dropout == 0.0  # int accepted for float
    assert cfg.optim.lr == pytest.approx(1e-3) and type(cfg.optim.lr) is float
    assert cfg.optim.betas == (0.8, 0.9) and isinstance(cfg.optim.betas, tuple)
    assert cfg.compile is True
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.schedule == ScheduleConfig()  # untouched sections keep their defaults
    assert cfg.name == "run"


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"model": {"hidden_size": "big"}}, ["model.hidden_size", "int", "'big'"]),
        ({"model": {"hidden_size": 1.5}}, ["model.hidden_size", "int"]),
        ({"model": {"hidden_size": True}}, ["model.hidden_size", "int", "bool"]),
        ({"model": {"tie_embeddings": "maybe"}}, ["model.tie_embeddings", "bool"]),
        ({"model": {"tie_embeddings": 1}}, ["model.tie_embeddings", "bool"]),
        ({"model": {"activation": "relu"}}, ["model.activation", "'gelu'", "'silu'", "'relu'"]),
        ({"data": {"train_files": ["a", 3.5j]}}, ["data.train_files[1]", "str"]),
        ({"data": {"train_files": 5}}, ["data.train_files", "list"]),
        ({"optim": {"betas": [0.9]}}, ["optim.betas", "2 items"]),
        ({"optim": {"lr": "fast"}}, ["optim.lr", "float", "'fast'"]),
        ({"optim": 3}, ["optim", "mapping", "OptimConfig"]),
    ],
)
def test_type_errors_name_the_dotted_path(data, fragments):
    with pytest.raises(ConfigError) as info:
        config_from_dict(RunCfg, data)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_unknown_keys_give_path_suggestion_and_valid_fields():
    with pytest.raises(ConfigError) as info:
        config_from_dict(RunCfg, {"optim": {"lrr": 1.0}})
    message = str(info.value)
    assert "'optim.lrr'" in message
    assert "did you mean 'lr'" in message
    assert "valid fields of OptimConfig: name, lr, betas" in message
    with pytest.raises(ConfigError, match=r"unknown field 'modle' \(did you mean 'model'\?\)"):
        config_from_dict(RunCfg, {"modle": {}})
    with pytest.raises(ConfigError) as info:  # nothing close: no suggestion, still lists fields
        config_from_dict(RunCfg, {"zzzzzz": 1})
    assert "did you mean" not in str(info.value) and "valid fields of RunCfg" in str(info.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def test_load_yaml_and_toml_files(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("model:\n  hidden_size: 96\noptim:\n  lr: 1.0e-4\n  betas: [0.9, 0.99]\n")
    toml = tmp_path / "run.toml"
    toml.write_text(
        'name = "t"\n[model]\nhidden_size = 96\n[optim]\nlr = 1e-4\nbetas = [0.9, 0.99]\n'
    )
    from_yaml = config_from_dict(RunCfg, load_config_file(yml))
    from_toml = config_from_dict(RunCfg, load_config_file(toml))
    assert from_yaml.model.hidden_size == from_toml.model.hidden_size == 96
    assert from_yaml.optim.lr == from_toml.optim.lr == pytest.approx(1e-4)
    assert from_yaml.optim.betas == from_toml.optim.betas == (0.9, 0.99)
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    assert load_config_file(empty) == {}


def test_file_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config_file(tmp_path / "missing.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  hidden_size: 4\n  layers: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(bad_yaml)
    assert "bad.yaml" in str(info.value) and "line" in str(info.value)
    assert "\n" not in str(info.value)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[model]\nhidden_size = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(bad_toml)
    assert "bad.toml" in str(info.value) and "line 2" in str(info.value)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config_file(listy)
    other = tmp_path / "run.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match=r"unsupported config file type '.json'"):
        load_config_file(other)


# ---------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------


def test_overrides_parse_floats_lists_bools_strings_and_none():
    base = {"model": {"hidden_size": 32}, "data": {"cache_dir": "/tmp/c"}}
    out = apply_overrides(
        base,
        [
            "optim.lr=3e-4",
            "data.train_files=[a.jsonl,b.jsonl]",
            "compile=true",
            "name=123",
            "data.cache_dir=null",
            "model.activation=gelu",
            "optim.betas=[0.9, 0.99]",
            "model.dropout=0",
            "schedule.warmup_steps=1e3",
            "optim.extra.relative_step=false",
        ],
        RunCfg,
    )
    assert out["optim"]["lr"] == pytest.approx(3e-4) and isinstance(out["optim"]["lr"], float)
    assert out["data"]["train_files"] == ["a.jsonl", "b.jsonl"]
    assert out["compile"] is True
    assert out["name"] == "123"  # a string field keeps the raw text
    assert out["data"]["cache_dir"] is None
    assert out["model"] == {"hidden_size": 32, "activation": "gelu", "dropout": 0.0}
    assert out["optim"]["betas"] == [0.9, 0.99]
    assert out["schedule"]["warmup_steps"] == 1000
    assert out["optim"]["extra"] == {"relative_step": False}  # into a dict-typed field
    assert base == {"model": {"hidden_size": 32}, "data": {"cache_dir": "/tmp/c"}}  # not mutated
    cfg = config_from_dict(RunCfg, out)
    assert cfg.optim.betas == (0.9, 0.99) and cfg.name == "123"


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("model.hiden_size=3", ["'model.hiden_size'", "did you mean 'hidden_size'", "ModelCfg"]),
        ("optimm.lr=3", ["'optimm'", "did you mean 'optim'"]),
        ("model.hidden_size.x=3", ["model.hidden_size", "not a section"]),
        ("model.hidden_size", ["key.sub=value"]),
        ("model.hidden_size=abc", ["model.hidden_size", "int"]),
        ("compile=sometimes", ["compile", "bool"]),
        ("model.activation=relu", ["model.activation", "'gelu'"]),
        ("data.train_files=[a, b", ["data.train_files", "cannot parse"]),
        ("=3", ["empty key"]),
    ],
)
def test_bad_overrides_raise_config_error_naming_them(override, fragments):
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [override], RunCfg)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_precedence_defaults_preset_file_overrides(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("seed: 7\nmodel:\n  num_layers: 4\noptim:\n  lr: 0.002\n")
    preset = {"seed": 1, "model": {"hidden_size": 96, "num_layers": 3}, "optim": {"lr": 0.001}}
    cfg = resolve_config(RunCfg, preset=preset, file=file, overrides=["seed=9"])
    assert cfg.model.hidden_size == 96  # preset over default
    assert cfg.model.num_layers == 4  # file over preset (deep merge keeps hidden_size)
    assert cfg.optim.lr == 0.002  # file over preset
    assert cfg.seed == 9  # override over file
    assert cfg.model.dropout == 0.0 and cfg.optim.betas == (0.9, 0.95)  # defaults remain
    # A dataclass preset works the same way.
    preset_cfg = RunCfg(model=ModelCfg(hidden_size=96, num_layers=3))
    again = resolve_config(RunCfg, preset=preset_cfg, file=None, overrides=["model.num_layers=5"])
    assert again.model == ModelCfg(hidden_size=96, num_layers=5)
    assert resolve_config(RunCfg) == RunCfg()
    with pytest.raises(ConfigError, match="preset is a ModelCfg"):
        resolve_config(RunCfg, preset=ModelCfg())


def test_validate_runs_on_every_nested_dataclass_and_collects_all_problems():
    with pytest.raises(ConfigError) as info:
        resolve_config(
            RunCfg, overrides=["model.hidden_size=33", "optim.lr=-1", "schedule.min_lr_ratio=2"]
        )
    message = str(info.value)
    assert message.startswith("invalid configuration: ")
    assert "model: hidden_size must be even, got 33" in message
    assert "optim: lr must be > 0, got -1.0" in message
    assert "schedule: min_lr_ratio must lie in [0, 1], got 2.0" in message
    assert "\n" not in message

    @dataclass
    class Raises:
        x: int = 0

        def validate(self) -> None:
            if self.x < 0:
                raise ValueError(f"x must be >= 0, got {self.x}")

    validate_config(Raises(1))
    with pytest.raises(ConfigError, match="x must be >= 0, got -2"):
        validate_config(Raises(-2))


def test_unknown_optimizer_name_is_reported_at_validation():
    with pytest.raises(ConfigError, match="unknown optimizer 'adamx'"):
        resolve_config(RunCfg, overrides=["optim.name=adamx"])


# ---------------------------------------------------------------------------------------------
# save / diff
# ---------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    cfg = resolve_config(
        RunCfg,
        overrides=[
            "name=exp 1",
            "optim.lr=1e-10",
            "optim.betas=[0.85,0.975]",
            "data.train_files=[x.jsonl]",
            "data.cache_dir=null",
            "model.dropout=0.1",
            "compile=yes",
        ],
    )
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert path.is_file() and not list(path.parent.glob("*.tmp-*"))
    back = config_from_dict(RunCfg, load_config_file(path))
    assert back == cfg
    assert yaml.safe_load(path.read_text())["optim"]["betas"] == [0.85, 0.975]


@given(
    hidden=st.integers(1, 10**6),
    dropout=st.floats(0.0, 1.0, allow_nan=False),
    lr=st.floats(1e-12, 10.0, allow_nan=False),
    files=st.lists(st.text(min_size=1, max_size=8), max_size=3),
    name=st.text(max_size=12),
)
def test_yaml_round_trip_is_exact(hidden, dropout, lr, files, name):
    cfg = RunCfg(
        name=name,
        model=ModelCfg(hidden_size=hidden, dropout=dropout),
        data=DataCfg(train_files=files),
        optim=OptimConfig(lr=lr),
    )
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    assert config_from_dict(RunCfg, yaml.safe_load(text)) == cfg


def test_diff_configs_lists_differing_dotted_paths():
    a = RunCfg()
    b = dataclasses.replace(a, model=ModelCfg(hidden_size=128), optim=OptimConfig(lr=1e-3))
    assert diff_configs(a, b) == ["model.hidden_size", "optim.lr"]
    assert diff_configs(a, b, fields=["model"]) == ["model.hidden_size"]
    assert diff_configs(a, b, fields=["model.num_layers", "data"]) == []
    assert diff_configs(a, a) == []
    # tuples and lists compare equal (YAML turns tuples into lists); dicts compare with dataclasses
    assert diff_configs(a, config_to_dict(a)) == []
    assert diff_configs({"x": (1, 2)}, {"x": [1, 2]}) == []
    # a key present on one side only differs
    assert diff_configs({"m": {"h": 1}}, {"m": {"h": 1, "l": 2}}) == ["m.l"]
    assert flatten_config({"m": {}, "n": None}) == {"m": {}, "n": None}
