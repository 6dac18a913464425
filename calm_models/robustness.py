"""Robustness report of a trained autoencoder: token accuracy against latent noise.

The command encodes held-out text, adds ``N(0, sigma^2 I)`` to every posterior mean and reports the fraction of
tokens recovered per ``sigma`` (see :doc:`/training`) as a Markdown table, ``robustness.json`` and ``robustness.png``::

    python -m calm_models.robustness RUN [--data FILE ...] [--max-tokens N] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from calm_models._layers import atomic_write, to_json

#: Noise levels of the report.
SIGMAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m calm_models.robustness``; errors print one line and exit 2."""
    from calm_models.autoencoder import robustness_table
    from calm_models.data import DataError
    from calm_models.runs import RunError, load_run

    parser = argparse.ArgumentParser(prog="python -m calm_models.robustness", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="autoencoder (or CALM) run or checkpoint directory")
    parser.add_argument("--data", nargs="*", default=None, help="default: the validation split")
    parser.add_argument("--max-tokens", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="output directory (default: the checkpoint)")
    args = parser.parse_args(argv)
    try:
        if args.max_tokens < 1 or args.batch_size < 1:
            raise ValueError("--max-tokens and --batch-size must be positive")
        run = load_run(args.checkpoint, device=args.device)
        if run.config.stage == "ar":
            raise ValueError(f"{args.checkpoint} is a token-baseline run; it has no autoencoder")
        ae = run.model if run.config.stage == "autoencoder" else run.model.autoencoder
        blocks = run.blocks(args.data, 64 * ae.chunk_size)
    except (RunError, DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = min(len(blocks), max(1, args.max_tokens // blocks.block_len))
    tokens = n * blocks.block_len
    device = next(ae.parameters()).device
    batches = (blocks.get_batch(ids).to(device) for ids in torch.arange(n).split(args.batch_size))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    table = robustness_table(ae, batches, sigmas=SIGMAS, generator=gen)
    source = ", ".join(args.data) if args.data else "validation split"
    print(f"Autoencoder of {run.checkpoint} on {source} ({tokens} tokens)")
    print("| sigma | token accuracy |\n|---|---|")
    for sigma, acc in table.items():
        print(f"| {sigma:g} | {100 * acc:.2f}% |")
    out = Path(args.out) if args.out else run.checkpoint
    accuracy = {str(s): a for s, a in table.items()}
    record = {"checkpoint": str(run.checkpoint), "data": args.data, "tokens": tokens, "accuracy": accuracy}
    atomic_write(out / "robustness.json", to_json(record, indent=2).encode())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(list(table), [100 * a for a in table.values()], marker="o")
    ax.set(xlabel="latent noise sigma", ylabel="token accuracy (%)")
    ax.set_title(f"{run.checkpoint.name}: {source}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "robustness.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'robustness.json'} and {out / 'robustness.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
