"""Token-level Transformer baseline: token embeddings, the shared backbone, a softmax head.

It implements the same :class:`~calm_models.protocol.LanguageModel` methods as CALM, so both are
trained, scored on the BrierLM scale at the same positions, and sampled by the same tools.

Axis key: ``b`` rows, ``L`` tokens, ``P`` scored positions, ``n`` n-gram order, ``V``
vocabulary, ``h`` hidden size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from calm_models import flops
from calm_models._layers import check_int, check_tokens, masked_cross_entropy
from calm_models.backbone import Backbone, KVCache, padded_causal_mask
from calm_models.config import TokenLMConfig
from calm_models.protocol import Generation
from calm_models.sampling import check_positions, left_pad, sample_next, sample_with_logprob, target_logprobs


class BrierTerms(NamedTuple):
    r"""The two terms of the Brier-n estimate at each position, each ``(b, P, n)``.

    For the observed continuation ``y`` and one sampled ``x``,
    :math:`\widehat{\text{Brier}}_n = 2 P(y_{1:n}) - P(x_{1:n})` is unbiased, because
    :math:`\mathbb{E}_x[P(x_{1:n})] = \sum_x P(x_{1:n})^2` (the collision indicator of the
    two-sample estimator, Rao-Blackwellised; the accuracy term is exact).

    Attributes:
        target_prob: ``P(y_{1:n} | prefix)``.
        sample_prob: ``P(x_{1:n} | prefix)`` of the sampled continuation.
        samples: The sampled continuation ``x`` (int64).
    """

    target_prob: torch.Tensor
    sample_prob: torch.Tensor
    samples: torch.Tensor

    def estimates(self) -> torch.Tensor:
        """``2 * target_prob - sample_prob``, ``(b, P, n)``."""
        return 2 * self.target_prob - self.sample_prob


class TokenLM(nn.Module):
    """Token-level autoregressive Transformer with a softmax head (the CALM paper's baseline).

    Embeddings (and an untied output layer) are initialised ``N(0, init_std^2)``.

    Example:
        >>> from calm_models.config import BackboneConfig
        >>> cfg = TokenLMConfig(vocab_size=50, backbone=BackboneConfig(hidden_size=32,
        ...                     num_layers=2, num_heads=4, max_seq_len=64))
        >>> model = TokenLM(cfg)
        >>> tokens = torch.randint(50, (3, 16), generator=torch.Generator().manual_seed(0))
        >>> model.logits(tokens).shape, sorted(model(tokens))  # forward is the loss, as for every model
        (torch.Size([3, 16, 50]), ['accuracy', 'loss'])
        >>> model.brier_estimates(tokens).shape
        torch.Size([3, 12, 4])
        >>> [row.shape[0] for row in model.generate([tokens[0, :3], tokens[1, :5]], 4).tokens]
        [4, 4]
    """

    chunk_size = 1

    def __init__(self, cfg: TokenLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, v = cfg.backbone.hidden_size, cfg.vocab_size
        self.embed = nn.Embedding(v, h)
        self.backbone = Backbone(cfg.backbone)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(h, v, bias=False)
        nn.init.normal_(self.embed.weight, std=cfg.backbone.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=cfg.backbone.init_std)

    @property
    def vocab_size(self) -> int:
        """Token ids ``V``."""
        return self.cfg.vocab_size

    @property
    def max_tokens(self) -> int:
        """Longest context in tokens (the backbone's ``max_seq_len``)."""
        return self.cfg.backbone.max_seq_len

    def _tokens(self, tokens: object, name: str = "tokens") -> torch.Tensor:
        return check_tokens(tokens, name, vocab_size=self.cfg.vocab_size)

    def logits(
        self,
        tokens: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Next-token logits ``(b, t, V)`` of ids ``(b, t)``; ``logits[:, i]`` predicts token ``i + 1``."""
        x = self.embed(self._tokens(tokens))
        hidden = self.backbone(x, position_ids=position_ids, attn_mask=attn_mask, cache=cache)
        return F.linear(hidden, self.embed.weight if self.lm_head is None else self.lm_head.weight)

    def loss(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Mean next-token cross-entropy (fp32 softmax) and greedy accuracy over blocks ``(b, L)``.

        ``mask`` (bool ``(b, L)``, ``False`` on padding) leaves padded targets out.
        """
        tokens = self._tokens(tokens)
        if tokens.shape[1] < 2:
            raise ValueError(f"tokens must have L >= 2, got shape {tuple(tokens.shape)}")
        logits = self.logits(tokens[:, :-1]).float()  # (b, L-1, V)
        ce, accuracy = masked_cross_entropy(logits, tokens[:, 1:], None if mask is None else mask[:, 1:])
        return {"loss": ce, "accuracy": accuracy}

    forward = loss

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Analytic ``train`` and ``inference`` FLOPs per token (:func:`calm_models.flops.token_lm_flops`)."""
        return flops.token_lm_flops(self, seq_len)

    @torch.no_grad()
    def brier_terms(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        max_order: int = 4,
        generator: torch.Generator | None = None,
    ) -> BrierTerms:
        """Both terms of the per-position Brier estimates (see :class:`BrierTerms`).

        Position ``s`` (default: every ``s = 1 .. L - max_order``) scores the continuation
        ``tokens[:, s:s+max_order]`` of ``tokens[:, :s]``: ``target_prob`` from one teacher-forced
        pass, and a continuation of its own drawn by inverse-CDF sampling with uniforms ``(b, P, n)``
        drawn up front. A first pass fills a cache, then ``n - 1`` passes of width ``P`` append all
        rollouts, rollout ``i`` attending to its prefix and its own tokens only (the per-position
        loop it replaces is the naive formulation in ``benchmarks/_naive.py``).
        """
        tokens = self._tokens(tokens)
        (b, length), device, n = tokens.shape, tokens.device, max_order
        ends = check_positions(positions, length, n, 1, device) - 1  # (P,)
        p = ends.shape[0]
        work = torch.float64 if self.embed.weight.dtype == torch.float64 else torch.float32
        u = torch.rand(b, p, n, generator=generator, device=device, dtype=work)
        cache = self.backbone.new_cache(b, length + (n - 1) * p) if n > 1 else None
        logits = self.logits(tokens, cache=cache)  # (b, L, V)
        target_lp = target_logprobs(logits.to(work), tokens, ends + 1, n)  # teacher forcing
        prefix = torch.arange(length, device=device)[None, :] <= ends[:, None]  # (P, L)
        own = torch.eye(p, dtype=torch.bool, device=device).repeat(1, n - 1)  # (P, (n-1)P)
        mask = torch.cat([prefix, own], dim=1)[None, None]  # (1, 1, P, L + (n-1)P)
        logits, samples, sample_lp = logits[:, ends], [], []  # (b, P, V): each rollout's first step
        for j in range(n):
            x, lp = sample_with_logprob(logits, u[..., j])  # (b, P) each
            samples.append(x)
            sample_lp.append(lp)
            if j + 1 < n:
                logits = self.logits(
                    x, position_ids=(ends + j + 1)[None], attn_mask=mask[..., : length + (j + 1) * p], cache=cache
                )
        target_prob, sample_prob = target_lp.cumsum(-1).exp(), torch.stack(sample_lp, -1).cumsum(-1).exp()
        return BrierTerms(target_prob, sample_prob, torch.stack(samples, -1))

    def brier_estimates(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        max_order: int = 4,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Unbiased Brier-1..n estimates ``2 P(y_{1:n}) - P(x_{1:n})``, ``(b, P, n)`` (see :meth:`brier_terms`).

        Example:
            >>> from calm_models.config import BackboneConfig
            >>> model = TokenLM(TokenLMConfig(8, BackboneConfig(hidden_size=16, num_layers=1,
            ...                                                 num_heads=2, max_seq_len=32)))
            >>> tokens = torch.randint(8, (2, 10), generator=torch.Generator().manual_seed(0))
            >>> model.brier_estimates(tokens, torch.tensor([4, 6])).shape
            torch.Size([2, 2, 4])
        """
        return self.brier_terms(tokens, positions, max_order=max_order, generator=generator).estimates()

    @torch.no_grad()
    def generate(
        self,
        prompts: list[torch.Tensor] | torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        sampler: str = "exact",
        num_candidates: int = 200,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Generation:
        """Sample continuations of prompts of different lengths (left-padded and masked).

        Each step draws one uniform per row and samples by inverse CDF from
        ``softmax(logits / temperature)`` (the ``top_k`` largest logits if given); temperature 0
        is greedy. Tempering is exact, so ``sampler`` and ``num_candidates`` (for sampler-only
        models) are unused. Rows that emit ``eos_id`` stop and leave the batch. Returns a
        :class:`~calm_models.protocol.Generation`; raises ``ValueError`` on bad arguments or a prompt
        plus ``max_new_tokens`` over ``max_seq_len``.
        """
        device, vocab = self.embed.weight.device, self.cfg.vocab_size
        check_int(max_new_tokens, "max_new_tokens", 1)
        if not (isinstance(temperature, (int, float)) and 0 <= temperature < math.inf):
            raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= vocab):
            raise ValueError(f"top_k must be None or an int in [1, {vocab}], got {top_k!r}")
        if eos_id is not None and (not isinstance(eos_id, int) or not 0 <= eos_id < vocab):
            raise ValueError(f"eos_id must be None or an int in [0, {vocab}), got {eos_id!r}")
        tokens, valid = left_pad(prompts, 0, 1, vocab, device)  # (b, P) each
        b, prompt_len = tokens.shape
        total = prompt_len + max_new_tokens
        if total > self.cfg.backbone.max_seq_len:
            raise ValueError(
                f"the longest prompt ({prompt_len}) + max_new_tokens "
                f"({max_new_tokens}) exceeds max_seq_len ({self.cfg.backbone.max_seq_len})"
            )
        work = torch.float64 if self.embed.weight.dtype == torch.float64 else torch.float32
        padded = not bool(valid.all())
        key_valid = torch.cat([valid, valid.new_ones(b, max_new_tokens)], dim=1)  # (b, total)
        position_ids = (key_valid.long().cumsum(1) - 1).clamp(min=0)
        seq = torch.cat([tokens, tokens.new_zeros(b, max_new_tokens)], dim=1)
        num_generated = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)
        active = torch.arange(b, device=device)  # original indices of unfinished rows
        cache = self.backbone.new_cache(b, total) if use_cache else None
        for step in range(max_new_tokens):
            u = torch.rand(b, generator=generator, device=device, dtype=work)
            end = prompt_len + step
            start = end - 1 if cache is not None and step > 0 else 0
            mask = padded_causal_mask(key_valid[active, :end], end - start) if padded else None
            logits = self.logits(
                seq[active, start:end], position_ids=position_ids[active, start:end], attn_mask=mask, cache=cache
            )[:, -1]  # (a, V)
            nxt = sample_next(logits.to(work), temperature, top_k, u[active])
            seq[active, end] = nxt
            if eos_id is not None:
                done = nxt == eos_id
                num_generated[active[done]] = step + 1
                if bool(done.any()):
                    keep = (~done).nonzero().squeeze(1)
                    if keep.numel() == 0:
                        break
                    active = active[keep]
                    if cache is not None:
                        cache.select(keep)
        out = seq[:, prompt_len:]
        return Generation([out[i, :n] for i, n in enumerate(num_generated.tolist())], 0, step + 1)
