"""Generation throughput of trained runs (tokens/s), CALM beside the token baseline.

Usage::

    python benchmarks/throughput.py RUN [RUN ...] [--batch 1 32] [--tokens 64] [--json OUT]

For each run and batch size it generates ``--tokens`` tokens after a 32-token prompt taken from
the run's validation data, at T = 1 and at T = 0.5 (CALM: the exact sampler and the batch
approximation with N = 200; the token baseline: softmax(logits / T)), and reports tokens/s.
For CALM at T = 0.5 it also reports where a step's time goes (head samples + decoding vs the
candidate grouping of the batch approximation). Trained weights matter here: the exact
sampler's cost depends on how peaked the model's next-chunk distribution is.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from calm_models.runs import load_run
from likelihood_free.temperature import batched_temperature_sample


def _time(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure(run: str, batches: list[int], new_tokens: int, device: str = "auto") -> list[dict]:
    """Throughput rows for one run."""
    loaded = load_run(run, device=device)
    model = loaded.model
    dev = next(model.parameters()).device
    valid = loaded.blocks()
    rows = []
    # a sampler-only model (CALM) tempers with the exact sampler or the batch approximation;
    # a token model tempers its logits (the sampler argument does not apply)
    settings = [(1.0, "exact"), (0.5, "exact")] + ([(0.5, "batch")] if model.chunk_size > 1 else [])
    for batch in batches:
        prompts = valid.get_batch(torch.arange(batch) % len(valid))[:, :32].to(dev)
        for temperature, sampler in settings:
            gen = torch.Generator(device=dev).manual_seed(0)
            kwargs = {"temperature": temperature, "generator": gen, "sampler": sampler, "num_candidates": 200}
            seconds = _time(lambda kw=kwargs, p=prompts: model.generate(p, new_tokens, **kw))
            row = {
                "run": run,
                "kind": loaded.config.stage,
                "batch": batch,
                "temperature": temperature,
                "sampler": sampler,
                "tokens_per_s": batch * new_tokens / seconds,
            }
            if sampler == "batch":
                hidden = torch.randn(batch, model.config.backbone.hidden_size, device=dev)
                with torch.no_grad():
                    t0 = time.perf_counter()
                    cands = model.sample_chunks(hidden, 200, gen)
                    t1 = time.perf_counter()
                    batched_temperature_sample(cands, temperature, event_ndim=1, generator=gen)
                    t2 = time.perf_counter()
                row.update(step_head_decode_ms=1e3 * (t1 - t0), step_grouping_ms=1e3 * (t2 - t1))
            rows.append(row)
            print(json.dumps(row))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = [r for run in args.runs for r in measure(run, args.batch, args.tokens, args.device)]
    print("\n| run | batch | T | sampler | tokens/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['batch']} | {r['temperature']} | {r['sampler']} | {r['tokens_per_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
