"""The Continuous Autoregressive Language Model (CALM): next-vector prediction on a frozen autoencoder.

A frozen :class:`~calm_models.autoencoder.Autoencoder` maps every chunk of ``K`` tokens to one
latent vector. CALM reads the previous chunks (the ``K`` token embeddings of each, compressed by a
small MLP into one vector), runs the :class:`~calm_models.backbone.Backbone` over chunks, and a
generative head (:mod:`calm_models.heads`) draws the next latent vector, which the autoencoder
decodes into ``K`` tokens. Training is likelihood-free: the energy head is fitted with
:func:`likelihood_free.energy_loss` against ``M`` draws from the autoencoder's posterior.

Axis key::

    b  batch rows           L  tokens per row (L = C * K)
    C  chunks per row       K  tokens per chunk
    h  backbone width       l  latent size
    N  head samples         M  posterior draws (targets)
    P  evaluation positions D  rollout depth in chunks (ceil(max_order / K))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from calm_models._layers import RMSNorm, SwiGLU
from calm_models.autoencoder import Autoencoder
from calm_models.backbone import Backbone, BackboneConfig, KVCache, backbone_flops_per_token
from calm_models.heads import HeadConfig, build_head
from likelihood_free.brier import brier_estimate
from likelihood_free.temperature import batched_temperature_sample, temperature_sample

__all__ = ["CALMConfig", "CALM", "InputCompressor", "SAMPLERS"]

#: Valid values of the ``sampler`` argument of :meth:`CALM.generate`.
SAMPLERS = ("exact", "batch")


@dataclass
class CALMConfig:
    """Configuration of :class:`CALM` (the autoencoder is configured and built separately).

    Attributes:
        backbone: The Transformer over chunks.
        head: The generative head (``head.type`` selects energy, flow or diffusion).
        num_targets: Posterior draws ``M`` per chunk used as energy-loss targets (paper: 100).
        compress_ffn_size: Width of the SwiGLU layer of the input compression MLP
            (``None``: twice the backbone width).

    Example:
        >>> cfg = CALMConfig(backbone=BackboneConfig(hidden_size=64, num_layers=2, num_heads=4))
        >>> cfg.validate().num_targets
        100
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    num_targets: int = 100
    compress_ffn_size: int | None = None

    def validate(self) -> CALMConfig:
        """Check every field.

        Returns:
            ``self``.

        Raises:
            ValueError: Naming the offending field.
        """
        self.backbone.validate()
        self.head.validate()
        if not isinstance(self.num_targets, int) or self.num_targets < 1:
            raise ValueError(f"CALMConfig.num_targets must be an int >= 1, got {self.num_targets!r}")
        if self.compress_ffn_size is not None and self.compress_ffn_size < 1:
            raise ValueError(
                f"CALMConfig.compress_ffn_size must be positive or None, got {self.compress_ffn_size}"
            )
        return self


class InputCompressor(nn.Module):
    """Compress the ``K`` token embeddings of a chunk into one backbone input vector.

    ``flatten -> Linear(K*h, h) -> x + SwiGLU(RMSNorm(x))`` (the "small MLP" of the CALM paper).

    Args:
        chunk_size: ``K``.
        hidden_size: ``h``.
        ffn_size: SwiGLU intermediate width.

    Example:
        >>> m = InputCompressor(chunk_size=4, hidden_size=8, ffn_size=16)
        >>> m(torch.randn(2, 3, 4, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, chunk_size: int, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(chunk_size * hidden_size, hidden_size, bias=False)
        self.norm = RMSNorm(hidden_size)
        self.ffn = SwiGLU(hidden_size, ffn_size)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Map ``(*b, C, K, h)`` token embeddings to ``(*b, C, h)`` chunk inputs."""
        x = self.proj(emb.flatten(-2))  # (*b, C, h)
        return x + self.ffn(self.norm(x))


