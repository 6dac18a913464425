"""Robustness report of a trained autoencoder: token accuracy against latent noise.

The key property of CALM's latent space (paper, section 2): decoding must survive Gaussian noise
added to the latent, because the language model's samples are never exact. This command encodes
a held-out file, adds ``N(0, sigma^2 I)`` to every posterior mean and reports the fraction of
tokens the decoder recovers, for each ``sigma``::

    python -m calm_models.robustness RUN_OR_CHECKPOINT --data FILE [--max-tokens N] [--out DIR]

It prints a Markdown table and writes ``robustness.json`` and ``robustness.png`` (accuracy
against sigma).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

__all__ = ["SIGMAS", "main"]

#: Noise levels of the report.
SIGMAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def _plot(table: dict[float, float], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sig = sorted(table)
    ax.plot(sig, [100 * table[s] for s in sig], marker="o")
    ax.set_xlabel("latent noise sigma")
    ax.set_ylabel("token accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m calm_models.robustness``; errors print one line, exit 2."""
    from calm_models.autoencoder import Autoencoder, robustness_table
    from calm_models.data import DataError, PackedBlocks, encode_documents, read_documents
    from calm_models.train import ModelLoadError, load_trained_model

    parser = argparse.ArgumentParser(prog="python -m calm_models.robustness",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="autoencoder run directory or checkpoint directory")
    parser.add_argument("--data", nargs="*", default=None,
                        help="held-out files (default: the run's validation split)")
    parser.add_argument("--max-tokens", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="output directory (default: the checkpoint)")
    args = parser.parse_args(argv)
    try:
        loaded = load_trained_model(args.checkpoint, device=args.device)
        if not isinstance(loaded.model, Autoencoder):
            raise ModelLoadError(f"{args.checkpoint} holds a {loaded.kind} model, not an autoencoder")
        k = loaded.model.chunk_size
        if args.data:
            tokens, _ = encode_documents(loaded.tokenizer, read_documents(args.data))
            blocks = PackedBlocks(tokens, 64 * k, k, pad_id=loaded.tokenizer.eos_id)
        else:
            blocks = loaded.valid_blocks()
    except (ModelLoadError, DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = min(len(blocks), max(1, args.max_tokens // blocks.block_len))
    device = next(loaded.model.parameters()).device
    batches = (
        blocks.get_batch(torch.arange(i, min(n, i + args.batch_size))).to(device)
        for i in range(0, n, args.batch_size)
    )
    gen = torch.Generator(device=device).manual_seed(args.seed)
    table = robustness_table(loaded.model, batches, sigmas=SIGMAS, generator=gen)
    source = ", ".join(args.data) if args.data else "validation split"
    print(f"Autoencoder {loaded.checkpoint} on {source} ({n * blocks.block_len} tokens)")
    print("| sigma | token accuracy |\n|---|---|")
    for sigma, acc in table.items():
        print(f"| {sigma:g} | {100 * acc:.2f}% |")
    out = Path(args.out) if args.out else loaded.checkpoint
    out.mkdir(parents=True, exist_ok=True)
    payload = {"checkpoint": str(loaded.checkpoint), "data": args.data,
               "tokens": n * blocks.block_len, "accuracy": {str(s): a for s, a in table.items()}}
    (out / "robustness.json").write_text(json.dumps(payload, indent=2))
    if _plot(table, out / "robustness.png", f"{Path(loaded.checkpoint).name}: {source}"):
        print(f"wrote {out / 'robustness.json'} and {out / 'robustness.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
