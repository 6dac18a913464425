"""Generate text from a trained CALM or token-baseline run.

Command line::

    python -m calm_models.generate RUN_OR_CHECKPOINT --prompt "def main(" [--prompt ...]
        [--max-new-tokens 64] [--temperature 1.0] [--sampler exact|batch]
        [--num-candidates 200] [--seed 0] [--device auto]

Several ``--prompt`` values are generated as one batch (prompts of different lengths are
left-padded and masked). For CALM, a temperature below 1 is applied without logits through
:mod:`likelihood_free`'s samplers: ``exact`` (rejection with a Bernoulli factory, exact for any
``T`` in ``(0, 1]``) or ``batch`` (the batch approximation over ``--num-candidates`` head
samples). The token baseline divides its logits by ``T``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

__all__ = ["generate_text", "main"]


def generate_text(
    loaded,
    prompts: list[str],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    sampler: str = "exact",
    num_candidates: int = 200,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Continuations of text prompts with a loaded model.

    Args:
        loaded: A :class:`calm_models.train.LoadedModel` (CALM or token baseline).
        prompts: Prompt strings (non-empty after tokenisation).
        max_new_tokens: Tokens to generate per prompt.
        temperature: ``T`` in ``(0, 1]``.
        sampler: CALM only: ``"exact"`` or ``"batch"``.
        num_candidates: CALM batch sampler: head samples per step.
        generator: Optional generator.

    Returns:
        The generated continuation of each prompt (prompt not included).

    Raises:
        ValueError: On an empty prompt or invalid sampling arguments.
    """
    from calm_models.model import CALM

    tok = loaded.tokenizer
    device = next(loaded.model.parameters()).device
    ids = [torch.tensor(tok.encode(p), dtype=torch.long, device=device) for p in prompts]
    if any(t.numel() == 0 for t in ids):
        raise ValueError("every prompt must contain at least one token")
    if isinstance(loaded.model, CALM):
        out = loaded.model.generate(ids, max_new_tokens, temperature=temperature, sampler=sampler,
                                    num_candidates=num_candidates, eos_id=tok.eos_id,
                                    generator=generator)
    else:
        out = loaded.model.generate(ids, max_new_tokens, temperature=temperature,
                                    eos_id=tok.eos_id, generator=generator)
    return [tok.decode(o.tolist()) for o in out]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m calm_models.generate``; errors print one line, exit 2."""
    from calm_models.train import ModelLoadError, load_trained_model

    parser = argparse.ArgumentParser(prog="python -m calm_models.generate",
                                     description="Generate text from a trained run.")
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
        loaded = load_trained_model(args.checkpoint, device=args.device)
        if loaded.kind == "autoencoder":
            raise ModelLoadError(f"{args.checkpoint} is an autoencoder run; it does not generate")
        device = next(loaded.model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(args.seed)
        start = time.perf_counter()
        texts = generate_text(loaded, args.prompt, args.max_new_tokens,
                              temperature=args.temperature, sampler=args.sampler,
                              num_candidates=args.num_candidates, generator=gen)
        seconds = time.perf_counter() - start
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"{prompt}{text}")
        print("-" * 40)
    print(f"({len(texts)} x <= {args.max_new_tokens} tokens in {seconds:.2f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
