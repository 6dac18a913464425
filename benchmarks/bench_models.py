"""Benchmarks of the CALM models (CPU or CUDA), each beside its naive formulation.

Run with::

    python -m pytest benchmarks/bench_models.py --benchmark-json=benchmarks/results/models.json
    python benchmarks/render.py benchmarks/results/*.json      # Markdown table

* BrierLM evaluation of the token baseline: the vectorised rollouts (all positions of a block
  in ``max_order`` passes) against the reference's per-position loop with a sliced KV cache.
* BrierLM evaluation of CALM (K = 4: one pass, two head samples per position).
* Autoencoder encode and decode throughput (tokens/s).
* Generation throughput of CALM with K = 1, 2, 4, 8 against the token baseline with the same
  backbone, at batch 1 and 32, T = 1; and CALM at T = 0.5 with the batch approximation
  (N = 200 head samples per step) and with the exact sampler.
* Sampling cost per vector of the energy, flow and diffusion heads against solver steps.

Weights are random (throughput does not depend on them, except for the exact sampler's
acceptance rate, which is measured on trained runs by ``benchmarks/throughput.py``).
"""

from __future__ import annotations

import time

import pytest
import torch
from _naive import loop_brier_terms  # benchmarks/ is on the path when pytest runs these files

from calm_models.autoencoder import Autoencoder, AutoencoderConfig
from calm_models.backbone import BackboneConfig
from calm_models.baseline import TokenLM, TokenLMConfig
from calm_models.heads import HeadConfig, build_head
from calm_models.model import CALM, CALMConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 4096
BACKBONE = BackboneConfig(hidden_size=256, num_layers=4, num_heads=4, max_seq_len=1024)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _calm(k: int, backbone: BackboneConfig = BACKBONE) -> CALM:
    torch.manual_seed(0)
    ae = Autoencoder(
        AutoencoderConfig(vocab_size=VOCAB, chunk_size=k, latent_size=128, hidden_size=256, intermediate_size=640)
    )
    head = HeadConfig(hidden_size=backbone.hidden_size, num_blocks=2)
    return CALM(CALMConfig(backbone=backbone, head=head), ae).to(DEVICE).eval()


def _baseline(backbone: BackboneConfig = BACKBONE) -> TokenLM:
    torch.manual_seed(0)
    return TokenLM(TokenLMConfig(VOCAB, backbone)).to(DEVICE).eval()


def _run(benchmark, fn, rounds: int = 3):
    def timed():
        out = fn()
        _sync()
        return out

    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)


# ----------------------------------------------------------------------------------------------
# BrierLM evaluation
# ----------------------------------------------------------------------------------------------

EVAL_BATCH, EVAL_LEN = 4, 128


