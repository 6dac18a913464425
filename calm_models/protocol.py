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
