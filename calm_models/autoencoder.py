"""The robust variational autoencoder of CALM: ``K`` tokens <-> one continuous latent vector.

CALM (Shao et al. 2025, Sec. 2) compresses every chunk of ``K`` tokens into one vector, which the
language model predicts and the decoder turns back into the chunk. The autoencoder is *robust*,
so that the small errors of a generative model still decode correctly: it is variational (the
encoder gives ``N(mean, diag(std^2))``, the decoder is trained on reparameterised samples), its
KL to ``N(0, I)`` is weighted by ``kl_weight`` and clamped **below** per dimension,
``max(KL_d, kl_clamp)`` (free bits: dimensions with a small KL get no gradient from it), and in
training 15% of the input tokens are masked (embedding zeroed) and 15% of the latent dropped.

Architecture (pre-RMSNorm residual SwiGLU layers, bias-free except the latent projection)::

    encoder: embed K tokens -> per-token layers -> [RMSNorm] -> flatten K*H -> linear to H
             -> chunk layers -> RMSNorm -> linear to 2l = (mean, log_std)
    decoder: linear l -> H -> chunk layers -> [RMSNorm] -> linear to K*H -> K positions
             -> per-token layers -> RMSNorm -> logits through the tied token embedding

The bracketed norms are ours; the authors' released models have none there and biases on the
three projections around them (``inner_norms=False, projection_bias=True``).

Axis key: ``*b`` leading axes, ``N`` flattened batch, ``L = C * K`` tokens, ``C`` chunks,
``K`` chunk size, ``H`` hidden width, ``l`` latent size, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from calm_models import flops
from calm_models._layers import RMSNorm, SwiGLU, check_int, check_tokens, masked_cross_entropy
from calm_models.config import AutoencoderConfig


class _Residual(nn.Module):
    """``x + SwiGLU(RMSNorm(x))``."""

    def __init__(self, dim: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.ffn = SwiGLU(dim, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


def _stack(cfg: AutoencoderConfig, n: int) -> nn.Sequential:
    return nn.Sequential(*(_Residual(cfg.hidden_size, cfg.ffn_size, cfg.norm_eps) for _ in range(n)))


class _Encoder(nn.Module):
    """Token embeddings ``(N, C, K, H)`` -> ``(mean, log_std)``, each ``(N, C, l)``."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.token_layers = _stack(cfg, cfg.num_token_layers)
        self.token_norm = RMSNorm(h, cfg.norm_eps) if cfg.inner_norms else nn.Identity()
        self.squeeze = nn.Linear(cfg.chunk_size * h, h, bias=cfg.projection_bias)
        self.chunk_layers = _stack(cfg, cfg.num_chunk_layers)
        self.norm = RMSNorm(h, cfg.norm_eps)
        self.to_latent = nn.Linear(h, 2 * cfg.latent_size, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.squeeze(self.token_norm(self.token_layers(x)).flatten(-2))  # (N, C, K, H) -> (N, C, H)
        return self.to_latent(self.norm(self.chunk_layers(x))).chunk(2, dim=-1)  # mean, log_std: (N, C, l) each


class _Decoder(nn.Module):
    """Latents ``(N, C, l)`` -> final hidden states ``(N, C, K, H)`` (before the tied output)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        h, self.chunk_size = cfg.hidden_size, cfg.chunk_size
        self.from_latent = nn.Linear(cfg.latent_size, h, bias=cfg.projection_bias)
        self.chunk_layers = _stack(cfg, cfg.num_chunk_layers)
        self.chunk_norm = RMSNorm(h, cfg.norm_eps) if cfg.inner_norms else nn.Identity()
        self.expand = nn.Linear(h, cfg.chunk_size * h, bias=cfg.projection_bias)
        self.token_layers = _stack(cfg, cfg.num_token_layers)
        self.norm = RMSNorm(h, cfg.norm_eps)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.chunk_layers(self.from_latent(z))  # (N, C, H)
        x = self.expand(self.chunk_norm(x)).unflatten(-1, (self.chunk_size, -1))  # (N, C, K, H)
        return self.norm(self.token_layers(x))


class Autoencoder(nn.Module):
    """Robust variational autoencoder mapping ``K`` tokens to one latent vector and back.

    Only :meth:`loss` (also ``forward``) depends on ``self.training`` (masking, sampling and
    dropout in training mode, the posterior mean in eval mode). The output layer is tied to the
    token embedding (``logits = hidden @ embedding.weight.T``, stored once); a masked token's
    *embedding* is zeroed, so no special token id is needed. Initialisation: linear weights and
    the embedding ``N(0, init_std^2)``, each residual down projection scaled by ``1/sqrt(R)``
    (``R`` residual layers in all).

    Example:
        >>> ae = Autoencoder(AutoencoderConfig(vocab_size=50, latent_size=8, hidden_size=16))
        >>> tokens = torch.randint(0, 50, (2, 12))
        >>> mean, log_std = ae.encode(tokens)
        >>> mean.shape, ae.decode(mean).shape
        (torch.Size([2, 3, 8]), torch.Size([2, 12, 50]))
        >>> sorted(ae.loss(tokens))
        ['accuracy', 'ce', 'kl', 'kl_raw', 'loss']
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("config.vocab_size: expected the tokenizer's vocabulary size, got None")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = _Encoder(config)
        self.decoder = _Decoder(config)
        std = config.init_std
        residual_layers = 2 * (config.num_token_layers + config.num_chunk_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(residual_layers) if name.endswith("ffn.w2") else 1.0
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)

    @property
    def chunk_size(self) -> int:
        """Tokens per latent vector ``K``."""
        return self.config.chunk_size

    @property
    def latent_size(self) -> int:
        """Latent dimension ``l``."""
        return self.config.latent_size

    @property
    def vocab_size(self) -> int:
        """Vocabulary size ``V``."""
        return self.config.vocab_size

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Scalar parameters (the tied embedding counted once, or not at all)."""
        total = sum(p.numel() for p in self.parameters())
        return total if include_embedding else total - self.embedding.weight.numel()

    def flops_per_token(self, seq_len: int = 0) -> dict[str, float]:
        """Analytic FLOPs per token (:func:`calm_models.flops.autoencoder_flops`)."""
        return flops.autoencoder_flops(self)

    def _tokens(self, tokens: object, name: str = "tokens") -> torch.Tensor:
        return check_tokens(tokens, name, vocab_size=self.vocab_size, ndim=None, multiple_of=self.chunk_size)

    def _encode_embeddings(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(emb.unflatten(1, (-1, self.chunk_size)))  # (N, C, K, H) in

    def _logits(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, C, l)`` latents -> ``(N, C*K, V)`` logits through the tied embedding."""
        h = self.decoder(z.to(self.decoder.from_latent.weight.dtype))  # (N, C, K, H)
        return F.linear(h, self.embedding.weight).flatten(1, 2)

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, log_std)``, each ``(*b, L/K, l)``, of token ids ``(*b, L)``."""
        tokens = self._tokens(tokens)
        *batch, length = tokens.shape
        mean, log_std = self._encode_embeddings(self.embedding(tokens.reshape(-1, length)))
        shape = (*batch, length // self.chunk_size, self.latent_size)
        return mean.reshape(shape), log_std.reshape(shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Token logits ``(*b, C*K, V)`` of latents ``(*b, C, l)``."""
        size = self.latent_size
        if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.dim() < 2 or z.shape[-1] != size:
            got = f"{z.dtype} {tuple(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a float tensor (*b, C, latent_size={size}), got {got}")
        *batch, chunks, _ = z.shape
        logits = self._logits(z.reshape(-1, chunks, size))  # (N, C*K, V)
        return logits.reshape(*batch, chunks * self.chunk_size, self.vocab_size)

    @torch.no_grad()
    def decode_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """Argmax token ids ``(*b, C*K)`` of latents ``(*b, C, l)``.

        Many latents are decoded in slices of at most ``2**22`` logits, which keeps them in
        cache (about 1.5x faster on a CPU for thousands of candidate chunks).
        """
        if not isinstance(z, torch.Tensor) or z.dim() < 2 or z.numel() == 0:
            return self.decode(z).argmax(dim=-1)
        *batch, chunks, latent = z.shape
        per_slice = max(1, (1 << 22) // (self.chunk_size * self.vocab_size))
        flat = z.reshape(-1, 1, latent)  # one chunk per row
        ids = torch.cat([self.decode(part).argmax(dim=-1) for part in flat.split(per_slice)])
        return ids.reshape(*batch, chunks * self.chunk_size)

    def sample_posterior(
        self, tokens: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``num_samples`` posterior draws ``(n, *b, L/K, l)``, with one encoder pass.

        Example:
            >>> ae = Autoencoder(AutoencoderConfig(vocab_size=10, latent_size=4, hidden_size=8))
            >>> ae.sample_posterior(torch.zeros(3, 8, dtype=torch.long), 5).shape
            torch.Size([5, 3, 2, 4])
        """
        check_int(num_samples, "num_samples", 1)
        mean, log_std = self.encode(tokens)  # (*b, C, l)
        noise = torch.randn((num_samples, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + log_std.exp() * noise

    @torch.no_grad()
    def reconstruct(
        self, tokens: torch.Tensor, noise_std: float = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``argmax decode(mean + noise_std * eps)``: token ids ``(*b, L)``."""
        noise_std = _check_sigma(noise_std, "noise_std")
        return self.decode(_perturb(self.encode(tokens)[0], noise_std, generator)).argmax(dim=-1)

    def loss(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        r"""The robust-autoencoder objective on token ids ``(*b, L)``.

        In training mode, with draws from ``generator`` in this order: random-token replacement
        (only if ``random_token_prob > 0``: ``rand(N, L)`` then ``randint(V, (N, L))``), token
        masking (``rand(N, L) < mask_prob``), the reparameterised sample
        ``z = mean + exp(log_std) * randn(N, C, l)``, latent dropout
        (``rand(N, C, l) >= latent_dropout``, rescaled). In eval mode ``z = mean``. Then

        .. math::
            \mathrm{KL}_d = \tfrac12(\mu_d^2 + \sigma_d^2 - 1) - \log\sigma_d,\qquad
            \text{loss} = K\cdot\mathrm{CE} + \text{kl\_weight}\cdot
            \operatorname{mean}_\text{chunks}\textstyle\sum_d \max(\mathrm{KL}_d, \text{kl\_clamp}).

        Args:
            tokens: Token ids ``(*b, L)``.
            mask: Optional bool ``(*b, L)``: ``False`` marks padding, left out of the
                cross-entropy and the accuracy.
            generator: Optional generator for the draws above.

        Returns:
            fp32 scalars: ``loss`` (differentiable) and, detached, ``ce``, ``kl`` (clamped),
            ``kl_raw`` and ``accuracy`` (of the same logits).
        """
        cfg = self.config
        tokens = self._tokens(tokens)
        flat = tokens.reshape(-1, tokens.shape[-1])  # (N, L)
        if flat.numel() == 0:
            raise ValueError(f"tokens must hold at least one chunk, got shape {tuple(tokens.shape)}")
        if self.training and cfg.random_token_prob > 0:
            u = torch.rand(flat.shape, generator=generator, device=flat.device)
            ids = torch.randint(self.vocab_size, flat.shape, generator=generator, device=flat.device, dtype=flat.dtype)
            flat = torch.where(u < cfg.random_token_prob, ids, flat)
        emb = self.embedding(flat)  # (N, L, H)
        if self.training and cfg.mask_prob > 0:
            u = torch.rand(flat.shape, generator=generator, device=flat.device)
            emb = emb * (u >= cfg.mask_prob).unsqueeze(-1).to(emb.dtype)
        mean, log_std = (t.float() for t in self._encode_embeddings(emb))  # (N, C, l)
        z = mean
        if self.training:
            z = mean + log_std.exp() * torch.randn(mean.shape, generator=generator, device=mean.device)
            if cfg.latent_dropout > 0:
                u = torch.rand(z.shape, generator=generator, device=z.device)
                z = z * (u >= cfg.latent_dropout).to(z.dtype) / (1 - cfg.latent_dropout)
        ce, accuracy = masked_cross_entropy(self._logits(z).float(), flat, mask)  # logits (N, L, V)
        kl_dim = 0.5 * (mean.square() + (2 * log_std).exp() - 1) - log_std  # (N, C, l)
        kl = kl_dim.clamp(min=cfg.kl_clamp).sum(-1).mean()
        kl_raw = kl_dim.detach().sum(-1).mean()
        loss = self.chunk_size * ce + cfg.kl_weight * kl
        return {"loss": loss, "ce": ce.detach(), "kl": kl.detach(), "kl_raw": kl_raw, "accuracy": accuracy}

    forward = loss


def _check_sigma(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def _perturb(mean: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """``mean + sigma * N(0, I)``; ``mean`` itself (no draw) when ``sigma = 0``."""
    if sigma == 0:
        return mean
    return mean + sigma * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


@torch.no_grad()
def reconstruction_accuracy(
    ae: Autoencoder, tokens: torch.Tensor, noise_std: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fraction (fp32 scalar) of the tokens ``(*b, L)`` that :meth:`Autoencoder.reconstruct` recovers.

    Example:
        >>> ae = Autoencoder(AutoencoderConfig(vocab_size=10, latent_size=4, hidden_size=8))
        >>> float(reconstruction_accuracy(ae, torch.zeros(2, 8, dtype=torch.long))) <= 1.0
        True
    """
    return (ae.reconstruct(tokens, noise_std, generator) == tokens).float().mean()


@torch.no_grad()
def robustness_table(
    ae: Autoencoder,
    tokens_batches: Iterable[torch.Tensor],
    sigmas: Iterable[float] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
    generator: torch.Generator | None = None,
) -> dict[float, float]:
    """Token accuracy when ``N(0, sigma^2 I)`` noise is added to the posterior mean, per sigma.

    Each batch ``(*b, L)`` is encoded once; accuracies are pooled over all tokens. Runs in eval
    mode and restores the module's mode afterwards.

    Example:
        >>> ae = Autoencoder(AutoencoderConfig(vocab_size=10, latent_size=4, hidden_size=8))
        >>> sorted(robustness_table(ae, [torch.zeros(2, 8, dtype=torch.long)], sigmas=(0.0, 1.0)))
        [0.0, 1.0]
    """
    sigma_list = [_check_sigma(s, "sigmas") for s in sigmas]
    if not sigma_list:
        raise ValueError("sigmas must hold at least one value")
    was_training = ae.training
    ae.eval()
    try:
        correct: torch.Tensor | float = 0.0
        count = 0
        for tokens in tokens_batches:
            tokens = ae._tokens(tokens, "tokens_batches[i]")
            mean, _ = ae.encode(tokens)  # (*b, C, l)
            hits = [(ae.decode(_perturb(mean, s, generator)).argmax(-1) == tokens).sum() for s in sigma_list]
            correct = correct + torch.stack(hits)
            count += tokens.numel()
        if count == 0:
            raise ValueError("tokens_batches must hold at least one token")
        accuracies = (torch.as_tensor(correct).double() / count).tolist()
    finally:
        ae.train(was_training)
    return dict(zip(sigma_list, accuracies, strict=True))
