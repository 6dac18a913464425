"""A run you can trust (issue 14): no silent NaN, one run per directory, no lost steps, padding
never scored or trained on, interrupted pipelines stop, damaged checkpoints named, one-line errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calm_models import evaluate, train
from calm_models.baseline import TokenLM
from calm_models.config import BackboneConfig, TokenLMConfig
from calm_models.data import PackedBlocks
from calm_models.evaluate import evaluate_brier_lm
from calm_models.train import _run_lock, main
from tests.calm_models._runs import tiny_args

REPO = Path(__file__).resolve().parents[2]


def _last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def test_non_finite_loss_stops_the_run_and_keeps_finite_checkpoints(tmp_path, capsys):
    args = tiny_args(
        tmp_path,
        "run",
        **{
            "run.steps": 15,
            "optim.lr": 1e4,
            "optim.grad_clip": 0,
            "schedule.warmup_steps": 0,
            "run.save_every": 2,
            "run.keep_last": 2,
        },
    )
    assert main(args) == 2
    message = _last_error(capsys)
    assert "non-finite" in message and "stopped without saving" in message
    assert "step " in message and "max_nonfinite_skips" in message
    for name in _checkpoints(tmp_path / "run"):  # every kept checkpoint is finite
        weights = load_file(str(tmp_path / "run" / "checkpoints" / name / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), name


def test_skip_policy_counts_isolated_non_finite_steps(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = TokenLM.loss

    def spiky(self, tokens, mask=None, generator=None):
        out = original(self, tokens, mask, generator)
        calls["n"] += 1
        return {**out, "loss": out["loss"] * math.nan} if calls["n"] == 3 else out

    monkeypatch.setattr(TokenLM, "loss", spiky)
    assert main(tiny_args(tmp_path, "run", **{"run.steps": 5, "run.max_nonfinite_skips": 1})) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["nonfinite_skips"] for r in records if "nonfinite_skips" in r] == [1]


def test_a_run_directory_belongs_to_one_run(tmp_path, capsys):
    assert main(tiny_args(tmp_path, "run", **{"run.steps": 2})) == 0
    assert main(tiny_args(tmp_path, "run", **{"run.steps": 2})) == 2
    message = _last_error(capsys)
    assert "--resume" in message and "--overwrite" in message
    assert main([*tiny_args(tmp_path, "run", **{"run.steps": 3}), "--overwrite"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]  # nothing mixed in
    # a second training while the first holds the lock is refused
    with _run_lock(tmp_path / "run"):
        assert main([*tiny_args(tmp_path, "run", **{"run.steps": 4}), "--resume"]) == 2
        assert "in use by a running training" in _last_error(capsys)
    # the lock of a process that died is taken over, with a note
    (tmp_path / "run" / ".lock.owner").write_text("pid 999999 on elsewhere")
    assert main([*tiny_args(tmp_path, "run", **{"run.steps": 4}), "--resume"]) == 0
    assert "taking over the stale lock of pid 999999" in capsys.readouterr().err


def test_padding_is_neither_scored_nor_trained_on():
    torch.manual_seed(0)
    model = TokenLM(TokenLMConfig(20, BackboneConfig(hidden_size=16, num_layers=1, num_heads=2)))
    tokens = torch.arange(17) % 19  # 17 real tokens: one block of 32 holds 15 pads
    blocks = PackedBlocks(tokens.numpy(), 32, 4, pad_id=19)
    batch = blocks.batch([0])
    assert batch.mask.sum() == 17
    result = evaluate_brier_lm(model, [batch], stride=4)
    # positions 4, 8, 12: their 4-token targets end at 8, 12, 16 <= 17; 16 and later are padding
    assert result.count == 3
    assert evaluate_brier_lm(model, [batch.tokens], stride=4).count == 7  # unmasked: 7
    # the training loss ignores padded targets: changing the pads changes nothing
    other = batch.tokens.clone()
    other[~batch.mask] = 3
    loss = model.loss(batch.tokens, batch.mask)["loss"]
    assert torch.equal(loss, model.loss(other, batch.mask)["loss"])
    assert not torch.equal(loss, model.loss(other)["loss"])


def test_final_steps_are_saved_before_the_final_evaluation(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(train, "_validate", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        main(tiny_args(tmp_path, "run", **{"run.steps": 3}))
    assert _checkpoints(tmp_path / "run") == ["step_000003"]
    # a stride that leaves no evaluation position is a config error, before any training
    assert main(tiny_args(tmp_path, "other", **{"run.eval_stride": 16})) == 2
    assert "run.eval_stride=16" in _last_error(capsys)
    assert not (tmp_path / "other").exists()


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_pipeline_stops_with_the_signal_status(tmp_path, sig, code):
    config = tmp_path / "p.yaml"
    config.write_text(
        f"out_dir: {tmp_path / 'p'}\n"
        "ae_stage:\n  data: {vocab_size: 300, max_train_bytes: 40000, max_valid_bytes: 8000,"
        f" tokenizer_train_bytes: 40000, cache_dir: {tmp_path / 'cache'}}}\n"
        "  autoencoder: {hidden_size: 32, latent_size: 16, intermediate_size: 64}\n"
        "  run: {steps: 100000, batch_size: 4, eval_every: 0, progress: false, device: cpu}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "calm_models.train", "pipeline", "--config", str(config)],
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "p" / "autoencoder" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.stat().st_size == 0):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert (tmp_path / "p" / "autoencoder" / "checkpoints" / "latest").exists()
    assert not (tmp_path / "p" / "calm").exists()  # the CALM stage never started


def test_a_damaged_latest_checkpoint_is_named_and_skipped_on_request(tmp_path, capsys):
    args = tiny_args(tmp_path, "run", **{"run.steps": 4, "run.save_every": 2, "run.keep_last": 3})
    assert main(args) == 0
    latest = tmp_path / "run" / "checkpoints" / "step_000004"
    (latest / "meta.json").write_text("{garbage")
    assert main([*tiny_args(tmp_path, "run", **{"run.steps": 6}), "--resume"]) == 2
    message = _last_error(capsys)
    assert "step_000004" in message and "step_000002" in message and "--fallback" in message
    assert evaluate.main([str(tmp_path / "run")]) == 0
    assert "using step_000002 because step_000004 is unusable" in capsys.readouterr().err
    assert main([*tiny_args(tmp_path, "run", **{"run.steps": 6}), "--resume", "--fallback"]) == 0
    assert "resuming from step_000002" in capsys.readouterr().err


def test_resume_with_another_batch_size(tmp_path):
    assert main(tiny_args(tmp_path, "run", **{"run.steps": 2})) == 0
    resumed = tiny_args(tmp_path, "run", **{"run.steps": 4, "run.batch_size": 2, "run.grad_accum": 2})
    assert main([*resumed, "--resume"]) == 0


def test_configuration_and_environment_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    cases = [
        (tiny_args(tmp_path, "file"), "is a file, not a directory"),
        ([*tiny_args(tmp_path, "r1", "autoencoder"), "stage=ar"], "conflicts with the stage"),
        (tiny_args(tmp_path, "r2", "calm", autoencoder_path=tmp_path / "nope"), "autoencoder_path"),
    ]
    if not torch.cuda.is_available():
        cases.append((tiny_args(tmp_path, "r3", **{"run.device": "cuda"}), "CUDA is not available"))
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        assert fragment in _last_error(capsys), argv
    # a truncated token cache names the files to delete
    assert main(tiny_args(tmp_path, "ok", **{"run.steps": 1})) == 0
    cache = next((tmp_path / "cache").glob("tokens-*.bin"))
    cache.write_bytes(cache.read_bytes()[:10])
    assert main([*tiny_args(tmp_path, "ok", **{"run.steps": 1}), "--overwrite"]) == 2
    message = _last_error(capsys)
    assert "truncated or corrupt" in message and "delete" in message and cache.name in message
