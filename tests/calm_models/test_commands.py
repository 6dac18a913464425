"""The evaluate, generate and robustness commands on tiny trained runs: output and one-line errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from calm_models import evaluate, generate, robustness
from calm_models.runs import load_run
from calm_models.train import main as train_main
from tests.calm_models._runs import tiny_args


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An autoencoder, a CALM on it and a token baseline, two steps each."""
    tmp = tmp_path_factory.mktemp("runs")
    assert train_main(tiny_args(tmp, "ae", "autoencoder", **{"run.steps": 2})) == 0
    calm = tiny_args(tmp, "calm", "calm", **{"run.steps": 2, "autoencoder_path": tmp / "ae"})
    assert train_main(calm) == 0
    assert train_main(tiny_args(tmp, "ar", "ar", **{"run.steps": 2})) == 0
    return {name: tmp / name for name in ("ae", "calm", "ar")} | {"tmp": tmp}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def test_evaluate_scores_each_language_model_and_writes_json(runs, capsys, tmp_path):
    for name in ("calm", "ar"):
        out = tmp_path / f"{name}.json"
        assert evaluate.main([str(runs[name]), "--out", str(out)]) == 0
        text = capsys.readouterr()
        assert "| BrierLM |" in text.out and "(step 2)" in text.err
        payload = json.loads(out.read_text())  # valid JSON: an undefined SE is null, not NaN
        assert payload["step"] == 2 and payload["count"] > 0 and "brier4" in payload


def test_evaluate_bad_arguments_are_one_line_errors(runs, capsys, tmp_path):
    calm = str(runs["calm"])
    cases = [
        ([str(runs["ae"])], "autoencoder run"),
        ([calm, "--stride", "6"], "multiple of the chunk size K=4"),
        ([calm, "--block-len", "8192"], "at most 256, got 8192"),
        ([calm, "--block-len", "8"], "no evaluation position fits"),
        ([calm, "--out", str(tmp_path / "missing" / "x.json")], "does not exist"),
        (
            [calm, "--device", "cuda"] if not torch.cuda.is_available() else [calm, "--stride", "2"],
            "CUDA is not available" if not torch.cuda.is_available() else "multiple",
        ),
        ([str(tmp_path / "nope")], "no such run"),
    ]
    for argv, fragment in cases:
        assert evaluate.main(argv) == 2, argv
        assert fragment in _error_line(capsys), argv
    for argv in ([calm, "--batch-size", "0"], [calm, "--batches", "-1"], [calm, "--stride", "0"]):
        with pytest.raises(SystemExit) as info:  # argparse: usage and the error, exit 2
            evaluate.main(argv)
        assert info.value.code == 2
        assert "must be" in capsys.readouterr().err


def test_generate_command_for_calm_and_the_baseline(runs, capsys):
    for name, sampler in (("calm", "batch"), ("calm", "exact"), ("ar", "exact")):
        argv = [
            str(runs[name]),
            "--prompt",
            "the model",
            "--prompt",
            "a",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0.5",
            "--sampler",
            sampler,
            "--num-candidates",
            "8",
        ]
        assert generate.main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith("the model") and "\na" in out
    assert generate.main([str(runs["ae"]), "--prompt", "x"]) == 2
    assert "autoencoder run" in _error_line(capsys)
    assert generate.main([str(runs["calm"]), "--prompt", "x", "--temperature", "1.5"]) == 2
    assert "temperature" in _error_line(capsys)


def test_exact_sampler_fallback_is_reported(runs, capsys):
    """At a very low temperature an untrained CALM never repeats a chunk: every step falls back."""
    run = load_run(runs["calm"])
    prompt = torch.tensor(run.tokenizer.encode("the model"))
    with pytest.warns(UserWarning, match="fell back to untempered draws"):
        out = run.model.generate(
            [prompt], 8, temperature=0.01, max_rounds=2, generator=torch.Generator().manual_seed(0)
        )
    assert out.fallbacks == out.steps == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the command prints the count itself, once
        assert (
            generate.main([str(runs["calm"]), "--prompt", "the", "--temperature", "0.01", "--max-new-tokens", "4"]) == 0
        )
    assert "1 of 1 sampled steps could not be tempered" in capsys.readouterr().err
    # a temperature whose cost has no useful bound is refused up front, naming the way out
    with pytest.raises(ValueError, match="use sampler='batch'"):
        run.model.generate([prompt], 4, temperature=1e-4)
    assert generate.main([str(runs["calm"]), "--prompt", "the", "--temperature", "1e-6"]) == 2
    assert "needs 1000000 identical head draws" in _error_line(capsys)
    assert (
        generate.main(
            [
                str(runs["calm"]),
                "--prompt",
                "the",
                "--temperature",
                "1e-6",
                "--sampler",
                "batch",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )


def test_robustness_command(runs, capsys, tmp_path):
    for name in ("ae", "calm"):  # a CALM run holds its autoencoder
        assert robustness.main([str(runs[name]), "--out", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert "| 0.3 |" in out and "token accuracy" in out
        table = json.loads((tmp_path / name / "robustness.json").read_text())["accuracy"]
        assert set(table) == {"0.0", "0.1", "0.2", "0.3", "0.5", "0.7", "1.0"}
        assert all(0.0 <= v <= 1.0 for v in table.values())
    assert robustness.main([str(runs["ar"])]) == 2
    assert "error" in capsys.readouterr().err
