"""End-to-end check of the performance-compute experiment (``benchmarks/frontier.py``).

The experiment itself runs for about an hour per corpus; here it runs on a small sample of the
synthetic language with a budget of a few optimiser steps, for two of its models, and the test
checks that every budget is trained and scored, that a second call reuses the finished runs, and
that the report renders its tables and plots.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

_FRONTIER = Path(__file__).resolve().parents[1] / "benchmarks" / "frontier.py"


def _load_frontier():
    spec = importlib.util.spec_from_file_location("frontier", _FRONTIER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["frontier"] = module
    spec.loader.exec_module(module)
    return module


def test_frontier_runs_end_to_end_resumes_and_reports(tmp_path, capsys):
    frontier = _load_frontier()
    out = tmp_path / "frontier"
    argv = ["--corpus", "markov1", "--out", str(out), "--only", "ar-S", "calm-k4", "--budget", "4e10", "2e10"]
    argv += ["--ae-scale", "0.01", "--eval-blocks", "4", "--train-tokens", "30000", "--valid-tokens", "3000"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert frontier.main(argv) == 0
    results = json.loads((out / "markov1" / "results.json").read_text())
    assert set(results["runs"]) == {"ar-S", "calm-k4"} and set(results["autoencoders"]) == {"4"}
    assert results["oracle"]["brier_lm"] > 10
    for entry in results["runs"].values():
        assert [p["budget"] for p in entry["curve"]] == results["budgets"]
        flops = [p["train_flops"] for p in entry["curve"]]
        assert flops == sorted(flops) and flops[0] > 0
        assert all("brier_lm" in p and p["count"] > 0 for p in entry["curve"])
        assert all(p["expected"]["brier1_se"] > 0 for p in entry["curve"])  # exact-P estimate
    assert results["budgets"] == [2e10, 4e10]  # several budgets: taken as given, sorted
    calm = results["runs"]["calm-k4"]["curve"][0]
    assert calm["train_flops"] > results["autoencoders"]["4"]["train_flops"]  # the AE is counted
    valid = frontier.load_run(out / "markov1" / "ar-S").blocks()  # held-out blocks: spread, first and last
    full = valid.num_tokens // valid.block_len
    blocks = frontier.held_out_blocks(out / "markov1" / "ar-S", 4)
    assert full > 8 and torch.equal(blocks[0], valid.batch(torch.tensor([0])).tokens[0])
    assert torch.equal(blocks[-1], valid.batch(torch.tensor([full - 1])).tokens[0])
    mtime = (out / "markov1" / "ar-S" / "frontier.json").stat().st_mtime_ns
    assert frontier.main(argv) == 0  # everything finished: nothing is trained again
    assert (out / "markov1" / "ar-S" / "frontier.json").stat().st_mtime_ns == mtime
    docs = tmp_path / "docs"
    assert frontier.main(["--report", "--out", str(out), "--docs", str(docs)]) == 0
    text = (docs / "frontier.md").read_text()
    assert "Transformer S" in text and "CALM K=4" in text and "oracle BrierLM" in text
    assert (docs / "brier_vs_train_flops.png").stat().st_size > 0
    assert (docs / "brier_vs_inference_flops.png").stat().st_size > 0
