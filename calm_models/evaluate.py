"""BrierLM with standard errors of any :class:`~calm_models.protocol.LanguageModel`, and the
``evaluate`` command::

    python -m calm_models.evaluate RUN [--data FILE ...] [--batches N] [--out FILE.json]
    python -m calm_models.evaluate --hf MODEL_DIR --data FILE [--dtype bf16] [--eos-token TOKEN]

Every model is scored at the positions of :func:`evaluation_starts`; ``--hf`` scores any local
Hugging Face causal LM (:mod:`calm_models.hf`) the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from calm_models._layers import atomic_write, to_json
from calm_models.data import Batch, PackedBlocks
from calm_models.protocol import LanguageModel
from likelihood_free.brier import BrierLM, BrierLMResult

if TYPE_CHECKING:
    from calm_models.runs import LoadedRun


def evaluation_starts(length: int, stride: int, max_order: int = 4) -> torch.Tensor:
    """Positions ``[stride, 2*stride, ...]`` with ``s + max_order <= length``, or a ``ValueError``.

    Position ``s`` predicts tokens ``s .. s+max_order-1`` from tokens ``0 .. s-1``. With the default ``stride = 8``
    CALM with any ``K`` dividing 8 and every token model see the same prefixes and targets.

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


def held_out_ids(num_blocks: int, max_blocks: int | None = None) -> torch.Tensor:
    """The one rule for choosing held-out blocks: ``min(num_blocks, max_blocks)`` ids spread evenly over the split.

    Ids ``round(linspace(0, num_blocks - 1, n))``: all blocks in order when ``max_blocks`` is
    ``None`` or at least ``num_blocks``, else blocks from the whole split, first and last
    included. Not the first ``n`` blocks: the first held-out files of a corpus can be much harder
    than the rest (on the standard-library corpus the baseline scored a fifth of its BrierLM on
    them).

    Example:
        >>> held_out_ids(10, 4), held_out_ids(3)
        (tensor([0, 3, 6, 9]), tensor([0, 1, 2]))
    """
    if num_blocks < 1 or (max_blocks is not None and max_blocks < 1):
        raise ValueError(f"need at least one block to choose from and to choose, got {num_blocks}, {max_blocks}")
    n = num_blocks if max_blocks is None else min(num_blocks, max_blocks)
    return torch.linspace(0, num_blocks - 1, n, dtype=torch.float64).round().long()


def held_out_batches(
    blocks: PackedBlocks,
    max_blocks: int | None = None,
    batch_size: int = 16,
    *,
    rank: int = 0,
    world_size: int = 1,
    equal: bool = False,
) -> list[Batch]:
    """``(tokens, mask)`` batches of the blocks :func:`held_out_ids` chooses, this rank's share.

    Only whole blocks of text are chosen (the padded tail block is left out unless it is the only
    block). Batch ``j`` goes to rank ``j % world_size``. ``equal=True`` (the training loop's
    all-reduced validation) makes every rank get ``max_blocks / (world_size * batch_size)``
    full batches, repeating blocks when the split holds fewer.

    Example:
        >>> import numpy as np
        >>> from calm_models.data import PackedBlocks
        >>> blocks = PackedBlocks(np.arange(100), block_len=8, chunk_size=4)  # 12 full blocks and a padded one
        >>> [b.tokens[:, 0].tolist() for b in held_out_batches(blocks, max_blocks=4, batch_size=2)]
        [[0, 32], [56, 88]]
    """
    full = blocks.num_tokens // blocks.block_len
    ids = held_out_ids(full or len(blocks), max_blocks)
    if equal:
        if max_blocks is None or max_blocks % (world_size * batch_size):
            raise ValueError("equal=True needs max_blocks, a multiple of world_size * batch_size")
        ids = ids.repeat(-(-max_blocks // len(ids)))[:max_blocks]
    return [blocks.batch(part) for part in ids.split(batch_size)[rank::world_size]]


def score_run(
    run: str | Path | LoadedRun,
    batches: list[Batch] | list[torch.Tensor],
    *,
    stride: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> BrierLMResult:
    """BrierLM of a run's model on ``batches``, its samples drawn from a generator seeded with ``seed``.

    ``run`` is a run or checkpoint directory (loaded on ``device``) or a loaded run. Every
    comparison of the project (training, the pipeline, ``evaluate``, the benchmarks) scores the
    batches of :func:`held_out_batches` this way.
    """
    from calm_models.runs import LoadedRun, load_run

    model = (run if isinstance(run, LoadedRun) else load_run(run, device=device)).model
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return evaluate_brier_lm(model, batches, stride=stride, generator=generator)


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


def _at_least(minimum: int):
    """An argparse type: an int ``>= minimum``."""

    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return integer


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
    parser.add_argument("--batches", type=_at_least(0), default=0, help="max batches, spread over the data (0: all)")
    parser.add_argument("--batch-size", type=_at_least(1), default=8)
    parser.add_argument("--block-len", type=_at_least(0), default=0, help="default: the run's block_len")
    parser.add_argument("--stride", type=_at_least(1), default=8)
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
    batches = held_out_batches(blocks, args.batches * args.batch_size or None, args.batch_size)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
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