@pytest.mark.parametrize("batch", [1, EVAL_BATCH])
@pytest.mark.parametrize("method", ["batched", "loop"])
def test_baseline_brier_eval(benchmark, method, batch):
    """Every position of ``batch`` blocks of 128 tokens: vectorised rollouts against the loop."""
    model = _baseline()
    tokens = torch.randint(VOCAB, (batch, EVAL_LEN), device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    benchmark.group = f"baseline BrierLM evaluation, {batch} x {EVAL_LEN} tokens"
    _run(
        benchmark,
        lambda: (
            model.brier_estimates(tokens, generator=gen)
            if method == "batched"
            else loop_brier_terms(model, tokens, generator=gen).estimates()
        ),
        rounds=3 if method == "batched" else 1,
    )
    positions = batch * (EVAL_LEN - 4)
    benchmark.extra_info.update(method=method, batch=batch, positions_per_s=positions / benchmark.stats.stats.median)


def test_calm_brier_eval(benchmark):
    model = _calm(4)
    tokens = torch.randint(VOCAB, (EVAL_BATCH, EVAL_LEN), device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    _run(benchmark, lambda: model.brier_estimates(tokens, generator=gen))
    positions = EVAL_BATCH * (EVAL_LEN // 4 - 1)
    benchmark.extra_info.update(positions_per_s=positions / benchmark.stats.stats.median)


# ----------------------------------------------------------------------------------------------
# Autoencoder
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["encode", "decode"])
def test_autoencoder_throughput(benchmark, op):
    ae = _calm(4).autoencoder
    tokens = torch.randint(VOCAB, (64, 256), device=DEVICE)
    with torch.no_grad():
        z = ae.encode(tokens)[0]
        fn = (lambda: ae.encode(tokens)) if op == "encode" else (lambda: ae.decode_tokens(z))
        _run(benchmark, fn, rounds=5)
    benchmark.extra_info.update(tokens_per_s=tokens.numel() / benchmark.stats.stats.median)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------

PROMPT_LEN, NEW_TOKENS = 32, 64


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("model_kind", ["baseline", "calm-k1", "calm-k2", "calm-k4", "calm-k8"])
def test_generation_throughput_t1(benchmark, model_kind, batch):
    model = _baseline() if model_kind == "baseline" else _calm(int(model_kind[-1]))
    prompts = torch.randint(VOCAB, (batch, PROMPT_LEN), device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    _run(benchmark, lambda: model.generate(prompts, NEW_TOKENS, temperature=1.0, generator=gen))
    benchmark.extra_info.update(
        model=model_kind, batch=batch, tokens_per_s=batch * NEW_TOKENS / benchmark.stats.stats.median
    )


WIDE = BackboneConfig(hidden_size=512, num_layers=8, num_heads=8, max_seq_len=1024)


@pytest.mark.parametrize("model_kind", ["baseline", "calm-k4"])
def test_generation_throughput_t1_wider_backbone(benchmark, model_kind):
    """Batch 1 with a 512 x 8 backbone: less of a step is Python overhead than at 256 x 4."""
    model = _baseline(WIDE) if model_kind == "baseline" else _calm(4, WIDE)
    prompts = torch.randint(VOCAB, (1, PROMPT_LEN), device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    benchmark.group = "generation at batch 1, T = 1, backbone 512 x 8"
    _run(benchmark, lambda: model.generate(prompts, NEW_TOKENS, temperature=1.0, generator=gen))
    benchmark.extra_info.update(
        model=model_kind, batch=1, backbone="512x8", tokens_per_s=NEW_TOKENS / benchmark.stats.stats.median
    )


@pytest.mark.parametrize("sampler", ["batch", "exact"])
def test_generation_throughput_t05(benchmark, sampler):
    """CALM K=4 at T=0.5; the exact sampler uses a generous max_rounds then falls back."""
    model = _calm(4)
    prompts = torch.randint(VOCAB, (1, PROMPT_LEN), device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    _run(
        benchmark,
        lambda: model.generate(
            prompts, NEW_TOKENS, temperature=0.5, sampler=sampler, num_candidates=200, max_rounds=50, generator=gen
        ),
        rounds=2,
    )
    # where the time goes in one batch-approximation step
    hidden = torch.randn(1, BACKBONE.hidden_size, device=DEVICE)
    from likelihood_free.temperature import batched_temperature_sample

    with torch.no_grad():
        t0 = time.perf_counter()
        cands = model.sample_chunks(hidden, 200, gen)
        _sync()
        t1 = time.perf_counter()
        batched_temperature_sample(cands, 0.5, event_ndim=1, generator=gen)
        _sync()
        t2 = time.perf_counter()
    benchmark.extra_info.update(
        sampler=sampler,
        tokens_per_s=NEW_TOKENS / benchmark.stats.stats.median,
        step_head_and_decode_ms=1e3 * (t1 - t0),
        step_grouping_ms=1e3 * (t2 - t1),
    )


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head_type,steps",
    [("energy", 1), ("flow", 2), ("flow", 8), ("flow", 32), ("diffusion", 10), ("diffusion", 50), ("diffusion", 200)],
)
def test_head_sampling_cost(benchmark, head_type, steps):
    torch.manual_seed(0)
    cfg = HeadConfig(type=head_type, hidden_size=256, num_blocks=2, flow_steps=steps, diffusion_steps=steps)
    head = build_head(cfg, cond_size=256, latent_size=128).to(DEVICE).eval()
    hidden = torch.randn(4096, 256, device=DEVICE)
    with torch.no_grad():
        _run(benchmark, lambda: head.sample(hidden, 1), rounds=3)
    benchmark.extra_info.update(head=head_type, steps=steps, us_per_vector=1e6 * benchmark.stats.stats.median / 4096)
