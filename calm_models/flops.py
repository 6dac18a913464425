r"""Analytic FLOP counts of every model, in one place.

A multiply-add counts 2 FLOPs; only matrix multiplications count (embeddings, norms, softmax, RoPE and residual
additions are lower order). Training costs 3x the forward pass (forward + backward, the PaLM / nanoGPT accounting).
The tests check these counts against :class:`torch.utils.flop_counter.FlopCounterMode`.

* Backbone, per token and forward: :math:`2 L N_\text{layer} + 4 L T h` with :math:`N_\text{layer} = 2h^2 + 2hGd + 3hf`
  (q/o, k/v, SwiGLU) and ``T`` keys attended (the causal mask is not discounted, as in PaLM's appendix B).
* Heads, per position: the conditioning once, the modulations once per network evaluation, the per-sample path once
  per sample and evaluation.
* CALM, per token: training = 3 x (input compression + backbone over ``T / K`` chunks + the head loss with ``N``
  samples) + the frozen encoder's forward for the targets, all over ``K``; inference = compression + backbone + one
  head sample + the decoder (with the tied output layer), over ``K``.
* Token baseline, per token: backbone + the ``h x V`` output layer.
"""

from __future__ import annotations

from torch import nn

from calm_models.config import BackboneConfig


def linear_flops(*modules: nn.Module) -> float:
    """Forward FLOPs of one pass through every ``nn.Linear`` inside ``modules``.

    Example:
        >>> linear_flops(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 2)))
        40.0
    """
    linears = [m for mod in modules for m in mod.modules() if isinstance(m, nn.Linear)]
    return float(sum(2 * m.in_features * m.out_features for m in linears))


def backbone_flops(cfg: BackboneConfig, seq_len: int) -> float:
    """Forward FLOPs per position of the backbone with ``seq_len`` keys attended.

    Example:
        >>> cfg = BackboneConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=128)
        >>> backbone_flops(cfg, seq_len=32)
        163840.0
    """
    h, d, g, f = cfg.hidden_size, cfg.head_dim, cfg.resolved_kv_heads, cfg.resolved_ffn_size
    per_layer = 2 * h * h + 2 * h * g * d + 3 * h * f
    return float(2 * cfg.num_layers * per_layer + 4 * cfg.num_layers * max(1, seq_len) * h)


def head_flops(
    head: nn.Module, num_samples: int = 1, *, loss: bool = False, num_targets: int = 1, num_steps: int | None = None
) -> float:
    """Forward FLOPs per position of ``head.sample(hidden, num_samples)`` or of ``head.loss``.

    ``loss=True`` counts the loss on ``num_targets`` targets ``M`` instead (energy heads:
    ``cfg.num_samples`` samples; flow and diffusion heads: one evaluation per used target draw);
    ``num_steps`` overrides the configured sampler steps of a flow or diffusion head.
    """
    n = head.cfg.num_samples if loss else num_samples  # samples of an energy head
    if head.cfg.type == "energy_mlp":  # the condition is concatenated to every sample's input
        return linear_flops(head.hidden_embd) + n * linear_flops(head.noise_embd, head.mlp_blocks, head.final_layer)
    net = head.net
    cond = linear_flops(head.cond_proj)
    modulation = linear_flops(net.final_modulation, *(b.modulation for b in net.blocks))
    per_sample = linear_flops(net.input_proj, net.output, *(b.mlp for b in net.blocks))
    if head.cfg.type == "energy":
        return cond + modulation + n * per_sample + linear_flops(getattr(head, "mixture", nn.Sequential()))
    if loss:
        k = min(num_targets, head.cfg.max_target_draws)
        return cond + k * (linear_flops(head.time_embed) + modulation + per_sample)
    return cond + head.num_evaluations(num_steps) * (modulation + num_samples * per_sample)


def autoencoder_flops(ae: nn.Module) -> dict[str, float]:
    """Per-token FLOPs of an autoencoder: ``encode``, ``inference`` (decode, with the tied output
    layer) and ``train`` (3 x both). The per-token layers run ``K`` times per chunk."""
    k, h, v = ae.chunk_size, ae.config.hidden_size, ae.vocab_size
    enc, dec = ae.encoder, ae.decoder
    encode = k * linear_flops(enc.token_layers) + linear_flops(enc.squeeze, enc.chunk_layers, enc.to_latent)
    decode = k * linear_flops(dec.token_layers) + linear_flops(dec.from_latent, dec.chunk_layers, dec.expand)
    decode += 2.0 * k * v * h  # the tied output layer
    return {"train": 3.0 * (encode + decode) / k, "inference": decode / k, "encode": encode / k}


def calm_flops(model: nn.Module, seq_len: int) -> dict[str, float]:
    """Per-token ``train`` and ``inference`` FLOPs of a CALM model with ``seq_len`` tokens of context."""
    k = model.chunk_size
    ae = autoencoder_flops(model.autoencoder)
    trunk = linear_flops(model.compress) + backbone_flops(model.config.backbone, seq_len // k)
    head_train = head_flops(model.head, loss=True, num_targets=model.config.num_targets)
    return {
        "train": (3.0 * (trunk + head_train)) / k + ae["encode"],
        "inference": (trunk + head_flops(model.head)) / k + ae["inference"],
    }


def token_lm_flops(model: nn.Module, seq_len: int) -> dict[str, float]:
    """Per-token ``train`` and ``inference`` FLOPs of the token baseline."""
    cfg = model.cfg
    forward = backbone_flops(cfg.backbone, seq_len) + 2.0 * cfg.backbone.hidden_size * cfg.vocab_size
    return {"train": 3.0 * forward, "inference": forward}
