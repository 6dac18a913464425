"""Token-level Transformer baseline: token embeddings, the shared :class:`Backbone`, a softmax head.

Besides training (:meth:`TokenLM.loss`) and generation (:meth:`TokenLM.generate`), the model
produces per-position BrierLM estimates (:meth:`TokenLM.brier_estimates`) in the same layout as
CALM, so both are scored by :class:`likelihood_free.brier.BrierLM` on the same positions.

Axis key:
    b  batch rows
    L  sequence length;  t  positions of one call
    p  evaluated (prefix-end) positions of the BrierLM estimate
    n  n-gram order, ``1..max_order``
    V  vocabulary size;  h  hidden size
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from calm_models.backbone import Backbone, BackboneConfig, KVCache, backbone_flops_per_token

__all__ = ["BrierTerms", "TokenLM", "TokenLMConfig"]

_BRIER_METHODS = ("batched", "loop")
_FLOPS_MODES = ("train", "inference")


@dataclass
class TokenLMConfig:
    """Configuration of :class:`TokenLM`.

    Args:
        vocab_size: Number of token ids ``V``.
        backbone: Configuration of the shared decoder.
        tie_embeddings: Whether the output layer reuses the input embedding matrix.

    Example:
        >>> cfg = TokenLMConfig(vocab_size=100, backbone=BackboneConfig(hidden_size=32))
        >>> cfg.validate().tie_embeddings
        True
    """

    vocab_size: int
    backbone: BackboneConfig
    tie_embeddings: bool = True

    def validate(self) -> TokenLMConfig:
        """Check the fields (and the backbone's); return ``self``.

        Returns:
            This config.

        Raises:
            ValueError: If ``vocab_size < 2`` or the backbone config is invalid.
            TypeError: If ``backbone`` is not a :class:`BackboneConfig`.
        """
        v = self.vocab_size
        if not isinstance(v, int) or isinstance(v, bool) or v < 2:
            raise ValueError(f"TokenLMConfig: vocab_size must be an int >= 2, got {v!r}")
        if not isinstance(self.backbone, BackboneConfig):
            raise TypeError(
                f"TokenLMConfig: backbone must be a BackboneConfig, got {type(self.backbone).__name__}"
            )
        self.backbone.validate()
        return self


class BrierTerms(NamedTuple):
    r"""The two terms of the Brier-n estimate at each evaluated position.

    The collision term is Rao-Blackwellised (the exact probability of one sampled continuation
    replaces the indicator ``1{x1 = x2}``); the accuracy term is exact.

    For the observed continuation ``y`` and one continuation ``x`` sampled from the model,

    .. math::
        \widehat{\text{Brier}}_n = 2 P(y_{1:n}) - P(x_{1:n}),\qquad
        \mathbb{E}_x[P(x_{1:n})] = \sum_x P(x_{1:n})^2,

    an unbiased estimate of ``Brier_n = 2 P(y_{1:n}) - sum_x P(x_{1:n})^2`` (the higher-is-better
    Brier score of the n-gram distribution; the ``1 - ...`` constant is dropped as in CALM).

    Attributes:
        target_prob: ``P(y_{1:n} | prefix)`` for ``n = 1..max_order``, shape ``(b, p, n)``.
        sample_prob: ``P(x_{1:n} | prefix)`` of the sampled continuation, ``(b, p, n)``.
        samples: The sampled continuation ``x``, long ``(b, p, n)``.
    """

    target_prob: torch.Tensor
    sample_prob: torch.Tensor
    samples: torch.Tensor

    def estimates(self) -> torch.Tensor:
        """Per-position Brier-1..n estimates ``2 * target_prob - sample_prob``, ``(b, p, n)``."""
        return 2 * self.target_prob - self.sample_prob


class TokenLM(nn.Module):
    """Token-level autoregressive Transformer with a softmax head (the CALM paper's baseline).

    Args:
        cfg: Configuration (validated here). Embeddings (and an untied output layer) are
            initialised ``N(0, backbone.init_std^2)``.

    Raises:
        ValueError: If the configuration is invalid.

    Example:
        >>> import torch
        >>> cfg = TokenLMConfig(vocab_size=50, backbone=BackboneConfig(hidden_size=32,
        ...                     num_layers=2, num_heads=4, max_seq_len=64))
        >>> model = TokenLM(cfg)
        >>> tokens = torch.randint(50, (3, 16), generator=torch.Generator().manual_seed(0))
        >>> model(tokens).shape
        torch.Size([3, 16, 50])
        >>> sorted(model.loss(tokens))
        ['accuracy', 'loss']
        >>> model.brier_estimates(tokens, generator=torch.Generator().manual_seed(1)).shape
        torch.Size([3, 12, 4])
        >>> out = model.generate([tokens[0, :3], tokens[1, :5]], 4, temperature=0.0)
        >>> [row.shape[0] for row in out]
        [4, 4]
    """

    def __init__(self, cfg: TokenLMConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        h, v = cfg.backbone.hidden_size, cfg.vocab_size
        self.embed = nn.Embedding(v, h)
        self.backbone = Backbone(cfg.backbone)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(h, v, bias=False)
        nn.init.normal_(self.embed.weight, std=cfg.backbone.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=cfg.backbone.init_std)

    # ------------------------------------------------------------------ core
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Next-token logits (identical in train and eval mode: there is no dropout).

        Args:
            tokens: Token ids ``(b, t)``, integer dtype.
            position_ids: Optional positions ``(b, t)``; see :meth:`Backbone.forward`.
            attn_mask: Optional bool mask; see :meth:`Backbone.forward`.
            cache: Optional :class:`KVCache` from ``model.backbone.new_cache``.

        Returns:
            Logits ``(b, t, V)``; ``logits[:, i]`` predicts token ``i + 1``.

        Raises:
            TypeError: If ``tokens`` is not an integer tensor.
            ValueError: If ``tokens`` is not 2-D (and see :meth:`Backbone.forward`).
        """
        _check_tokens(tokens, "tokens")
        hidden = self.backbone(
            self.embed(tokens), position_ids=position_ids, attn_mask=attn_mask, cache=cache
        )  # (b, t, h)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)  # (b, t, V)

    def loss(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean next-token cross-entropy over a batch of blocks (fp32 softmax).

        Args:
            tokens: Token ids ``(b, L)`` with ``L >= 2``; positions ``1..L-1`` are the targets.

        Returns:
            ``{"loss": scalar CE in nats (differentiable), "accuracy": scalar greedy top-1
            accuracy (detached)}``.

        Raises:
            TypeError: If ``tokens`` is not an integer tensor.
            ValueError: If ``tokens`` is not 2-D with ``L >= 2``.
        """
        _check_tokens(tokens, "tokens")
        if tokens.shape[1] < 2:
            raise ValueError(
                f"TokenLM.loss: tokens must have L >= 2, got shape {tuple(tokens.shape)}"
            )
        logits = self(tokens[:, :-1]).float()  # (b, L-1, V)
        targets = tokens[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        accuracy = (logits.detach().argmax(-1) == targets).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    def flops_per_token(self, seq_len: int, *, mode: str = "train") -> float:
        """Analytic FLOPs per token, output layer included.

        Forward FLOPs are :func:`~calm_models.backbone.backbone_flops_per_token` plus
        ``2 * h * V`` for the softmax head (the embedding lookup is free). ``mode="train"``
        multiplies by 3 (forward + backward, PaLM / nanoGPT accounting).

        Args:
            seq_len: Context length used for the attention term.
            mode: ``"train"`` or ``"inference"``.

        Returns:
            FLOPs per token.

        Raises:
            ValueError: If ``mode`` is unknown or ``seq_len < 1``.
        """
        if mode not in _FLOPS_MODES:
            raise ValueError(
                f"TokenLM.flops_per_token: mode must be one of {_FLOPS_MODES}, got {mode!r}"
            )
        bcfg = self.cfg.backbone
        forward = (
            backbone_flops_per_token(bcfg, seq_len) + 2 * bcfg.hidden_size * self.cfg.vocab_size
        )
        return float(3 * forward if mode == "train" else forward)

    # ------------------------------------------------------------------ BrierLM
    @torch.no_grad()
    def brier_terms(
        self,
        tokens: torch.Tensor,
        *,
        max_order: int = 4,
        positions: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        method: str = "batched",
    ) -> BrierTerms:
        r"""Both terms of the per-position Brier-1..max_order estimates (see :class:`BrierTerms`).

        Position ``t`` is the index of the last prefix token: the prefix is ``tokens[:, :t+1]``
        and the observed continuation ``y = tokens[:, t+1 : t+1+max_order]``. By default every
        ``t = 0 .. L-max_order-1`` (all positions with a full ``max_order``-gram target) is
        evaluated; CALM with chunk size ``K`` is scored on ``positions = K*c + K - 1``.

        ``target_prob`` comes from one teacher-forced forward pass. For ``sample_prob`` each
        position draws its own continuation ``x_1..x_max_order`` from the model by
        inverse-CDF sampling with uniforms ``u`` of shape ``(b, p, max_order)`` drawn up front
        from ``generator`` (so both methods use the same randomness).

        ``method="batched"`` (default) runs all ``p`` rollouts together: the first pass over
        ``tokens`` fills a cache, then ``max_order - 1`` passes of width ``p`` append the
        rollout tokens as extra cache columns; rollout ``i`` attends the prefix keys
        ``0..positions[i]`` and its own earlier rollout tokens only, with position ids
        ``positions[i] + j``. ``method="loop"`` is the slow reference: it loops over positions,
        crops the cache to the prefix and decodes one token at a time. Both give the same
        samples up to floating-point rounding.

        Memory: the logits ``(b, L, V)`` and a cache of ``L + (max_order - 1) * p`` positions.

        Args:
            tokens: Token ids ``(b, L)`` with ``L > max_order``.
            max_order: Largest n-gram order (4 for BrierLM).
            positions: Optional 1-D integer tensor of prefix-end positions in
                ``[0, L - max_order - 1]``; default all of them.
            generator: Optional random generator (on the model's device).
            method: ``"batched"`` or ``"loop"``.

        Returns:
            :class:`BrierTerms` with tensors of shape ``(b, p, max_order)``, in fp32 (fp64 for an
            fp64 model).

        Raises:
            TypeError: If ``tokens`` or ``positions`` is not an integer tensor.
            ValueError: On bad shapes, out-of-range positions or tokens, or an unknown ``method``.
        """
        if method not in _BRIER_METHODS:
            raise ValueError(
                f"TokenLM.brier_terms: method must be one of {_BRIER_METHODS}, got {method!r}"
            )
        if not isinstance(max_order, int) or isinstance(max_order, bool) or max_order < 1:
            raise ValueError(
                f"TokenLM.brier_terms: max_order must be a positive int, got {max_order!r}"
            )
        _check_tokens(tokens, "tokens")
        self._check_token_range(tokens, "tokens")
        b, length = tokens.shape
        if length <= max_order:
            raise ValueError(
                f"TokenLM.brier_terms: tokens must have L > max_order={max_order}, got L={length}"
            )
        last = length - max_order - 1  # largest valid prefix-end position
        if positions is None:
            positions = torch.arange(last + 1, device=tokens.device)
        else:
            if (
                not isinstance(positions, torch.Tensor)
                or positions.is_floating_point()
                or positions.dtype == torch.bool
            ):
                raise TypeError("TokenLM.brier_terms: positions must be an integer tensor")
            if positions.dim() != 1 or positions.numel() == 0:
                raise ValueError(
                    f"TokenLM.brier_terms: positions must be 1-D and non-empty, got {tuple(positions.shape)}"
                )
            if bool((positions < 0).any() | (positions > last).any()):
                raise ValueError(
                    f"TokenLM.brier_terms: positions must lie in [0, L - max_order - 1] = [0, {last}]"
                )
            positions = positions.to(device=tokens.device, dtype=torch.long)
        p = positions.shape[0]
        work = torch.float64 if self.embed.weight.dtype == torch.float64 else torch.float32
        u = torch.rand(b, p, max_order, generator=generator, device=tokens.device, dtype=work)

        cache_len = length + (max_order - 1) * (p if method == "batched" else 1)
        cache = self.backbone.new_cache(b, cache_len) if max_order > 1 else None
        logits = self(tokens, cache=cache)  # (b, L, V)

        # Accuracy term: teacher forcing, log P(tokens[i+1] | tokens[:i+1]) for i < L-1.
        pred = logits[:, :-1].to(work)  # (b, L-1, V)
        # (b, L-1)
        target_lp = pred.gather(-1, tokens[:, 1:, None]).squeeze(-1) - pred.logsumexp(-1)
        del pred
        offsets = torch.arange(max_order, device=tokens.device)
        target_lp = target_lp[:, positions[:, None] + offsets]  # (b, p, n)
        target_prob = target_lp.cumsum(-1).exp()

        start = logits[:, positions]  # (b, p, V)
        if method == "batched":
            samples, sample_lp = self._rollouts_batched(start, positions, u, cache, length)
        else:
            samples, sample_lp = self._rollouts_loop(start, positions, u, cache)
        return BrierTerms(target_prob, sample_lp.cumsum(-1).exp(), samples)

    def brier_estimates(
        self,
        tokens: torch.Tensor,
        *,
        max_order: int = 4,
        positions: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        method: str = "batched",
    ) -> torch.Tensor:
        """Unbiased per-position Brier-1..max_order estimates ``2 P(y_{1:n}) - P(x_{1:n})``.

        See :meth:`brier_terms` for which positions are evaluated and how. Feed the result to
        :class:`likelihood_free.brier.BrierLM` (``update(estimates)``).

        Args:
            tokens: Token ids ``(b, L)`` with ``L > max_order``.
            max_order: Largest n-gram order.
            positions: Optional prefix-end positions (default ``0..L-max_order-1``).
            generator: Optional random generator.
            method: ``"batched"`` (fast) or ``"loop"`` (slow reference).

        Returns:
            Estimates ``(b, p, max_order)``; ``p = L - max_order`` by default.

        Raises:
            TypeError: See :meth:`brier_terms`.
            ValueError: See :meth:`brier_terms`.

        Example:
            >>> import torch
            >>> model = TokenLM(TokenLMConfig(8, BackboneConfig(hidden_size=16, num_layers=1,
            ...                                                 num_heads=2, max_seq_len=32)))
            >>> tokens = torch.randint(8, (2, 10), generator=torch.Generator().manual_seed(0))
            >>> est = model.brier_estimates(tokens, positions=torch.tensor([3, 5]),
            ...                             generator=torch.Generator().manual_seed(0))
            >>> est.shape
            torch.Size([2, 2, 4])
        """
        return self.brier_terms(
            tokens, max_order=max_order, positions=positions, generator=generator, method=method
        ).estimates()

    def brier_estimates_loop(
        self,
        tokens: torch.Tensor,
        *,
        max_order: int = 4,
        positions: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Slow reference of :meth:`brier_estimates`: one cached rollout per position in a loop.

        Same arguments, output and random stream as :meth:`brier_estimates`; with the same
        generator state both return the same estimates up to floating-point rounding. Meant for
        tests and benchmarks.

        Args:
            tokens: Token ids ``(b, L)``.
            max_order: Largest n-gram order.
            positions: Optional prefix-end positions.
            generator: Optional random generator.

        Returns:
            Estimates ``(b, p, max_order)``.

        Raises:
            TypeError: See :meth:`brier_terms`.
            ValueError: See :meth:`brier_terms`.
        """
        return self.brier_estimates(
            tokens, max_order=max_order, positions=positions, generator=generator, method="loop"
        )

    def _rollouts_batched(
        self,
        start: torch.Tensor,  # (b, p, V) logits at the prefix ends
        positions: torch.Tensor,  # (p,)
        u: torch.Tensor,  # (b, p, n)
        cache: KVCache | None,
        length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, p, n = u.shape
        device = start.device
        # Keys: L prefix columns, then one block of p columns per rollout step.
        prefix = torch.arange(length, device=device)[None, :] <= positions[:, None]  # (p, L)
        own = torch.eye(p, dtype=torch.bool, device=device).repeat(1, n - 1)  # (p, (n-1)p)
        mask = torch.cat([prefix, own], dim=1)[None, None]  # (1, 1, p, L + (n-1)p)
        logits = start
        samples, sample_lp = [], []
        for j in range(n):
            x, lp = _sample_with_logprob(logits, u[..., j])  # (b, p) each
            samples.append(x)
            sample_lp.append(lp)
            if j + 1 < n:
                logits = self(
                    x,
                    position_ids=(positions + j + 1)[None, :],
                    attn_mask=mask[..., : length + (j + 1) * p],
                    cache=cache,
                )  # (b, p, V)
        return torch.stack(samples, -1), torch.stack(sample_lp, -1)

    def _rollouts_loop(
        self,
        start: torch.Tensor,  # (b, p, V)
        positions: torch.Tensor,  # (p,)
        u: torch.Tensor,  # (b, p, n)
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, p, n = u.shape
        samples = torch.empty(b, p, n, dtype=torch.long, device=start.device)
        sample_lp = torch.empty(b, p, n, dtype=u.dtype, device=start.device)
        # Latest position first: a rollout from t overwrites cache columns t+1.., which only
        # later positions (already done) need; columns 0..t stay intact for earlier ones.
        pos_list = positions.tolist()
        for i in sorted(range(p), key=lambda k: -pos_list[k]):
            t = pos_list[i]
            logits = start[:, i]  # (b, V)
            if cache is not None:
                cache.crop(t + 1)
            for j in range(n):
                x, lp = _sample_with_logprob(logits, u[:, i, j])  # (b,) each
                samples[:, i, j] = x
                sample_lp[:, i, j] = lp
                if j + 1 < n:
                    logits = self(x[:, None], cache=cache)[:, 0]
        return samples, sample_lp

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prompts: list[torch.Tensor] | torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> list[torch.Tensor]:
        """Sample continuations of a batch of prompts of different lengths.

        Prompts are left-padded to a common length; padded keys are masked out and every row
        gets its own position ids (``0`` at its first real token), so a row's continuation is
        the same as when run alone (up to rounding). Each step draws one uniform per original
        row from ``generator`` and samples by inverse CDF from ``softmax(logits / temperature)``
        (restricted to the ``top_k`` largest logits if given); ``temperature == 0`` is greedy.
        Rows that emit ``eos_id`` stop (they are dropped from the batch and the cache) and the
        loop ends when all rows have stopped. ``use_cache=False`` recomputes the whole sequence
        every step (the reference for tests) and gives the same tokens.

        Args:
            prompts: A list of 1-D integer tensors (each non-empty) or a ``(b, t)`` tensor.
            max_new_tokens: Maximum number of tokens to generate per row.
            temperature: ``>= 0``; ``0`` means greedy decoding.
            top_k: Optional number of most likely tokens to sample from.
            eos_id: Optional end-of-sequence id that stops a row.
            generator: Optional random generator (on the model's device).
            use_cache: Whether to decode incrementally with a :class:`KVCache`.

        Returns:
            One 1-D long tensor per row with the generated tokens only (up to and including
            ``eos_id`` when it was emitted; otherwise ``max_new_tokens`` tokens).

        Raises:
            TypeError: If a prompt is not an integer tensor.
            ValueError: On empty prompts, out-of-range tokens or arguments, or if the longest
                prompt plus ``max_new_tokens`` exceeds ``max_seq_len``.
        """
        device = self.embed.weight.device
        tokens, valid = self._left_pad(prompts, device)  # (b, P) each
        if (
            not isinstance(max_new_tokens, int)
            or isinstance(max_new_tokens, bool)
            or max_new_tokens < 1
        ):
            raise ValueError(
                f"TokenLM.generate: max_new_tokens must be a positive int, got {max_new_tokens!r}"
            )
        if not (isinstance(temperature, (int, float)) and 0 <= temperature < float("inf")):
            raise ValueError(
                f"TokenLM.generate: temperature must be a finite float >= 0, got {temperature!r}"
            )
        vocab = self.cfg.vocab_size
        if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= vocab):
            raise ValueError(
                f"TokenLM.generate: top_k must be None or an int in [1, {vocab}], got {top_k!r}"
            )
        if eos_id is not None and (not isinstance(eos_id, int) or not 0 <= eos_id < vocab):
            raise ValueError(
                f"TokenLM.generate: eos_id must be None or an int in [0, {vocab}), got {eos_id!r}"
            )
        b, prompt_len = tokens.shape
        total = prompt_len + max_new_tokens
        if total > self.cfg.backbone.max_seq_len:
            raise ValueError(
                f"TokenLM.generate: longest prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) "
                f"exceeds max_seq_len ({self.cfg.backbone.max_seq_len})"
            )
        work = torch.float64 if self.embed.weight.dtype == torch.float64 else torch.float32
        padded = not bool(valid.all())
        key_valid = torch.cat([valid, valid.new_ones(b, max_new_tokens)], dim=1)  # (b, total)
        position_ids = (key_valid.long().cumsum(1) - 1).clamp(min=0)  # (b, total)
        seq = torch.cat([tokens, tokens.new_zeros(b, max_new_tokens)], dim=1)  # (b, total)
        num_generated = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)
        active = torch.arange(b, device=device)  # original indices of unfinished rows
        cache = self.backbone.new_cache(b, total) if use_cache else None

        for step in range(max_new_tokens):
            u = torch.rand(b, generator=generator, device=device, dtype=work)
            end = prompt_len + step  # sequence length so far
            if cache is None or step == 0:
                mask = _padded_causal_mask(key_valid[active, :end]) if padded else None
                logits = self(
                    seq[active, :end],
                    position_ids=position_ids[active, :end],
                    attn_mask=mask,
                    cache=cache,
                )[:, -1]  # (a, V)
            else:
                mask = key_valid[active, None, None, :end] if padded else None
                logits = self(
                    seq[active, end - 1 : end],
                    position_ids=position_ids[active, end - 1 : end],
                    attn_mask=mask,
                    cache=cache,
                )[:, -1]
            nxt = _sample_next(logits.to(work), temperature, top_k, u[active])  # (a,)
            seq[active, end] = nxt
            if eos_id is not None:
                done = nxt == eos_id  # (a,)
                num_generated[active[done]] = step + 1
                if bool(done.any()):
                    keep = (~done).nonzero().squeeze(1)
                    if keep.numel() == 0:
                        break
                    active = active[keep]
                    if cache is not None:
                        cache.select(keep)
        out = seq[:, prompt_len:]
        return [out[i, :n] for i, n in enumerate(num_generated.tolist())]

    # ------------------------------------------------------------------ helpers
    def _check_token_range(self, tokens: torch.Tensor, name: str) -> None:
        if tokens.numel() and bool((tokens.min() < 0) | (tokens.max() >= self.cfg.vocab_size)):
            raise ValueError(
                f"TokenLM: {name} must lie in [0, {self.cfg.vocab_size}), got values outside"
            )

    def _left_pad(
        self, prompts: list[torch.Tensor] | torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad prompts to ``(b, P)``; also return the validity mask ``(b, P)``."""
        if isinstance(prompts, torch.Tensor):
            _check_tokens(prompts, "prompts")
            if prompts.shape[1] == 0:
                raise ValueError("TokenLM.generate: prompts must be non-empty")
            tokens = prompts.to(device=device, dtype=torch.long)
            valid = torch.ones_like(tokens, dtype=torch.bool)
        else:
            if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
                raise TypeError(
                    "TokenLM.generate: prompts must be a (b, t) tensor or a non-empty list of 1-D tensors"
                )
            for i, row in enumerate(prompts):
                if (
                    not isinstance(row, torch.Tensor)
                    or row.is_floating_point()
                    or row.dtype == torch.bool
                ):
                    raise TypeError(f"TokenLM.generate: prompts[{i}] must be an integer tensor")
                if row.dim() != 1 or row.numel() == 0:
                    raise ValueError(
                        f"TokenLM.generate: prompts[{i}] must be 1-D and non-empty, got {tuple(row.shape)}"
                    )
            rows = [row.to(device=device, dtype=torch.long) for row in prompts]
            tokens = pad_sequence(rows, batch_first=True, padding_value=0, padding_side="left")
            lengths = torch.tensor([row.numel() for row in rows], device=device)
            valid = (
                torch.arange(tokens.shape[1], device=device)[None, :]
                >= (tokens.shape[1] - lengths)[:, None]
            )
        self._check_token_range(tokens, "prompts")
        return tokens, valid


def _check_tokens(tokens: torch.Tensor, name: str) -> None:
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.is_floating_point()
        or tokens.is_complex()
        or tokens.dtype == torch.bool
    ):
        raise TypeError(f"TokenLM: {name} must be an integer tensor of token ids")
    if tokens.dim() != 2:
        raise ValueError(f"TokenLM: {name} must be 2-D (b, t), got shape {tuple(tokens.shape)}")


def _padded_causal_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """Causal mask hiding padded keys, ``(b, 1, t, t)`` from ``key_valid (b, t)``.

    A padded query attends only itself, so no attention row is empty.
    """
    t = key_valid.shape[1]
    eye = torch.eye(t, dtype=torch.bool, device=key_valid.device)
    causal = torch.ones(t, t, dtype=torch.bool, device=key_valid.device).tril()
    return (causal & (key_valid[:, None, :] | eye))[:, None]


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample ``x`` with ``P(x = k) = probs[..., k] / probs.sum(-1)`` from uniforms ``u`` in [0, 1).

    ``probs (..., V)``, ``u (...)`` -> long ``(...)``. Inverse CDF in two levels: the vocabulary
    is cut into ``B ~ sqrt(V)`` blocks; the block comes from the cumulative block sums and the
    token from the cumulative sum inside that block only, which avoids a sequential cumulative
    sum over all ``V`` entries (the slowest part of sampling on a CPU). A token of probability 0
    is never chosen.
    """
    vocab = probs.shape[-1]
    width = max(1, math.isqrt(vocab - 1) + 1)  # tokens per block, ceil(sqrt(V))
    num_blocks = -(-vocab // width)
    if num_blocks * width != vocab:  # zero-pad the last block (no copy when V = B * width)
        probs = F.pad(probs, (0, num_blocks * width - vocab))
    blocks = probs.unflatten(-1, (num_blocks, width))  # (..., B, width)
    block_cdf = blocks.sum(-1).cumsum(-1)  # (..., B)
    target = u * block_cdf[..., -1]  # (...)
    j = (block_cdf <= target[..., None]).sum(-1).clamp_(max=num_blocks - 1)  # (...) block
    before = torch.where(j > 0, block_cdf.gather(-1, (j - 1).clamp(min=0)[..., None])[..., 0], 0)
    inner = blocks.gather(-2, j[..., None, None].expand(*j.shape, 1, width))[..., 0, :].cumsum(-1)
    rest = torch.minimum(target - before, torch.nextafter(inner[..., -1], inner.new_zeros(())))
    i = (inner <= rest[..., None]).sum(-1)  # (...) first token whose cdf passes the target
    return j * width + i


def _sample_with_logprob(
    logits: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from ``softmax(logits (..., V))`` (computed in ``u.dtype``); also return log P(x)."""
    probs = logits.to(u.dtype).softmax(-1)
    x = _inverse_cdf(probs, u)
    return x, probs.gather(-1, x[..., None]).squeeze(-1).log()


def _sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, u: torch.Tensor
) -> torch.Tensor:
    """One token per row from ``logits (a, V)`` with uniforms ``u (a,)``."""
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0:
        return logits.argmax(-1)
    return _inverse_cdf((logits / temperature).softmax(-1), u)
