"""Generate text from a trained CALM or token-baseline run.

Command line::

    python -m calm_models.generate RUN --prompt "def main(" [--prompt ...] [--max-new-tokens 64]
        [--temperature 1.0] [--sampler exact|batch] [--num-candidates 200] [--seed 0]

Several ``--prompt`` values are generated as one batch. ``--sampler`` picks how CALM reaches a
temperature below 1 (see :meth:`calm_models.model.CALM.generate`; the command says how many draws
fell back untempered); the token baseline divides its logits.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from calm_models.protocol import Generation


def generate_text(
    run,
    prompts: list[str],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    sampler: str = "exact",
    num_candidates: int = 200,
    generator: torch.Generator | None = None,
) -> tuple[list[str], Generation]:
    """Continuations of text prompts with a :class:`~calm_models.runs.LoadedRun`.

    Returns:
        The decoded continuation of each prompt, and the model's
        :class:`~calm_models.protocol.Generation` (ids, fallback count).

    Raises:
        ValueError: An empty prompt or invalid sampling arguments.
    """
    tok = run.tokenizer
    device = next(run.model.parameters()).device
    ids = [torch.tensor(tok.encode(p), dtype=torch.long, device=device) for p in prompts]
    if any(t.numel() == 0 for t in ids):
        raise ValueError("every --prompt must contain at least one token")
    sampling = {"temperature": temperature, "sampler": sampler, "num_candidates": num_candidates}
    out = run.model.generate(ids, max_new_tokens, eos_id=tok.eos_id, generator=generator, **sampling)
    return [tok.decode(o) for o in out.tokens], out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m calm_models.generate``; errors print one line and exit 2."""
    from calm_models.runs import RunError, load_run

    parser = argparse.ArgumentParser(
        prog="python -m calm_models.generate", description="Generate text from a trained run."
    )
    parser.add_argument("checkpoint", help="run directory or checkpoint directory")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--sampler", default="exact", choices=("exact", "batch"))
    parser.add_argument("--num-candidates", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.checkpoint, device=args.device)
        if run.config.stage == "autoencoder":
            raise ValueError(f"{args.checkpoint} is an autoencoder run; it does not generate")
        device = next(run.model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(args.seed)
        start = time.perf_counter()
        with warnings.catch_warnings():  # the fallback count is printed below, once
            warnings.simplefilter("ignore")
            sampling = {k: getattr(args, k) for k in ("temperature", "sampler", "num_candidates")}
            texts, out = generate_text(run, args.prompt, args.max_new_tokens, generator=gen, **sampling)
        seconds = time.perf_counter() - start
    except (RunError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"{prompt}{text}\n" + "-" * 40)
    if out.fallbacks:
        print(
            f"warning: {out.fallbacks} of {out.steps * len(texts)} sampled steps could not be "
            f"tempered by the exact sampler at T={args.temperature:g} and are untempered draws; "
            "use --sampler batch for low temperatures",
            file=sys.stderr,
        )
    print(
        f"({len(texts)} x <= {args.max_new_tokens} tokens in {seconds:.2f} s from {run.checkpoint.name})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
