"""Helpers the models share to sample and to score.

Axis key: ``b`` rows, ``L`` tokens, ``P`` positions, ``n`` n-gram order, ``V`` vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from calm_models._layers import check_int, check_tokens, is_int_tensor


def check_positions(
    positions: object, length: int, max_order: int, multiple_of: int = 1, device: torch.device | None = None
) -> torch.Tensor:
    """BrierLM positions as a 1-D int64 tensor, or a ``ValueError`` naming what fits.

    A position ``s`` needs ``multiple_of <= s``, ``s % multiple_of == 0`` and
    ``s + max_order <= length``; ``None`` stands for all of them.

    Example:
        >>> check_positions(torch.tensor([4, 8]), length=12, max_order=4, multiple_of=4)
        tensor([4, 8])
    """
    check_int(max_order, "max_order", 1)
    if positions is None:
        positions = torch.arange(multiple_of, length - max_order + 1, multiple_of, device=device)
    if not is_int_tensor(positions) or positions.dim() != 1 or positions.numel() == 0:
        raise ValueError(f"positions must be a non-empty 1-D integer tensor, got {positions!r}")
    bad = (positions < multiple_of) | (positions % multiple_of != 0) | (positions + max_order > length)
    if bool(bad.any()):
        raise ValueError(
            f"positions must be multiples of {multiple_of} in [{multiple_of}, {length - max_order}] "
            f"(a {max_order}-token target inside {length} tokens), got {positions[bad][:5].tolist()}"
        )
    return positions.to(device=device, dtype=torch.long)


def target_logprobs(logits: torch.Tensor, tokens: torch.Tensor, starts: torch.Tensor, n: int) -> torch.Tensor:
    """``log P(tokens[:, s+i] | tokens[:, :s+i])``, ``(b, P, n)``, from teacher-forced logits ``(b, L, V)``."""
    pred = logits[:, :-1]  # pred[:, i] predicts tokens[:, i + 1]
    lp = pred.gather(-1, tokens[:, 1:, None]).squeeze(-1) - pred.logsumexp(-1)
    return lp[:, starts[:, None] - 1 + torch.arange(n, device=tokens.device)]


def left_pad(
    prompts: list[torch.Tensor] | torch.Tensor, pad_id: int, multiple_of: int, vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D prompts to a common length, a multiple of ``multiple_of``: ``(tokens, real)``.

    ``tokens`` are int64 ids ``(b, P)`` on ``device``, ``real`` the bool mask of the real tokens.

    Example:
        >>> ids, real = left_pad([torch.tensor([5]), torch.tensor([1, 2, 3])], 0, 2, 10, "cpu")
        >>> ids.tolist(), real.int().tolist()
        ([[0, 0, 0, 5], [0, 1, 2, 3]], [[0, 0, 0, 1], [0, 1, 1, 1]])
    """
    rows = prompts.unbind(0) if isinstance(prompts, torch.Tensor) and prompts.dim() == 2 else prompts
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError("prompts must be a non-empty list of 1-D token tensors or a (b, t) tensor")
    rows = [check_tokens(r, f"prompts[{i}]", vocab_size=vocab_size, ndim=1).to(device) for i, r in enumerate(rows)]
    if any(r.numel() == 0 for r in rows):
        raise ValueError("every prompt must hold at least one token")
    width = -(-max(r.numel() for r in rows) // multiple_of) * multiple_of
    tokens = torch.stack([F.pad(r, (width - r.numel(), 0), value=pad_id) for r in rows])
    real = torch.arange(width, device=device) >= width - torch.tensor([r.numel() for r in rows], device=device)[:, None]
    return tokens, real


def cut_at_eos(row: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """``row`` up to and including its first ``eos_id``."""
    if eos_id is None:
        return row
    hits = (row == eos_id).nonzero()
    return row if hits.numel() == 0 else row[: int(hits[0, 0]) + 1]


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample ``x`` with ``P(x = k) ∝ probs[..., k]`` from uniforms ``u`` in ``[0, 1)``: ``(..., V), (...) -> (...)``.

    :func:`torch.searchsorted` of ``u * total`` (kept below the total) in the cumulative sums;
    a zero-probability token never holds the first cumulative sum above a target, so it is never chosen.

    Example:
        >>> inverse_cdf(torch.tensor([[0.5, 0.0, 0.5]]).expand(3, 3), torch.tensor([0.0, 0.49, 0.99]))
        tensor([0, 0, 2])
    """
    cdf = probs.cumsum(-1)  # (..., V), non-decreasing
    total = cdf[..., -1:]
    target = torch.minimum(u[..., None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[..., 0]


def sample_with_logprob(logits: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from ``softmax(logits)`` (in ``u.dtype``) and return ``(x, log P(x))``."""
    probs = logits.to(u.dtype).softmax(-1)
    x = inverse_cdf(probs, u)
    return x, probs.gather(-1, x[..., None]).squeeze(-1).log()


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits (a, V)`` with uniforms ``u (a,)``."""
    if top_k is not None:
        logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[:, -1:], -math.inf)
    if temperature == 0:
        return logits.argmax(-1)
    return inverse_cdf((logits / temperature).softmax(-1), u)
