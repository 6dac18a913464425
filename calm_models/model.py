"""The Continuous Autoregressive Language Model (CALM): next-vector prediction on a frozen autoencoder.

A frozen :class:`~calm_models.autoencoder.Autoencoder` maps every chunk of ``K`` tokens to one
latent vector. CALM reads the previous chunks (the ``K`` token embeddings of each, compressed
into one vector), runs the :class:`~calm_models.backbone.Backbone` over chunks, and a generative
head (:mod:`calm_models.heads`) draws the next latent vector, which the autoencoder decodes.
Training is likelihood-free: the energy head is fitted with :func:`likelihood_free.energy_loss`
against ``M`` draws from the autoencoder's posterior.

Axis key: ``b`` rows, ``L = C * K`` tokens, ``C`` chunks, ``K`` chunk size, ``h`` backbone
width, ``l`` latent size, ``S`` samples per position, ``P`` positions, ``D`` rollout depth.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from calm_models import flops
from calm_models._layers import RMSNorm, SwiGLU, check_int, check_tokens
from calm_models.autoencoder import Autoencoder
from calm_models.backbone import Backbone, padded_causal_mask
from calm_models.config import CALMConfig
from calm_models.heads import build_head
from calm_models.protocol import Generation
from calm_models.sampling import check_positions, cut_at_eos, left_pad
from likelihood_free.brier import brier_estimate
from likelihood_free.temperature import batched_temperature_sample, temperature_sample

#: Valid values of the ``sampler`` argument of :meth:`CALM.generate`.
SAMPLERS = ("exact", "batch")
#: The exact sampler refuses temperatures below ``1 / EXACT_MAX_DRAWS``: an attempt needs ``floor(1/T)`` identical
#: draws, so the cost of one chunk is bounded by ``max_rounds`` attempts of at most this many draws per row.
EXACT_MAX_DRAWS = 1024


def _check_sampling(sampler: object, temperature: object, max_new_tokens: object) -> None:
    """The sampling arguments of :meth:`CALM.generate`, or a ``ValueError`` naming the bad one."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not (isinstance(temperature, (int, float)) and 0.0 < temperature <= 1.0):
        raise ValueError(f"temperature must be in (0, 1] for a sampler-only model, got {temperature!r}")
    check_int(max_new_tokens, "max_new_tokens", 1)
    if sampler == "exact" and 1.0 / temperature > EXACT_MAX_DRAWS:
        raise ValueError(
            f"temperature={temperature:g} needs {int(1 / temperature)} identical head draws in "
            f"a row per tempered chunk, more than the exact sampler's {EXACT_MAX_DRAWS} per "
            "call; use sampler='batch' (a fixed cost at any temperature)"
        )


