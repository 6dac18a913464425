"""The config home: typed dataclasses, files, overrides, precedence, one-line errors, diffs."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from calm_models.config import (
    BackboneConfig,
    BaselineConfig,
    ConfigError,
    OptimConfig,
    PipelineConfig,
    TrainConfig,
    config_to_dict,
    diff_configs,
    flatten_config,
    load_config,
    preset,
    save_config,
)


def _one_line(exc: BaseException) -> str:
    assert "\n" not in str(exc), str(exc)
    return str(exc)


def test_data_builds_nested_dataclasses_with_coercion():
    cfg = load_config(
        TrainConfig,
        data={
            "run": {"seed": 3, "compile": "true"},
            "baseline": {"hidden_size": 128, "num_heads": 4},
            "data": {"train_files": ["a.jsonl", "b.jsonl"], "cache_dir": None},
            "optim": {"lr": "1e-3", "betas": [0.8, 0.9], "weight_decay": 0},
            "stage": "ar",
        },
    )
    assert isinstance(cfg.baseline, BackboneConfig) and isinstance(cfg.optim, OptimConfig)
    assert cfg.baseline.hidden_size == 128 and cfg.run.seed == 3 and cfg.run.compile is True
    assert type(cfg.optim.weight_decay) is float and cfg.optim.weight_decay == 0.0  # int -> float
    assert cfg.optim.lr == pytest.approx(1e-3) and type(cfg.optim.lr) is float
    assert cfg.optim.betas == (0.8, 0.9) and isinstance(cfg.optim.betas, tuple)
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.schedule == TrainConfig().schedule  # untouched sections keep their defaults
    assert TrainConfig().stage == "autoencoder"  # the defaults are a valid configuration


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"baseline": {"hidden_size": "big"}}, ["baseline.hidden_size", "'big'", "Integer"]),
        ({"baseline": {"hidden_size": 1.5}}, ["baseline.hidden_size", "Integer"]),
        ({"run": {"compile": "maybe"}}, ["run.compile", "not a valid bool"]),
        ({"data": {"train_files": 5}}, ["data.train_files"]),
        ({"optim": {"lr": "fast"}}, ["optim.lr", "'fast'", "Float"]),
        ({"optim": 3}, ["OptimConfig"]),
        ({"schedule": {"kind": "exponential"}}, ["schedule: kind must be one of", "'cosine'"]),
        ({"calm": {"backbone": {"num_layers": 0}}}, ["calm.backbone: num_layers must be an int >= 1"]),
        ({"baseline": {"num_layers": 0}}, ["baseline: num_layers must be an int >= 1"]),
    ],
)
def test_type_and_value_errors_name_the_dotted_path(data, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, data={"stage": "ar", **data})
    message = _one_line(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_unknown_keys_give_path_and_suggestion():
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, data={"optim": {"lrr": 1.0}})
    message = _one_line(info.value)
    assert message.startswith("optim.lrr:") and "Did you mean: 'lr'?" in message
    with pytest.raises(ConfigError, match="Did you mean: 'optim'"):
        load_config(TrainConfig, overrides=["optimm.lr=3"])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_load_yaml_and_toml_files(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("baseline:\n  hidden_size: 96\noptim:\n  lr: 1.0e-4\n  betas: [0.9, 0.99]\n")
    toml = tmp_path / "run.toml"
    toml.write_text("[baseline]\nhidden_size = 96\n[optim]\nlr = 1e-4\nbetas = [0.9, 0.99]\n")
    a, b = (load_config(TrainConfig, file=f, overrides=["stage=ar"]) for f in (yml, toml))
    assert a == b and a.baseline.hidden_size == 96 and a.optim.betas == (0.9, 0.99)
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    assert load_config(TrainConfig, file=empty, overrides=["stage=ar"]) == load_config(
        TrainConfig, overrides=["stage=ar"]
    )


def test_file_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(TrainConfig, file=tmp_path / "missing.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  hidden_size: 4\n  layers: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, file=bad_yaml)
    assert "bad.yaml" in _one_line(info.value)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[model]\nhidden_size = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, file=bad_toml)
    assert "bad.toml" in _one_line(info.value) and "line 2" in str(info.value)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(TrainConfig, file=listy)
    other = tmp_path / "run.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match=r"unsupported config file type '.json'"):
        load_config(TrainConfig, file=other)


def test_overrides_parse_floats_lists_bools_strings_and_none():
    cfg = load_config(
        TrainConfig,
        preset=preset("tiny", "ar"),
        overrides=[
            "optim.lr=3e-4",
            "data.train_files=[a.jsonl,b.jsonl]",
            "run.compile=true",
            "run.out_dir=123",
            "data.cache_dir=null",
            "optim.betas=[0.9, 0.99]",
            "optim.weight_decay=0",
            "schedule.warmup_steps=1000",
            "optim.extra.relative_step=false",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"] and cfg.run.compile is True
    assert cfg.run.out_dir == "123"  # a string field keeps the text
    assert cfg.data.cache_dir is None and cfg.optim.betas == (0.9, 0.99)
    assert cfg.schedule.warmup_steps == 1000 and cfg.optim.extra == {"relative_step": False}


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("baseline.hiden_size=3", ["baseline.hiden_size", "Did you mean", "'hidden_size'"]),
        ("baseline.hidden_size", ["key.sub=value"]),
        ("baseline.hidden_size=abc", ["baseline.hidden_size", "Integer"]),
        ("run.compile=sometimes", ["run.compile", "not a valid bool"]),
        ("run.device=tpu", ["run: device must be one of"]),
        ("=3", ["key.sub=value"]),
    ],
)
def test_bad_overrides_raise_config_error_naming_them(override, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, overrides=["stage=ar", override])
    for fragment in fragments:
        assert fragment in _one_line(info.value), (fragment, str(info.value))


def test_precedence_defaults_preset_file_overrides(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("run:\n  seed: 7\nbaseline:\n  num_layers: 3\noptim:\n  lr: 0.002\n")
    cfg = load_config(TrainConfig, preset=preset("tiny", "ar"), file=file, overrides=["run.seed=9"])
    assert cfg.baseline.hidden_size == 256  # preset over default
    assert cfg.baseline.num_layers == 3  # file over preset (deep merge keeps hidden_size)
    assert cfg.optim.lr == 0.002  # file over preset
    assert cfg.run.seed == 9  # override over file
    assert cfg.optim.betas == (0.9, 0.95)  # defaults remain
    assert load_config(TrainConfig, overrides=["stage=ar"]) == TrainConfig(stage="ar")


def test_cross_field_checks_and_presets():
    assert load_config(TrainConfig, overrides=["stage=calm"]).autoencoder_path is None  # checked when training
    with pytest.raises(ConfigError, match=r"run.eval_stride=64 must be a multiple of K=4 and at most"):
        load_config(TrainConfig, preset=preset("tiny", "calm"), overrides=["run.eval_stride=64"])
    with pytest.raises(ConfigError, match="unknown optimizer 'adamx'"):
        load_config(TrainConfig, overrides=["stage=ar", "optim.name=adamx"])
    with pytest.raises(ConfigError, match="^prompt"):
        load_config(PipelineConfig, overrides=["prompt="])
    with pytest.raises(ConfigError, match="prompt must not be empty"):
        load_config(PipelineConfig, data={"prompt": ""})
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge", "ar")
    for name in ("tiny", "small", "m"):
        for stage in ("autoencoder", "calm", "ar"):
            assert preset(name, stage).stage == stage


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(
        TrainConfig,
        preset=preset("tiny", "ar"),
        overrides=[
            "run.out_dir=exp 1",
            "optim.lr=1e-10",
            "optim.betas=[0.85,0.975]",
            "data.train_files=[x.jsonl]",
            "run.compile=yes",
        ],
    )
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    assert load_config(TrainConfig, file=path) == cfg
    assert yaml.safe_load(path.read_text())["optim"]["betas"] == [0.85, 0.975]


@given(
    hidden=st.sampled_from([8, 64, 1024]),
    lr=st.floats(1e-12, 10.0, allow_nan=False),
    files=st.lists(st.text(min_size=1, max_size=8), max_size=3),
    out_dir=st.text(max_size=12),
)
def test_yaml_round_trip_is_exact(hidden, lr, files, out_dir):
    cfg = dataclasses.replace(
        TrainConfig(stage="ar"),
        baseline=BaselineConfig(hidden_size=hidden, num_heads=4),
        optim=OptimConfig(lr=lr),
        run=dataclasses.replace(TrainConfig().run, out_dir=out_dir),
    )
    cfg.data.train_files = files
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    assert load_config(TrainConfig, data=yaml.safe_load(text)) == cfg


def test_diff_configs_lists_differing_dotted_paths():
    a = TrainConfig(stage="ar")
    b = dataclasses.replace(a, baseline=BaselineConfig(hidden_size=128), optim=OptimConfig(lr=1e-3))
    assert diff_configs(a, b) == ["baseline.hidden_size", "optim.lr"]
    assert diff_configs(a, b, ["baseline"]) == ["baseline.hidden_size"]
    assert diff_configs(a, b, ["data"]) == [] and diff_configs(a, a) == []
    assert diff_configs(a, config_to_dict(a)) == []
    assert diff_configs({"x": (1, 2)}, {"x": [1, 2]}) == []
    assert diff_configs({"m": {"h": 1}}, {"m": {"h": 1, "l": 2}}) == []  # one side only
    assert flatten_config({"m": {}, "n": None}) == {"m": {}, "n": None}


def test_baseline_options_are_settable_and_old_keys_keep_loading():
    from calm_models.runs import build_model

    tied = build_model(load_config(TrainConfig, preset=preset("tiny", "ar")), 300)
    untied = build_model(
        load_config(TrainConfig, preset=preset("tiny", "ar"), overrides=["baseline.tie_embeddings=false"]), 300
    )
    assert tied.lm_head is None and untied.lm_head is not None
    old = {"stage": "ar", "baseline": {"hidden_size": 64, "num_heads": 2}}  # a config written before the option
    assert load_config(TrainConfig, data=old).baseline == BaselineConfig(hidden_size=64, num_heads=2)


def test_pipeline_config_holds_only_what_differs_from_the_preset(tmp_path):
    """Each stage is the preset's config of the stage with the section merged over it; a typo names its key at load
    time; an old config file whose sections repeat whole stage configs still loads."""
    cfg = load_config(PipelineConfig, overrides=["lm_stage.calm.head.type=flow", "ar_stage.optim.lr=1e-4"])
    assert cfg.lm_stage == {"calm": {"head": {"type": "flow"}}}
    lm = cfg.stage_config("calm", **{"run.out_dir": tmp_path / "calm", "autoencoder_path": tmp_path / "ae"})
    assert lm.calm.head.type == "flow" and lm.autoencoder_path == str(tmp_path / "ae")
    assert lm.calm.backbone == preset("tiny", "calm").calm.backbone and lm.run.out_dir == str(tmp_path / "calm")
    assert cfg.stage_config("ar").optim.lr == 1e-4 and cfg.stage_config("autoencoder") == preset("tiny", "autoencoder")
    small = load_config(PipelineConfig, data={"preset": "small"})
    assert small.stage_config("calm").data.block_len == preset("small", "calm").data.block_len == 128
    with pytest.raises(ConfigError, match=r"^lm_stage\.calm\.head\.typo: .*Did you mean: 'type'"):
        load_config(PipelineConfig, overrides=["lm_stage.calm.head.typo=flow"])
    with pytest.raises(ConfigError, match=r"^ae_stage\.run: steps must be an int >= 1"):
        load_config(PipelineConfig, overrides=["ae_stage.run.steps=0"])
    with pytest.raises(ConfigError, match="preset must be one of"):
        load_config(PipelineConfig, overrides=["preset=huge"])
    old = tmp_path / "old.yaml"  # the 0.1 layout: full stage configs, stage names included
    old.write_text(save_config(preset("tiny", "calm"), tmp_path / "lm.yaml").read_text().replace("\n", "\n  "))
    text = "lm_stage:\n  " + old.read_text()
    old.write_text(text)
    assert load_config(PipelineConfig, file=old).stage_config("calm") == preset("tiny", "calm")