def _matmul_params(module: nn.Module) -> int:
    """Number of weights of the ``nn.Linear`` layers of ``module`` (2 FLOPs each per vector)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


class CALM(nn.Module):
    """Continuous autoregressive language model over chunks of ``K`` tokens.

    The autoencoder is a component passed in: it is frozen here (``requires_grad=False``, always
    in eval mode) and never trained by CALM. It is a submodule, so a CALM checkpoint holds it and
    can be used on its own.

    Training (:meth:`loss`): for tokens ``(b, L)``, the backbone reads chunks ``0..C-2`` and the
    head is scored on chunks ``1..C-1`` against ``M`` posterior draws, with the head's own loss
    (the energy loss for the energy head).

    Args:
        config: Model configuration.
        autoencoder: A trained :class:`~calm_models.autoencoder.Autoencoder`.

    Example:
        >>> from calm_models.autoencoder import AutoencoderConfig
        >>> ae = Autoencoder(AutoencoderConfig(vocab_size=50, latent_size=8, hidden_size=16))
        >>> cfg = CALMConfig(backbone=BackboneConfig(hidden_size=32, num_layers=1, num_heads=2),
        ...                  head=HeadConfig(hidden_size=32, num_blocks=1), num_targets=4)
        >>> model = CALM(cfg, ae)
        >>> tokens = torch.randint(0, 50, (2, 16))
        >>> model.loss(tokens)["loss"].shape
        torch.Size([])
        >>> [t.shape for t in model.generate(tokens[:, :4], max_new_tokens=6)]
        [torch.Size([6]), torch.Size([6])]
    """

    def __init__(self, config: CALMConfig, autoencoder: Autoencoder) -> None:
        super().__init__()
        self.config = config.validate()
        self.autoencoder = autoencoder
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()
        h = config.backbone.hidden_size
        self.embedding = nn.Embedding(autoencoder.vocab_size, h)
        self.compress = InputCompressor(
            autoencoder.chunk_size, h, config.compress_ffn_size or 2 * h
        )
        self.backbone = Backbone(config.backbone)
        self.head = build_head(config.head, cond_size=h, latent_size=autoencoder.latent_size)
        std = config.backbone.init_std
        nn.init.normal_(self.embedding.weight, std=std)
        nn.init.normal_(self.compress.proj.weight, std=std / math.sqrt(autoencoder.chunk_size))
        for lin in (self.compress.ffn.w1, self.compress.ffn.w3):
            nn.init.normal_(lin.weight, std=std)
        nn.init.zeros_(self.compress.ffn.w2.weight)

    # ----------------------------------------------------------------------------------------
    @property
    def chunk_size(self) -> int:
        """Tokens per chunk ``K``."""
        return self.autoencoder.chunk_size

    def train(self, mode: bool = True) -> CALM:
        """Set training mode; the frozen autoencoder always stays in eval mode."""
        super().train(mode)
        self.autoencoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters CALM trains (everything except the frozen autoencoder)."""
        return [p for n, p in self.named_parameters() if not n.startswith("autoencoder.")]

    def _check_tokens(self, tokens: torch.Tensor, name: str = "tokens") -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64/int32 tensor, got {getattr(tokens, 'dtype', type(tokens))}")
        if tokens.dim() != 2 or tokens.shape[1] % self.chunk_size:
            raise ValueError(
                f"{name} must have shape (b, L) with L a multiple of chunk_size={self.chunk_size}, "
                f"got {tuple(tokens.shape)}"
            )

    def chunk_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Backbone inputs of every chunk: ``(b, C*K)`` token ids -> ``(b, C, h)``."""
        b, length = tokens.shape
        emb = self.embedding(tokens).view(b, length // self.chunk_size, self.chunk_size, -1)
        return self.compress(emb)  # (b, C, h)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Backbone hidden states ``(b, C, h)``; state ``c`` conditions the prediction of chunk ``c+1``."""
        return self.backbone(
            self.chunk_inputs(tokens), position_ids=position_ids, attn_mask=attn_mask, cache=cache
        )

    # ----------------------------------------------------------------------------------------
    def loss(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """Training objective on token blocks.

        Args:
            tokens: Token ids ``(b, L)``, ``L = C*K`` with ``C >= 2``.
            generator: Optional generator for the posterior draws and the head's noise.

        Returns:
            ``{"loss": scalar}``: the head loss (negated energy score for the energy head)
            averaged over the ``b * (C-1)`` predicted chunks.

        Raises:
            TypeError, ValueError: On malformed ``tokens``.
        """
        self._check_tokens(tokens)
        if tokens.shape[1] < 2 * self.chunk_size:
            raise ValueError(f"tokens must hold at least 2 chunks, got length {tokens.shape[1]}")
        with torch.no_grad():
            targets = self.autoencoder.sample_posterior(
                tokens, self.config.num_targets, generator=generator
            )  # (M, b, C, l)
        hidden = self.hidden_states(tokens)  # (b, C, h)
        per_chunk = self.head.loss(hidden[:, :-1], targets[:, :, 1:].float(), generator=generator)
        return {"loss": per_chunk.mean()}

    forward = loss

    @torch.no_grad()
    def sample_chunks(
        self, hidden: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw ``num_samples`` next chunks per hidden state and decode them to token ids.

        Args:
            hidden: Hidden states ``(*b, h)``.
            num_samples: Draws ``N`` per state.
            generator: Optional generator for the head's noise.

        Returns:
            Token ids ``(N, *b, K)`` (the argmax decoding of each sampled latent).
        """
        z = self.head.sample(hidden, num_samples, generator=generator)  # (N, *b, l)
        return self.autoencoder.decode_tokens(z.unsqueeze(-2))  # (N, *b, K)

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_continuations(
        self,
        tokens: torch.Tensor,
        *,
        max_order: int = 4,
        num_samples: int = 2,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Independent ``max_order``-token continuations at every chunk boundary, all at once.

        Positions are the chunk boundaries ``s = K, 2K, ...`` with ``s + max_order <= L``: a
        continuation of position ``s`` is sampled given ``tokens[:, :s]``. With
        ``K >= max_order`` one head sample per position suffices. With ``K < max_order`` each
        continuation goes on autoregressively for ``D = ceil(max_order / K)`` chunks, every
        position at once: the rollout chunk of position ``c`` at depth ``j`` attends to the real
        prefix up to ``c`` and to its own earlier rollout chunks only (a block-diagonal mask over
        the keys appended to the cache), so ``D`` backbone passes cover all positions instead of
        one short generation per position.

        Args:
            tokens: Token ids ``(b, L)``.
            max_order: Tokens per continuation.
            num_samples: Independent continuations per position.
            generator: Optional generator.

        Returns:
            ``(draws, starts)``: draws ``(num_samples, b, P, max_order)`` and the token index
            ``s`` of each position ``(P,)``.

        Raises:
            TypeError, ValueError: On malformed ``tokens`` or when no position fits.
        """
        self._check_tokens(tokens)
        k = self.chunk_size
        b, length = tokens.shape
        num_pos = (length - max_order) // k  # starts s = (c+1)K for c < P
        if num_pos < 1:
            raise ValueError(
                f"tokens of length {length} hold no position with a {max_order}-token target "
                f"after the first chunk (need L >= {k + max_order})"
            )
        depth = -(-max_order // k)
        num_chunks = length // k
        cache = self.backbone.new_cache(b, num_chunks * depth) if depth > 1 else None
        hidden = self.hidden_states(tokens, cache=cache)  # (b, C, h)
        chunks = [self.sample_chunks(hidden, num_samples, generator)]  # [(S, b, C, K)]
        if depth > 1:
            rows = torch.arange(b, device=tokens.device).repeat(num_samples)  # (S*b,)
            cache.select(rows)
            pos = torch.arange(num_chunks, device=tokens.device)
            prefix = pos[None, :] <= pos[:, None]  # (C, C): query c sees prefix keys <= c
            eye = torch.eye(num_chunks, dtype=torch.bool, device=tokens.device)
            for j in range(1, depth):
                mask = torch.cat([prefix] + [eye] * j, dim=1)[None, None]  # (1, 1, C, C(1+j))
                prev = chunks[-1].reshape(num_samples * b, num_chunks * k)  # (S*b, C*K)
                hidden = self.hidden_states(
                    prev, position_ids=(pos + j)[None, :], attn_mask=mask, cache=cache
                )  # (S*b, C, h)
                nxt = self.sample_chunks(hidden, 1, generator)[0]  # (S*b, C, K)
                chunks.append(nxt.view(num_samples, b, num_chunks, k))
        draws = torch.cat(chunks, dim=-1)[:, :, :num_pos, :max_order]  # (S, b, P, n)
        starts = (torch.arange(num_pos, device=tokens.device) + 1) * k  # (P,)
        return draws, starts

    @torch.no_grad()
    def brier_estimates(
        self,
        tokens: torch.Tensor,
        *,
        max_order: int = 4,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unbiased per-position Brier-1 .. Brier-``max_order`` estimates on token blocks.

        Two independent continuations ``x1, x2`` per chunk boundary
        (:meth:`sample_continuations`) are scored against the observed tokens with
        :func:`likelihood_free.brier_estimate`: ``1{x1=y} + 1{x2=y} - 1{x1=x2}`` per n-gram
        prefix.

        Args:
            tokens: Token ids ``(b, L)``.
            max_order: Longest n-gram scored (4 for BrierLM).
            generator: Optional generator.

        Returns:
            ``(estimates, starts)``: estimates ``(b, P, max_order)`` and the token index
            ``s`` of each position ``(P,)``; position ``s`` predicts ``tokens[:, s:s+max_order]``.
        """
        draws, starts = self.sample_continuations(
            tokens, max_order=max_order, num_samples=2, generator=generator
        )
        index = starts[:, None] + torch.arange(max_order, device=tokens.device)  # (P, n)
        return brier_estimate(draws[0], draws[1], tokens[:, index]), starts

    # ----------------------------------------------------------------------------------------
    def _next_chunk(
        self,
        hidden: torch.Tensor,
        temperature: float,
        sampler: str,
        num_candidates: int,
        max_rounds: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """One chunk ``(b, K)`` per hidden state ``(b, h)`` at the requested temperature."""
        if temperature == 1.0:
            return self.sample_chunks(hidden, 1, generator)[0]
        if sampler == "batch":
            candidates = self.sample_chunks(hidden, num_candidates, generator)  # (N, b, K)
            return batched_temperature_sample(
                candidates.transpose(0, 1), temperature, generator=generator
            )
        result = temperature_sample(
            lambda n, rows: self.sample_chunks(hidden[rows], n, generator),
            temperature,
            max_rounds=max_rounds,
            on_exhausted="fallback",
            pass_rows=True,
            batch_size=hidden.shape[0],
            generator=generator,
        )
        return result.samples

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
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        """Generate continuations chunk by chunk with a KV cache.

        Prompts of different lengths are left-padded to whole chunks and to a common number of
        chunks; padded keys are masked out and position ids count from each row's first real
        chunk. Each step draws one latent per row from the head, decodes it into ``K`` tokens
        and feeds the chunk back. Temperature ``T < 1`` comes from :mod:`likelihood_free`'s
        samplers around the head: ``sampler="exact"`` uses :func:`~likelihood_free.temperature_sample`
        (rejection, exact for any ``T`` in ``(0, 1]``; rows that have accepted stop drawing),
        ``sampler="batch"`` uses :func:`~likelihood_free.batched_temperature_sample` over
        ``num_candidates`` draws (one head call per step; approximate).

        Args:
            prompts: A list of 1-D token id tensors, or a ``(b, t)`` tensor.
            max_new_tokens: Tokens to generate per row (the last chunk is cut to fit).
            temperature: ``T`` in ``(0, 1]``.
            sampler: ``"exact"`` or ``"batch"``.
            num_candidates: Draws per step of the batch approximation.
            max_rounds: Rejection rounds of the exact sampler before it falls back to its best
                candidate.
            eos_id: Rows stop after emitting this id (kept in the output); ``None``: never stop.
            pad_id: Id used to left-pad prompts to whole chunks (default: ``eos_id``, the document
                separator, else 0). Whole padding chunks are masked out; pads inside a prompt's
                first chunk are read as context, which is why EOS is the natural choice.
            use_cache: ``False`` recomputes the whole context every step (for testing).
            generator: Optional generator.

        Returns:
            A list with the ``<= max_new_tokens`` generated ids of each row.

        Raises:
            ValueError: On an empty prompt, ``max_new_tokens < 1``, ``temperature`` outside
                ``(0, 1]`` or an unknown ``sampler``.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not (isinstance(temperature, (int, float)) and 0.0 < temperature <= 1.0):
            raise ValueError(
                f"temperature must be in (0, 1] for a sampler-only model, got {temperature!r}"
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        rows = list(prompts) if isinstance(prompts, (list, tuple)) else list(prompts.unbind(0))
        if not rows or any(r.dim() != 1 or r.numel() == 0 for r in rows):
            raise ValueError("prompts must be non-empty 1-D token id tensors")
        k = self.chunk_size
        device = self.embedding.weight.device
        b = len(rows)
        num_chunks = max(-(-r.numel() // k) for r in rows)
        steps = -(-max_new_tokens // k)
        width = num_chunks * k
        if pad_id is None:
            pad_id = 0 if eos_id is None else eos_id
        rows = [r.to(device=device, dtype=torch.long) for r in rows]
        extra = width - max(r.numel() for r in rows)  # left pad up to whole chunks
        padded = F.pad(pad_sequence(rows, batch_first=True, padding_value=pad_id,
                                    padding_side="left"), (extra, 0), value=pad_id)  # (b, C0*K)
        real = F.pad(pad_sequence([torch.ones_like(r, dtype=torch.bool) for r in rows],
                                  batch_first=True, padding_side="left"), (extra, 0))  # (b, C0*K)
        # a chunk is real when it holds any prompt token (partial first chunks keep their pads)
        key_valid = real.view(b, num_chunks, k).any(-1)  # (b, C0)
        first = (~key_valid).sum(-1)  # (b,) index of the first real chunk
        masked = not bool(key_valid.all())  # some row has whole padding chunks
        total = num_chunks + steps
        key_valid = torch.cat([key_valid, key_valid.new_ones(b, steps)], dim=1)  # (b, C0+S)
        positions = (torch.arange(total, device=device)[None, :] - first[:, None]).clamp_min(0)

        cache = self.backbone.new_cache(b, total) if use_cache else None
        context = padded  # (b, C*K) grows by one chunk per step
        out = []
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        for step in range(steps):
            cur = num_chunks + step
            if cache is None or step == 0:
                t0 = 0
                inputs = context
            else:
                t0 = cur - 1
                inputs = context[:, -k:]
            if masked:
                causal = torch.arange(cur, device=device)[None, :] <= torch.arange(
                    t0, cur, device=device
                )[:, None]  # (t, cur)
                own = torch.arange(cur, device=device)[None, :] == torch.arange(
                    t0, cur, device=device
                )[:, None]
                # padded queries attend to themselves only, so no softmax row is empty (no NaN)
                mask = ((causal[None] & key_valid[:, None, :cur]) | own[None])[:, None]
                pos_ids = positions[:, t0:cur]  # mask (b, 1, t, cur), positions (b, t)
            else:  # no padding: the backbone's causal default and positions t0..cur-1
                mask, pos_ids = None, None
            hidden = self.hidden_states(
                inputs, position_ids=pos_ids, attn_mask=mask, cache=cache
            )[:, -1]  # (b, h)
            chunk = self._next_chunk(
                hidden, float(temperature), sampler, num_candidates, max_rounds, generator
            )  # (b, K)
            out.append(chunk)
            context = torch.cat([context, chunk], dim=1)
            if eos_id is not None:
                finished |= (chunk == eos_id).any(-1)
                if bool(finished.all()):
                    break
        generated = torch.cat(out, dim=1)[:, :max_new_tokens]  # (b, <= max_new)
        return [_cut_at_eos(row, eos_id) for row in generated.unbind(0)]

    # ----------------------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Analytic FLOPs per token (2 per multiply-add; embeddings and norms ignored).

        * ``inference``: compression + backbone (over ``seq_len / K`` chunks) + one head sample
          + the autoencoder's decoder, all divided by ``K``.
        * ``train``: 3x (forward + backward) of compression, backbone and ``N`` head samples,
          plus the frozen encoder's forward for the targets, divided by ``K`` — the autoencoder
          counted as in the CALM paper.

        Args:
            seq_len: Context length in tokens.

        Returns:
            ``{"train": ..., "inference": ...}`` FLOPs per token.
        """
        k = self.chunk_size
        ae = self.autoencoder
        bb = backbone_flops_per_token(self.config.backbone, max(1, seq_len // k))
        comp = 2.0 * _matmul_params(self.compress)
        enc = 2.0 * _matmul_params(ae.encoder) if hasattr(ae, "encoder") else 0.0
        dec = 2.0 * _matmul_params(ae.decoder) if hasattr(ae, "decoder") else 0.0
        dec += 2.0 * k * ae.vocab_size * ae.config.hidden_size  # tied output layer
        head_sample = self.head.sample_flops(1)
        head_train = self.head.loss_flops(self.config.num_targets)
        return {
            "train": (3.0 * (comp + bb + head_train) + enc) / k,
            "inference": (comp + bb + head_sample + dec) / k,
        }


def _cut_at_eos(row: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Keep ``row`` up to and including its first ``eos_id``."""
    if eos_id is None:
        return row
    hits = (row == eos_id).nonzero()
    return row if hits.numel() == 0 else row[: int(hits[0, 0]) + 1]