class InputCompressor(nn.Module):
    """The ``K`` token embeddings of a chunk -> one input: ``Linear(K h, h)``, then ``x + SwiGLU(RMSNorm(x))``.

    Example:
        >>> InputCompressor(chunk_size=4, hidden_size=8, ffn_size=16)(torch.randn(2, 3, 32)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, chunk_size: int, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(chunk_size * hidden_size, hidden_size, bias=False)
        self.norm = RMSNorm(hidden_size)
        self.ffn = SwiGLU(hidden_size, ffn_size)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """``(*b, C, K h)`` -> ``(*b, C, h)``."""
        x = self.proj(emb)
        return x + self.ffn(self.norm(x))


def _compressor(config: CALMConfig, k: int) -> nn.Module:
    """The input compression of ``config.compress`` (see :class:`~calm_models.config.CALMConfig`)."""
    h = config.backbone.hidden_size
    width = config.compress_ffn_size or 2 * h
    if config.compress == "swiglu":
        module = InputCompressor(k, h, width)
        std = config.backbone.init_std
        nn.init.normal_(module.proj.weight, std=std / math.sqrt(k))
        for lin in (module.ffn.w1, module.ffn.w3):
            nn.init.normal_(lin.weight, std=std)
        nn.init.zeros_(module.ffn.w2.weight)
        return module
    return nn.Sequential(nn.Linear(k * h, width), nn.SiLU(), nn.Linear(width, h), nn.LayerNorm(h, eps=1e-6))


class CALM(nn.Module):
    """Continuous autoregressive language model over chunks of ``K`` tokens.

    The autoencoder is passed in, frozen (no gradient, always in eval mode) and kept as a
    submodule, so a CALM checkpoint holds it. :meth:`loss` scores the head on chunks
    ``1..C-1`` given the backbone's states of chunks ``0..C-2``.

    Example:
        >>> from calm_models.config import AutoencoderConfig, BackboneConfig, HeadConfig
        >>> ae = Autoencoder(AutoencoderConfig(vocab_size=50, latent_size=8, hidden_size=16))
        >>> cfg = CALMConfig(backbone=BackboneConfig(hidden_size=32, num_layers=1, num_heads=2),
        ...                  head=HeadConfig(hidden_size=32, num_blocks=1), num_targets=4)
        >>> model = CALM(cfg, ae)
        >>> tokens = torch.randint(0, 50, (2, 16))
        >>> model.loss(tokens)["loss"].shape
        torch.Size([])
        >>> [t.shape for t in model.generate(tokens[:, :4], max_new_tokens=6).tokens]
        [torch.Size([6]), torch.Size([6])]
    """

    def __init__(self, config: CALMConfig, autoencoder: Autoencoder) -> None:
        super().__init__()
        self.config = config
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        h, k = config.backbone.hidden_size, autoencoder.chunk_size
        self.embedding = nn.Embedding(autoencoder.vocab_size, h)
        self.compress = _compressor(config, k)
        self.backbone = Backbone(config.backbone)
        self.head = build_head(config.head, cond_size=h, latent_size=autoencoder.latent_size)
        nn.init.normal_(self.embedding.weight, std=config.backbone.init_std)

    @property
    def chunk_size(self) -> int:
        """Tokens per chunk ``K``."""
        return self.autoencoder.chunk_size

    @property
    def vocab_size(self) -> int:
        """Token ids ``V`` (the autoencoder's)."""
        return self.autoencoder.vocab_size

    @property
    def max_tokens(self) -> int:
        """Longest context in tokens: ``max_seq_len`` chunks of ``K``."""
        return self.config.backbone.max_seq_len * self.chunk_size

    def train(self, mode: bool = True) -> CALM:
        """Set training mode; the frozen autoencoder stays in eval mode."""
        super().train(mode)
        self.autoencoder.eval()
        return self

    def _tokens(self, tokens: object, name: str = "tokens") -> torch.Tensor:
        return check_tokens(tokens, name, vocab_size=self.autoencoder.vocab_size, multiple_of=self.chunk_size)

    def hidden_states(self, tokens: torch.Tensor, **backbone_kwargs) -> torch.Tensor:
        """Backbone states ``(b, C, h)`` of tokens ``(b, C*K)``; state ``c`` predicts chunk ``c + 1``."""
        b, length = tokens.shape
        emb = self.embedding(tokens).view(b, length // self.chunk_size, -1)  # (b, C, K h)
        return self.backbone(self.compress(emb), **backbone_kwargs)

    def loss(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Head loss (negated energy score for the energy head) averaged over predicted chunks: ``{"loss": scalar}``.

        ``tokens`` ``(b, L)`` holds ``C = L / K >= 2`` chunks; ``mask`` (bool ``(b, L)``, ``False`` on
        padding) leaves every chunk holding padding out of the targets; ``generator`` drives the
        posterior draws and the head's noise.
        """
        tokens = self._tokens(tokens)
        if tokens.shape[1] < 2 * self.chunk_size:
            raise ValueError(f"tokens must hold at least 2 chunks, got length {tokens.shape[1]}")
        with torch.no_grad():  # targets (M, b, C, l)
            targets = self.autoencoder.sample_posterior(tokens, self.config.num_targets, generator=generator)
        hidden = self.hidden_states(tokens)  # (b, C, h)
        per_chunk = self.head.loss(hidden[:, :-1], targets[:, :, 1:].float(), generator=generator)
        if mask is None:
            return {"loss": per_chunk.mean()}
        real = mask.view(*tokens.shape[:1], -1, self.chunk_size).all(-1)[:, 1:].float()
        return {"loss": (per_chunk * real).sum() / real.sum().clamp_min(1)}

    forward = loss

    @torch.no_grad()
    def sample_chunks(
        self, hidden: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``num_samples`` next chunks per state ``(*b, h)``, decoded to ids ``(S, *b, K)``."""
        z = self.head.sample(hidden, num_samples, generator=generator)  # (S, *b, l)
        return self.autoencoder.decode_tokens(z.unsqueeze(-2))

    @torch.no_grad()
    def sample_continuations(
        self,
        tokens: torch.Tensor,
        *,
        max_order: int = 4,
        num_samples: int = 2,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Independent ``max_order``-token continuations at every chunk boundary: ``(draws (S, b, P, n), starts (P,))``.

        Position ``s = K, 2K, ...`` (with ``s + max_order <= L``) continues ``tokens[:, :s]``, for
        ``D = ceil(max_order / K)`` chunks: the rollout chunk of position ``c`` at depth ``j`` attends
        to the real prefix up to ``c`` and to its own earlier rollout chunks only (a block-diagonal
        mask over keys appended to the cache), so ``D`` backbone passes cover all positions.
        """
        tokens = self._tokens(tokens)
        k = self.chunk_size
        b, length = tokens.shape
        num_pos = (length - max_order) // k
        if num_pos < 1:
            raise ValueError(
                f"tokens of length {length} hold no position with a {max_order}-token "
                f"target after the first chunk (need L >= {k + max_order})"
            )
        depth, num_chunks = -(-max_order // k), length // k
        cache = self.backbone.new_cache(b, num_chunks * depth) if depth > 1 else None
        hidden = self.hidden_states(tokens, cache=cache)  # (b, C, h)
        chunks = [self.sample_chunks(hidden, num_samples, generator)]  # [(S, b, C, K)]
        if depth > 1:
            cache.select(torch.arange(b, device=tokens.device).repeat(num_samples))  # (S*b) rows
            pos = torch.arange(num_chunks, device=tokens.device)
            prefix = pos[None, :] <= pos[:, None]  # (C, C): query c sees prefix keys <= c
            eye = torch.eye(num_chunks, dtype=torch.bool, device=tokens.device)
            for j in range(1, depth):
                mask = torch.cat([prefix] + [eye] * j, dim=1)[None, None]  # (1, 1, C, C(1+j))
                prev = chunks[-1].reshape(num_samples * b, num_chunks * k)  # (S*b, C*K) -> states (S*b, C, h)
                hidden = self.hidden_states(prev, position_ids=(pos + j)[None], attn_mask=mask, cache=cache)
                nxt = self.sample_chunks(hidden, 1, generator)[0]  # (S*b, C, K)
                chunks.append(nxt.view(num_samples, b, num_chunks, k))
        draws = torch.cat(chunks, dim=-1)[:, :, :num_pos, :max_order]  # (S, b, P, n)
        return draws, (torch.arange(num_pos, device=tokens.device) + 1) * k

    @torch.no_grad()
    def brier_estimates(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        max_order: int = 4,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Unbiased Brier-1..n estimates ``1{x1=y} + 1{x2=y} - 1{x1=x2}`` per position, ``(b, P, n)``.

        Position ``s`` (a multiple of ``K``, ``s >= K``; default: every chunk boundary) predicts
        ``tokens[:, s:s+max_order]`` from the prefix of token ids ``(b, L)``; ``max_order`` is the
        longest n-gram (4 for BrierLM).
        """
        tokens = self._tokens(tokens)
        draws, starts = self.sample_continuations(tokens, max_order=max_order, num_samples=2, generator=generator)
        if positions is not None:
            positions = check_positions(positions, tokens.shape[1], max_order, self.chunk_size, tokens.device)
            draws, starts = draws[:, :, positions // self.chunk_size - 1], positions
        index = starts[:, None] + torch.arange(max_order, device=tokens.device)  # (P, n)
        return brier_estimate(draws[0], draws[1], tokens[:, index])

    @torch.no_grad()
    def generate(
        self,
        prompts: list[torch.Tensor] | torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        sampler: str = "exact",
        num_candidates: int = 200,
        max_rounds: int = 1000,
        eos_id: int | None = None,
        pad_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Generation:
        """Generate chunk by chunk with a KV cache; returns a :class:`~calm_models.protocol.Generation`.

        Prompts are left-padded to whole chunks and to a common number of chunks; whole padding
        chunks are masked out and positions count from each row's first real chunk (pads inside
        a partial first chunk are read as context, hence ``pad_id`` defaults to ``eos_id``, the
        document separator).

        Args:
            prompts: A list of 1-D token tensors or a ``(b, t)`` tensor.
            max_new_tokens: Tokens per row (the last chunk is cut to fit).
            temperature: ``T`` in ``(0, 1]``.
            sampler: How ``T < 1`` is reached: ``"exact"`` (:func:`~likelihood_free.temperature_sample`, exact
                for any ``T``; a row not tempered within ``max_rounds`` rounds falls back to an untempered
                draw, with a warning, counted in ``Generation.fallbacks``) or ``"batch"``
                (:func:`~likelihood_free.batched_temperature_sample`, approximate, one head call per step).
            num_candidates: Draws per step of the batch sampler.
            max_rounds: Rounds of the exact sampler before a row falls back.
            eos_id: Rows stop after emitting it (kept in the output).
            pad_id: Left-padding id (default ``eos_id``, else 0).
            generator: Optional generator.
            use_cache: ``False`` recomputes the whole context every step (for tests).

        Raises:
            ValueError: On bad arguments, or a prompt plus ``max_new_tokens`` over ``max_seq_len`` chunks.
        """
        _check_sampling(sampler, temperature, max_new_tokens)

        def next_chunk(hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
            """One chunk ``(b, K)`` per state ``(b, h)``, and how many rows fell back untempered."""
            if temperature == 1.0:
                return self.sample_chunks(hidden, 1, generator)[0], 0
            if sampler == "batch":
                candidates = self.sample_chunks(hidden, num_candidates, generator)  # (N, b, K)
                return batched_temperature_sample(candidates, temperature, event_ndim=1, generator=generator), 0
            with warnings.catch_warnings():  # counted and reported once by generate
                warnings.simplefilter("ignore")
                result = temperature_sample(
                    lambda n, rows: self.sample_chunks(hidden[rows], n, generator),
                    temperature,
                    max_rounds=max_rounds,
                    on_exhausted="fallback",
                    pass_rows=True,
                    batch_size=hidden.shape[0],
                    generator=generator,
                )
            return result.samples, int(result.exhausted.sum())

        k, device = self.chunk_size, self.embedding.weight.device
        pad = pad_id if pad_id is not None else (0 if eos_id is None else eos_id)
        tokens, real = left_pad(prompts, pad, k, self.autoencoder.vocab_size, device)
        b, c0, steps = tokens.shape[0], tokens.shape[1] // k, -(-max_new_tokens // k)
        total = c0 + steps
        if total > self.config.backbone.max_seq_len:
            raise ValueError(
                f"the longest prompt ({c0} chunks) + max_new_tokens ({steps} chunks) "
                f"exceeds max_seq_len ({self.config.backbone.max_seq_len} chunks)"
            )
        key_valid = torch.cat([real.view(b, c0, k).any(-1), real.new_ones(b, steps)], 1)  # (b, C)
        positions = (key_valid.long().cumsum(1) - 1).clamp_min(0)  # (b, C)
        masked = not bool(key_valid.all())
        cache = self.backbone.new_cache(b, total) if use_cache else None
        out, fallbacks = [], 0
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        for step in range(steps):
            cur = c0 + step
            t0 = cur - 1 if cache is not None and step > 0 else 0
            pos = positions[:, t0:cur] if masked else None
            mask = padded_causal_mask(key_valid[:, :cur], cur - t0) if masked else None
            hidden = self.hidden_states(tokens[:, t0 * k :], position_ids=pos, attn_mask=mask, cache=cache)[:, -1]
            chunk, fell = next_chunk(hidden)  # (b, K)
            out.append(chunk)
            fallbacks += fell
            tokens = torch.cat([tokens, chunk], dim=1)
            if eos_id is not None:
                finished |= (chunk == eos_id).any(-1)
                if bool(finished.all()):
                    break
        if fallbacks:
            warnings.warn(
                f"{fallbacks} sampled chunk(s) fell back to untempered draws: the exact sampler found no tempered "
                f"sample within max_rounds={max_rounds} at T={temperature:g}; use sampler='batch' for low temperatures",
                stacklevel=2,
            )
        generated = torch.cat(out, dim=1)[:, :max_new_tokens]
        return Generation([cut_at_eos(row, eos_id) for row in generated.unbind(0)], fallbacks, len(out))

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Analytic ``train`` and ``inference`` FLOPs per token (:func:`calm_models.flops.calm_flops`)."""
        return flops.calm_flops(self, seq_len)
