"""BrierLM with standard errors of any :class:`~calm_models.protocol.LanguageModel`, and the
``evaluate`` command.

Every model is scored at the same token positions ``s = stride, 2*stride, ...`` of each block
(``s + max_order <= L``): position ``s`` predicts tokens ``s .. s+max_order-1`` from tokens
``0 .. s-1``. With the default ``stride = 8`` CALM with any ``K`` dividing 8 and every token
model see the same prefixes and targets. Positions whose target reaches into the padding of
the last block are not scored.

Command line::

    python -m calm_models.evaluate RUN [--data FILE ...] [--batches N] [--out FILE.json]
    python -m calm_models.evaluate --hf MODEL_DIR --data FILE [--dtype bf16] [--eos-token TOKEN]

``--hf`` scores any local Hugging Face causal LM (:mod:`calm_models.hf`) the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from calm_models._layers import atomic_write, to_json
from calm_models.protocol import LanguageModel
from likelihood_free.brier import BrierLM, BrierLMResult


def evaluation_starts(length: int, stride: int, max_order: int = 4) -> torch.Tensor:
    """Positions ``[stride, 2*stride, ...]`` with ``s + max_order <= length``, or a ``ValueError``.

    Example:
        >>> evaluation_starts(32, 8)
        tensor([ 8, 16, 24])
    """
    if stride < 1 or max_order < 1:
        raise ValueError(f"stride and max_order must be >= 1, got {stride}, {max_order}")
    if stride + max_order > length:
        raise ValueError(
            f"no evaluation position fits a block of {length} tokens with stride "
            f"{stride} and {max_order}-token targets (need length >= stride + max_order)"
        )
    return torch.arange(stride, length - max_order + 1, stride)


@torch.no_grad()
def evaluate_brier_lm(
    model: LanguageModel,
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    *,
    stride: int = 8,
    max_order: int = 4,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> BrierLMResult:
    """BrierLM with standard errors over all positions of all batches.

    Args:
        model: Any :class:`~calm_models.protocol.LanguageModel`.
        batches: Token blocks ``(b, L)``, or ``(tokens, mask)`` pairs whose bool mask marks real
            tokens (positions whose target holds padding are skipped).
        stride: Position spacing, a multiple of the model's ``chunk_size``.
        max_order: Longest n-gram (4 for BrierLM).
        generator: Optional generator for the model's samples.
        progress: Show a progress bar.

    Raises:
        ValueError: A stride that is not a multiple of the chunk size.
    """
    if stride % model.chunk_size:
        raise ValueError(f"stride={stride} must be a multiple of the model's chunk size {model.chunk_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    metric = BrierLM(max_order=max_order)
    try:
        for batch in tqdm(batches, desc="BrierLM", disable=not progress, leave=False):
            tokens, mask = (batch, None) if isinstance(batch, torch.Tensor) else batch
            tokens = tokens.to(device)
            starts = evaluation_starts(tokens.shape[1], stride, max_order).to(device)
            est = model.brier_estimates(tokens, starts, max_order=max_order, generator=generator)
            keep = None
            if mask is not None:
                window = starts[:, None] + torch.arange(max_order, device=device)  # (P, n)
                keep = mask.to(device)[:, window].all(-1)  # (b, P)
            metric.update(est, mask=keep)
    finally:
        model.train(was_training)
    return metric.compute()


def format_result(result: BrierLMResult, title: str = "") -> str:
    """A Markdown table of Brier-1..n and BrierLM with standard errors."""
    lines = ([title] if title else []) + ["| metric | value | std. error |", "|---|---|---|"]
    pairs = zip(result.brier, result.brier_se, strict=True)
    lines += [f"| Brier-{i} | {v:.4f} | {se:.4f} |" for i, (v, se) in enumerate(pairs, 1)]
    lines += [f"| BrierLM | {result.brier_lm:.3f} | {result.brier_lm_se:.3f} |", f"| positions | {result.count} | |"]
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m calm_models.evaluate``; errors print one line and exit 2."""
    from calm_models.data import DataError
    from calm_models.runs import RunError, load_run

    parser = argparse.ArgumentParser(prog="python -m calm_models.evaluate", description="BrierLM of a trained model.")
    parser.add_argument("checkpoint", nargs="?", help="run directory or checkpoint directory")
    parser.add_argument("--hf", default=None, help="a local Hugging Face causal LM folder instead")
    dtypes = ("auto", "bf16", "fp32")
    parser.add_argument("--dtype", default="auto", choices=dtypes, help="--hf: weights' dtype (auto: bf16 on GPUs)")
    parser.add_argument("--eos-token", default=None, help="--hf: EOS after each document")
    parser.add_argument("--data", nargs="*", default=None, help="text/JSONL/WikiText files")
    parser.add_argument("--batches", type=_non_negative, default=0, help="max batches (0: all)")
    parser.add_argument("--batch-size", type=_positive, default=8)
    parser.add_argument("--block-len", type=_non_negative, default=0, help="default: the run's block_len")
    parser.add_argument("--stride", type=_positive, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="JSON output (default: in the checkpoint)")
    args = parser.parse_args(argv)
    try:
        if args.out and not Path(args.out).resolve().parent.is_dir():
            raise ValueError(f"--out: the folder {Path(args.out).parent} does not exist")
        if (args.hf is None) == (args.checkpoint is None):
            raise ValueError("give a run directory or --hf MODEL_DIR (with --data), not both")
        if args.hf is not None:
            from calm_models.hf import load_hf_run

            if not args.data:
                raise ValueError("--hf needs --data FILE (a transformers model has no data split)")
            hf_options = {"device": args.device, "dtype": args.dtype, "eos_token": args.eos_token}
            run = load_hf_run(args.hf, block_len=args.block_len or 1024, **hf_options)
        else:
            run = load_run(args.checkpoint, device=args.device)
        if run.config.stage == "autoencoder":
            raise ValueError(f"{args.checkpoint} is an autoencoder run; use calm_models.robustness for it")
        model, k = run.model, run.model.chunk_size
        block_len = args.block_len or run.config.data.block_len
        if block_len % k or block_len > model.max_tokens:
            raise ValueError(f"--block-len must be a multiple of K={k}, at most {model.max_tokens}, got {block_len}")
        if args.stride % k:
            raise ValueError(f"--stride must be a multiple of the chunk size K={k}, got {args.stride}")
        evaluation_starts(block_len, args.stride)
        blocks = run.blocks(args.data, block_len)
    except (RunError, DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"scoring {run.checkpoint} (step {run.step})" + (f": {run.note}" if run.note else ""), file=sys.stderr)
    n, size = len(blocks), args.batch_size
    num_batches = -(-n // size)
    num_batches = min(num_batches, args.batches) if args.batches else num_batches
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    batches = (blocks.batch(torch.arange(i * size, min(n, (i + 1) * size))) for i in range(num_batches))
    result = evaluate_brier_lm(model, batches, stride=args.stride, generator=generator, progress=True)
    source = ", ".join(args.data) if args.data else "validation split"
    title = f"{'hf' if args.hf else run.config.stage} {run.checkpoint} (step {run.step}) on {source}"
    print(format_result(result, title))
    out = Path(args.out) if args.out else run.checkpoint / "brier_lm.json"
    record = {"checkpoint": str(run.checkpoint), "step": run.step, "data": args.data, "stride": args.stride}
    atomic_write(out, to_json({**record, "block_len": block_len, **result.to_dict()}, indent=2).encode())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
