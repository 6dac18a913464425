"""What every language model of the project implements, so that tools never ask which one it is.

:class:`~calm_models.model.CALM` and :class:`~calm_models.baseline.TokenLM` (and the wrapper of
a Hugging Face model) satisfy :class:`LanguageModel`: training, evaluation, generation and the
benchmarks call these methods and nothing else.

Axis key: ``b`` rows, ``L`` tokens per row, ``P`` scored positions, ``n`` n-gram order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from calm_models._layers import check_int, check_tokens, is_int_tensor


@dataclass
class Generation:
    """The output of ``generate``.

    Attributes:
        tokens: One 1-D tensor of generated ids per prompt (up to and including ``eos_id``).
        fallbacks: Draws that the exact temperature sampler could not temper within its budget
            and returned untempered (always 0 for models with logits); see
            :func:`likelihood_free.temperature_sample`.
        steps: Sampling steps taken (chunks for CALM, tokens for the baseline).
    """

    tokens: list[torch.Tensor] = field(default_factory=list)
    fallbacks: int = 0
    steps: int = 0


@runtime_checkable
class LanguageModel(Protocol):
    """A model that trains on token blocks, scores BrierLM and generates text.

    ``chunk_size`` is the number of tokens predicted per step (``K`` for CALM, 1 for a token
    model); BrierLM positions must be multiples of it. ``max_tokens`` is the longest context
    in tokens and ``vocab_size`` the number of token ids.
    """

    chunk_size: int
    max_tokens: int
    vocab_size: int

    def loss(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Training objective on blocks ``(b, L)``; ``mask`` marks real tokens (``False``: padding)."""

    def brier_estimates(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        *,
        max_order: int = 4,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Unbiased Brier-1..n estimates ``(b, P, n)``; position ``s`` predicts ``tokens[:, s:s+n]`` from its prefix."""

    def generate(
        self,
        prompts: list[torch.Tensor] | torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        sampler: str = "exact",
        num_candidates: int = 200,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Generation:
        """Continuations of a batch of prompts."""

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Analytic ``train`` and ``inference`` FLOPs per token (:mod:`calm_models.flops`)."""


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
