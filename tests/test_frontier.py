"""End-to-end check of the performance-compute experiment (``benchmarks/frontier.py``).

The experiment itself runs for about an hour; here it runs on a few kilobytes of generated text
with a budget of a few optimiser steps, for two of its models, and the test checks that every
stage produces what the report needs and that a second call reuses the finished runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

_FRONTIER = Path(__file__).resolve().parents[1] / "benchmarks" / "frontier.py"


def _load_frontier():
    spec = importlib.util.spec_from_file_location("frontier", _FRONTIER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["frontier"] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


def _sentences(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    words = "the a cat dog sat ran on under mat tree and then it was very happy small big".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("frontier-data")
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": " ".join(_sentences(i, 40))}) for i in range(40)))
    wiki = root / "valid.raw"
    wiki.write_text("".join(f" = Article {i} = \n\n {' '.join(_sentences(100 + i, 30))} \n\n" for i in range(4)))
    stories = root / "stories.txt"
    stories.write_text("\n\n".join(" ".join(_sentences(200 + i, 10)) for i in range(10)))
    return {"train": train, "wiki": wiki, "stories": stories}


def test_frontier_runs_end_to_end_and_resumes(corpus, tmp_path, capsys):
    frontier = _load_frontier()
    out = tmp_path / "frontier"
    argv = [
        "--train",
        str(corpus["train"]),
        "--eval",
        str(corpus["wiki"]),
        str(corpus["stories"]),
        "--out",
        str(out),
        "--only",
        "ar-S",
        "calm-k4",
        "--budget",
        "1e9",
        "--ae-steps",
        "4",
        "--eval-blocks",
        "2",
        "--skip-throughput",
        "--quiet",
        "--device",
        "cpu",
    ]
    assert frontier.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"ar-S", "calm-k4"}
    assert set(results["autoencoders"]) == {"4"}
    for entry in results["runs"].values():
        assert len(entry["curve"]) >= 2  # intermediate and final checkpoints
        flops = [p["train_flops"] for p in entry["curve"]]
        assert flops == sorted(flops) and flops[0] > 0
        assert set(entry["final"]) == {"held-out training text", "valid.raw", "stories.txt"}
        for res in entry["final"].values():
            assert 0.0 <= res["brier_lm"] <= 100.0 and res["count"] > 0
        assert entry["flops"]["train"] > entry["flops"]["inference"] > 0
    calm = results["runs"]["calm-k4"]
    # the autoencoder's training is counted in CALM's compute from the first checkpoint on
    first = calm["curve"][0]
    assert first["train_flops"] == pytest.approx(
        first["tokens"] * calm["flops"]["train"] + calm["flops"]["ae_train_flops"]
    )
    assert calm["flops"]["ae_train_flops"] > 0
    assert not math.isnan(results["autoencoders"]["4"]["accuracy"]["valid.raw"]["0.0"])
    report = (out / "results.md").read_text()
    assert "| Transformer S |" in report and "| CALM K=4 |" in report
    for png in ("brier_vs_train_flops.png", "brier_vs_inference_flops.png"):
        assert (out / png).stat().st_size > 1000

    # a second call trains nothing and reports the same numbers
    stamps = {p: p.stat().st_mtime for p in out.glob("*/checkpoints/latest")}
    capsys.readouterr()
    assert frontier.main(argv) == 0
    assert {p: p.stat().st_mtime for p in out.glob("*/checkpoints/latest")} == stamps
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == results["runs"]


def test_frontier_missing_data_is_a_one_line_error(tmp_path, capsys):
    frontier = _load_frontier()
    assert frontier.main(["--train", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope.jsonl" in err and "\n" not in err
