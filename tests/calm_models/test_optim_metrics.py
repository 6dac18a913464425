"""Tests of calm_models.optim (optimisers, schedules), calm_models.metrics and calm_models.plot."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import struct
import sys

import pytest
import torch
from torch import nn

from calm_models.config import ConfigError, load_config
from calm_models.metrics import MetricsLogger, read_metrics
from calm_models.optim import (
    OptimConfig,
    ScheduleConfig,
    build_optimizer,
    build_scheduler,
    decay_param_groups,
    lr_factor,
)
from calm_models.plot import main as plot_main
from calm_models.plot import plot_metrics

# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "step", "expected"),
    [
        # W = 4 warm-up steps, T = 14 total, r = 0.1: warm-up factor (s + 1) / W ...
        ("cosine", 0, 0.25),
        ("cosine", 1, 0.5),
        ("cosine", 3, 1.0),
        ("cosine", 4, 1.0),
        # ... then p = (s - 4) / 10: cosine r + (1 - r)(1 + cos(pi p)) / 2, linear 1 - (1 - r) p
        ("cosine", 6, 0.1 + 0.45 * (1 + math.cos(0.2 * math.pi))),
        ("cosine", 9, 0.55),
        ("cosine", 14, 0.1),
        ("cosine", 100, 0.1),
        ("linear", 6, 0.82),
        ("linear", 9, 0.55),
        ("linear", 14, 0.1),
        ("linear", 1000, 0.1),
        ("constant", 0, 0.25),
        ("constant", 4, 1.0),
        ("constant", 10**6, 1.0),
    ],
)
def test_lr_factor_values(kind, step, expected):
    cfg = ScheduleConfig(kind=kind, warmup_steps=4, min_lr_ratio=0.1)
    assert lr_factor(step, cfg, total_steps=14) == pytest.approx(expected, abs=1e-12)


def test_scheduler_drives_optimizer_learning_rates():
    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))]
    optimizer = build_optimizer(
        [{"params": params[:1]}, {"params": params[1:], "lr": 0.5, "weight_decay": 0.0}], OptimConfig(lr=1.0)
    )
    cfg = ScheduleConfig(kind="cosine", warmup_steps=3, min_lr_ratio=0.2)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    for step in range(14):
        factor = lr_factor(step, cfg, 10)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0 * factor)
        assert optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * factor)
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["weight_decay"] == 0.1  # default filled in for the group
    assert optimizer.param_groups[1]["weight_decay"] == 0.0  # explicit value kept


def test_no_warmup_starts_at_full_rate_and_schedule_errors():
    assert lr_factor(0, ScheduleConfig(kind="linear", warmup_steps=0), 10) == 1.0
    with pytest.raises(ValueError, match="total_steps must be a positive int for a cosine"):
        build_scheduler(
            torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), ScheduleConfig(kind="cosine", warmup_steps=0), None
        )
    with pytest.raises(ValueError, match=r"kind must be one of \('constant', 'cosine', 'linear'\)"):
        ScheduleConfig(kind="step")


# ---------------------------------------------------------------------------------------------
# optimisers
# ---------------------------------------------------------------------------------------------


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_decay_groups_split_matrices_from_biases_norms_and_embeddings():
    model = _Tied()
    groups = decay_param_groups(model, 0.05)
    by_name = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    assert by_name["decay"] == {id(model.proj.weight)}
    assert by_name["no_decay"] == {
        id(model.embed.weight),
        id(model.proj.bias),
        id(model.norm.weight),
        id(model.norm.bias),
    }
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    optimizer = build_optimizer(model, OptimConfig(lr=2e-3, betas=(0.8, 0.9), eps=1e-6))
    assert isinstance(optimizer, torch.optim.AdamW)
    decay = optimizer.param_groups[0]
    assert (decay["lr"], decay["betas"], decay["eps"], decay["weight_decay"]) == (2e-3, (0.8, 0.9), 1e-6, 0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 5  # tied once, frozen excluded


def test_builtin_optimizers_and_name_errors(monkeypatch):
    model = nn.Linear(3, 3)
    assert isinstance(build_optimizer(model, OptimConfig(name="Adam")), torch.optim.Adam)
    sgd = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, momentum=0.5))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamx'; use adamw, adam, sgd or a dotted class path"):
        OptimConfig(name="adamx")
    with pytest.raises(ValueError, match=r"optim.extra: AdamW takes no argument 'nesterov'"):
        build_optimizer(model, OptimConfig(extra={"nesterov": True}))
    assert build_optimizer(model, OptimConfig(extra={"amsgrad": True})).param_groups[0]["amsgrad"]
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), OptimConfig())
    monkeypatch.setitem(sys.modules, "torch_optimizer", None)  # simulate "not installed"
    with pytest.raises(ValueError, match=r"optimizer 'torch_optimizer.Lamb' cannot be imported"):
        build_optimizer(model, OptimConfig(name="torch_optimizer.Lamb"))
    with pytest.raises(ValueError, match=r"'torch.nn.Linear' is not a torch.optim.Optimizer"):
        build_optimizer(model, OptimConfig(name="torch.nn.Linear"))
    with pytest.raises(ValueError, match=r"'lamb' is now torch_optimizer.Lamb"):  # the old names say where they went
        OptimConfig(name="lamb")


def test_optim_config_through_the_config_system():
    cfg = load_config(OptimConfig, overrides=["betas=[0.8,0.9]", "lr=1e-3", "extra={amsgrad: true}"])
    assert cfg.betas == (0.8, 0.9) and cfg.lr == 1e-3 and cfg.extra == {"amsgrad": True}
    with pytest.raises(ConfigError, match=r"betas must lie in \[0, 1\), got \(0.9, 1.0\)"):
        load_config(OptimConfig, overrides=["betas=[0.9,1.0]"])


def test_optimizers_by_dotted_class_path():
    torch.manual_seed(0)
    paths = [("torch.optim.RAdam", {})]
    if importlib.util.find_spec("torch_optimizer") is not None:
        paths += [("torch_optimizer.Lamb", {}), ("torch_optimizer.Adafactor", {"relative_step": False})]
    for name, extra in paths:
        model = nn.Linear(4, 4)
        before = model.weight.detach().clone()
        optimizer = build_optimizer(model, OptimConfig(name=name, lr=1e-2, extra=extra))
        assert type(optimizer).__name__ == name.rsplit(".", 1)[1]
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        assert not torch.equal(model.weight, before)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def _csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_metrics_jsonl_and_csv_round_trip_with_new_keys(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log({"loss": torch.tensor(2.5), "lr": 1e-3}, step=1, split="train")
    log.log({"loss": 2.25, "lr": 2e-3}, step=2, split="train")
    # flushed: visible before close
    assert [r["loss"] for r in read_metrics(tmp_path)] == [2.5, 2.25]
    assert len(_csv_rows(tmp_path / "metrics.csv")) == 2
    log.log({"loss": 2.75, "brier_lm": 12.5, "brier1": 0.3}, step=2, split="valid")
    log.log({"step": 3, "split": "train", "loss": 2.0, "lr": 3e-3, "tokens_per_s": 1e5})
    log.close()
    records = read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (2, "valid"), (3, "train")]
    assert records[2]["brier_lm"] == 12.5 and "brier_lm" not in records[0]
    assert read_metrics(tmp_path, split="valid") == [records[2]]
    rows = _csv_rows(tmp_path / "metrics.csv")
    header = list(rows[0].keys())
    assert header == ["step", "split", "time", "loss", "lr", "brier_lm", "brier1", "tokens_per_s"]
    assert len(rows) == 4
    for row, record in zip(rows, records, strict=True):
        for key in header:
            expected = record.get(key)
            if expected is None:
                assert row[key] == ""
            elif isinstance(expected, str):
                assert row[key] == expected
            else:
                assert float(row[key]) == pytest.approx(expected)
    log.log({"loss": 1.0}, step=9)  # ignored after close
    assert len(read_metrics(tmp_path)) == 4


def test_metrics_repairs_partial_line_and_drops_records_after_resume(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for step in range(1, 6):
            log.log({"loss": 1.0 / step}, step=step, split="train")
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "split": "tr')  # the writer was killed mid-line
    assert len(read_metrics(tmp_path)) == 5
    with MetricsLogger(tmp_path, resume_step=3) as log:  # resumed from the step-3 checkpoint
        log.log({"loss": 0.3}, step=4, split="train")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert [r["step"] for r in _csv_rows(tmp_path / "metrics.csv")] == ["1", "2", "3", "4"]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: malformed JSON record"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="metrics file not found"):
        read_metrics(tmp_path / "nothing")


def test_metrics_disabled_writes_nothing_and_tensorboard_warning(tmp_path, monkeypatch):
    with MetricsLogger(tmp_path / "rank1", enabled=False) as log:
        log.log({"loss": 1.0}, step=1)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ValueError, match="one element"):
        MetricsLogger(tmp_path / "x").log({"loss": torch.ones(2)}, step=1)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        log = MetricsLogger(tmp_path / "tb", tensorboard=True)
    log.log({"loss": 1.0}, step=1)
    log.close()
    assert read_metrics(tmp_path / "tb")[0]["loss"] == 1.0


# ---------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_png_from_synthetic_metrics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    with MetricsLogger(tmp_path) as log:
        for step in range(1, 41):
            log.log({"loss": 5.0 / step, "lr": 1e-3, "tokens": 512 * step}, step=step, split="train")
            if step % 10 == 0:
                log.log({"loss": 5.5 / step, "brier_lm": step / 4, "accuracy": 0.9}, step=step, split="valid")
    out = plot_metrics(tmp_path, smooth=0.5)
    assert out == tmp_path / "metrics.png"
    width, height = _png_size(out)
    assert width == 1200 and height == 3 * 320  # 3 metrics x (step, tokens)
    assert plot_main([str(tmp_path), "--out", str(tmp_path / "o" / "c.png"), "--keys", "loss"]) == 0
    assert _png_size(tmp_path / "o" / "c.png") == (1200, 320)
    assert "wrote" in capsys.readouterr().out


def test_plot_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert plot_main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: run directory not found: {tmp_path / 'missing'}"
    assert plot_main([str(tmp_path)]) == 2
    assert "metrics file not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "lr": 0.1}) + "\n")
    assert plot_main([str(tmp_path)]) == 2
    assert "no plottable metric" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.1}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib is not installed: pip install matplotlib" in err
