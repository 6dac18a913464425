"""BrierLM evaluation of CALM and of the token baseline, and the ``evaluate`` command.

Both model kinds are scored on the same token positions: ``s = stride, 2*stride, ...`` with
``s + max_order <= L`` inside every evaluation block, where position ``s`` means "predict tokens
``s .. s+max_order-1`` from tokens ``0 .. s-1``". With the default ``stride = 8`` every CALM with
``K`` dividing 8 and every token model see exactly the same prefixes and targets.

Command line::

    python -m calm_models.evaluate CHECKPOINT [--data FILE ...] [--batches N] [--out FILE.json]

``CHECKPOINT`` is a run directory (its latest checkpoint is used) or a checkpoint directory.
Without ``--data`` the validation split of the run's own data configuration is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from calm_models.baseline import TokenLM
from calm_models.model import CALM
from likelihood_free.brier import BrierLM, BrierLMResult

__all__ = ["evaluation_starts", "evaluate_brier_lm", "format_result", "main"]


def evaluation_starts(length: int, stride: int, max_order: int = 4) -> torch.Tensor:
    """Token indices ``s`` scored in a block of ``length`` tokens.

    Args:
        length: Block length ``L``.
        stride: Spacing of the positions (a multiple of every CALM chunk size compared).
        max_order: Target length.

    Returns:
        ``(P,)`` int64 tensor ``[stride, 2*stride, ...]`` with ``s + max_order <= L``.

    Raises:
        ValueError: If no position fits.

    Example:
        >>> evaluation_starts(32, 8)
        tensor([ 8, 16, 24])
    """
    if stride < 1 or max_order < 1:
        raise ValueError(f"stride and max_order must be >= 1, got {stride}, {max_order}")
    starts = torch.arange(stride, length - max_order + 1, stride)
    if starts.numel() == 0:
        raise ValueError(
            f"no evaluation position fits a block of {length} tokens with stride {stride} and "
            f"{max_order}-token targets (need length >= stride + max_order)"
        )
    return starts


@torch.no_grad()
def evaluate_brier_lm(
    model: CALM | TokenLM,
    batches: Iterable[torch.Tensor],
    *,
    stride: int = 8,
    max_order: int = 4,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> BrierLMResult:
    """BrierLM with standard errors of a CALM or token model on token blocks.

    Args:
        model: A :class:`~calm_models.model.CALM` or :class:`~calm_models.baseline.TokenLM`.
        batches: Token blocks ``(b, L)`` (on any device; moved to the model's).
        stride: Position spacing (see :func:`evaluation_starts`); must be a multiple of a CALM
            model's chunk size.
        max_order: Longest n-gram (4 for BrierLM).
        generator: Optional generator for the model's samples.
        progress: Show a progress bar.

    Returns:
        The :class:`~likelihood_free.brier.BrierLMResult` over all positions of all batches.

    Raises:
        ValueError: If ``stride`` is not a multiple of the CALM chunk size.
    """
    if isinstance(model, CALM) and stride % model.chunk_size:
        raise ValueError(
            f"stride={stride} must be a multiple of the CALM chunk size {model.chunk_size}"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    metric = BrierLM(max_order=max_order)
    try:
        for tokens in tqdm(batches, desc="BrierLM", disable=not progress, leave=False):
            tokens = tokens.to(device)
            starts = evaluation_starts(tokens.shape[1], stride, max_order).to(device)
            if isinstance(model, CALM):
                est, _ = model.brier_estimates(
                    tokens, max_order=max_order, generator=generator
                )
                est = est[:, (starts // model.chunk_size) - 1]  # calm starts are K, 2K, ...
            else:
                est = model.brier_estimates(
                    tokens, max_order=max_order, positions=starts - 1, generator=generator
                )
            metric.update(est)
    finally:
        model.train(was_training)
    return metric.compute()


def format_result(result: BrierLMResult, title: str = "") -> str:
    """A small Markdown table of Brier-1..n and BrierLM with standard errors."""
    lines = [title] if title else []
    lines.append("| metric | value | std. error |")
    lines.append("|---|---|---|")
    for i, (v, se) in enumerate(zip(result.brier, result.brier_se, strict=True), start=1):
        lines.append(f"| Brier-{i} | {v:.4f} | {se:.4f} |")
    lines.append(f"| BrierLM | {result.brier_lm:.3f} | {result.brier_lm_se:.3f} |")
    lines.append(f"| positions | {result.count} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m calm_models.evaluate``."""
    from calm_models.data import DataError, PackedBlocks, read_documents
    from calm_models.train import ModelLoadError, load_trained_model

    parser = argparse.ArgumentParser(
        prog="python -m calm_models.evaluate", description="BrierLM of a trained model."
    )
    parser.add_argument("checkpoint", help="run directory or checkpoint directory")
    parser.add_argument("--data", nargs="*", default=None, help="text/JSONL/WikiText files")
    parser.add_argument("--batches", type=int, default=0, help="max batches (0 = all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-len", type=int, default=0, help="default: the run's block_len")
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="JSON output (default: next to checkpoint)")
    args = parser.parse_args(argv)
    try:
        loaded = load_trained_model(args.checkpoint, device=args.device)
        model, cfg, tokenizer = loaded.model, loaded.config, loaded.tokenizer
        block_len = args.block_len or cfg.data.block_len
        if args.data:
            from calm_models.data import encode_documents

            tokens, _ = encode_documents(tokenizer, read_documents(args.data))
            blocks = PackedBlocks(tokens, block_len, getattr(model, "chunk_size", 1))
        else:
            blocks = loaded.valid_blocks(block_len)
    except (ModelLoadError, DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = len(blocks)
    num_batches = -(-n // args.batch_size)
    if args.batches:
        num_batches = min(num_batches, args.batches)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    batches = (
        blocks.get_batch(torch.arange(i * args.batch_size, min(n, (i + 1) * args.batch_size)))
        for i in range(num_batches)
    )
    result = evaluate_brier_lm(
        model, batches, stride=args.stride, generator=generator, progress=True
    )
    title = f"{loaded.kind} {args.checkpoint} on {', '.join(args.data) if args.data else 'validation split'}"
    print(format_result(result, title))
    out = Path(args.out) if args.out else loaded.checkpoint / "brier_lm.json"
    payload = {"checkpoint": str(loaded.checkpoint), "data": args.data, "stride": args.stride,
               "block_len": block_len, **result.to_dict()}
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
