"""The shared training loop: exact resume, DDP equivalence, checkpoints, interrupts, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calm_models.runs import load_run
from calm_models.train import main
from tests.calm_models._runs import tiny_args as _tiny_args

REPO = Path(__file__).resolve().parents[2]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def _train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") == "train"]


@pytest.mark.parametrize("stage", ["ar", "autoencoder", "calm"])
def test_resume_continues_exactly(tmp_path, stage):
    """20 steps straight == 10 steps + resume + 10 steps (weights bit-identical on CPU), with a
    validation (its own generator: the training's random stream is unchanged) before each save."""
    extra = {"run.eval_every": 5, "run.save_every": 5}
    if stage == "calm":
        assert main(_tiny_args(tmp_path, "ae", "autoencoder", **{"run.steps": 3})) == 0
        extra["autoencoder_path"] = tmp_path / "ae"
    assert main(_tiny_args(tmp_path, "straight", stage, **{"run.steps": 20}, **extra)) == 0
    assert main(_tiny_args(tmp_path, "split", stage, **{"run.steps": 10}, **extra)) == 0
    assert main([*_tiny_args(tmp_path, "split", stage, **{"run.steps": 20}, **extra), "--resume"]) == 0
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _train_losses(tmp_path / "straight")[-1] == _train_losses(tmp_path / "split")[-1]


def test_resume_with_mismatched_model_config_names_the_field(tmp_path, capsys):
    assert main(_tiny_args(tmp_path, "run", **{"run.steps": 2})) == 0
    code = main([*_tiny_args(tmp_path, "run", **{"run.steps": 4, "baseline.num_layers": 3}), "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "baseline.num_layers" in err and len(err.splitlines()) == 1


def test_corrupt_checkpoint_gives_one_line_error(tmp_path, capsys):
    from calm_models.evaluate import main as evaluate_main

    assert main(_tiny_args(tmp_path, "run", **{"run.steps": 2})) == 0
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    weights = tmp_path / "run" / "checkpoints" / latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert evaluate_main([str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.safetensors" in err and len(err.splitlines()) == 1


def test_bad_config_gives_one_line_error(tmp_path, capsys):
    assert main(_tiny_args(tmp_path, "run", **{"optim.lrr": 1.0})) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.lrr" in err and "lr" in err and len(err.splitlines()) == 1
    assert main(_tiny_args(tmp_path, "run", **{"data.train_files": "[/nonexistent.jsonl]"})) == 2
    assert "/nonexistent.jsonl" in capsys.readouterr().err


def test_vocabulary_comes_from_the_tokenizer(tmp_path, capsys):
    """``autoencoder.vocab_size`` is filled in from the tokenizer (saved in the run's config); a different value set
    by hand is a one-line error naming the key, not a silently replaced number."""
    assert main(_tiny_args(tmp_path, "ae", "autoencoder", **{"run.steps": 1})) == 0
    run = load_run(tmp_path / "ae")
    assert run.config.autoencoder.vocab_size == run.tokenizer.vocab_size == run.model.embedding.num_embeddings
    capsys.readouterr()
    assert main(_tiny_args(tmp_path, "bad", "autoencoder", **{"run.steps": 1, "autoencoder.vocab_size": 7})) == 2
    err = capsys.readouterr().err.strip()
    assert "autoencoder.vocab_size=7" in err and "tokenizer" in err and len(err.splitlines()) == 1


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_two_process_ddp_matches_one_process(tmp_path):
    """torchrun with 2 gloo processes and batch b == one process with batch 2b."""
    common = {"run.steps": 4, "run.device": "cpu"}
    one = _tiny_args(tmp_path, "one", **common, **{"run.batch_size": 8})
    assert main(one) == 0
    two = _tiny_args(tmp_path, "two", **common, **{"run.batch_size": 4})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "calm_models.train",
        *two,
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    l1, l2 = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
    assert len(l1) == len(l2) == 4
    assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_interrupt_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    args = _tiny_args(tmp_path, "run", **{"run.steps": 100000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "calm_models.train", *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.stat().st_size == 0):
        time.sleep(0.2)
    assert metrics.exists(), "training never started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]  # 128 + SIGINT, after a clean save
    assert "interrupted at step" in err
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    # and it resumes from there
    step = json.loads(
        (
            tmp_path
            / "run"
            / "checkpoints"
            / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
            / "meta.json"
        ).read_text()
    )["step"]
    assert step >= 1
    assert main([*_tiny_args(tmp_path, "run", **{"run.steps": step + 2}), "--resume"]) == 0


def test_validation_batches_spread_over_the_split_and_ranks():
    """In-training evaluation reads blocks from the whole validation split (its first files need
    not be typical) by the one rule of :func:`calm_models.evaluate.held_out_ids`, each block once,
    and ranks share the batches of one process."""
    import numpy as np

    from calm_models.data import PackedBlocks
    from calm_models.evaluate import held_out_batches, held_out_ids

    blocks = PackedBlocks(np.arange(1000 * 4 + 2), block_len=4, chunk_size=4)  # 1000 full blocks, a padded tail

    def ids(**kw):
        return torch.cat([b.tokens[:, 0] // 4 for b in held_out_batches(blocks, **kw)]).tolist()

    one = ids(max_blocks=32, batch_size=4, equal=True)
    assert one == held_out_ids(1000, 32).tolist() and one[0] == 0 and one[-1] == 999
    two = [ids(max_blocks=32, batch_size=4, rank=r, world_size=2, equal=True) for r in (0, 1)]
    assert sorted(two[0] + two[1]) == sorted(one) and len(two[0]) == len(two[1]) == 16
    small = PackedBlocks(np.arange(10 * 4), block_len=4, chunk_size=4)  # fewer blocks than asked: repeats
    got = torch.cat([b.tokens[:, 0] // 4 for b in held_out_batches(small, 16, 4, equal=True)]).tolist()
    assert got == [i % 10 for i in range(16)]
    assert ids() == list(range(1000))  # every whole block, in order; the padded tail left out
