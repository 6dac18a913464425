"""CALM: training objective, vectorised continuations, generation, FLOPs, evaluation positions."""

from __future__ import annotations

import pytest
import torch

from calm_models.autoencoder import Autoencoder, AutoencoderConfig
from calm_models.backbone import BackboneConfig
from calm_models.baseline import TokenLM, TokenLMConfig
from calm_models.evaluate import evaluate_brier_lm, evaluation_starts
from calm_models.heads import HeadConfig
from calm_models.model import CALM, CALMConfig
from likelihood_free.energy import energy_loss

V = 40


def _model(k: int = 4, seed: int = 0, head: str = "energy") -> CALM:
    torch.manual_seed(seed)
    ae = Autoencoder(AutoencoderConfig(vocab_size=V, chunk_size=k, latent_size=8, hidden_size=32, intermediate_size=64))
    cfg = CALMConfig(
        backbone=BackboneConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128),
        head=HeadConfig(type=head, hidden_size=32, num_blocks=1, flow_steps=2, diffusion_steps=4),
        num_targets=16,
    )
    return CALM(cfg, ae).eval()


def _deterministic_head(model: CALM) -> None:
    """Replace the head's sampler by a fixed function of the hidden state (for exact checks)."""
    proj = torch.nn.Linear(model.config.backbone.hidden_size, model.autoencoder.latent_size)
    torch.nn.init.normal_(proj.weight, std=3.0)

    def sample(hidden, num_samples, generator=None):
        z = proj(hidden)
        return z.expand(num_samples, *z.shape)

    model.head.sample = sample


def test_autoencoder_is_frozen_and_stays_in_eval_mode():
    model = _model()
    model.train()
    assert not model.autoencoder.training
    assert all(not p.requires_grad for p in model.autoencoder.parameters())
    names = {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in names for p in model.autoencoder.parameters())


def test_loss_is_finite_and_reaches_only_trainable_parameters():
    model = _model().train()
    tokens = torch.randint(V, (3, 16))
    out = model.loss(tokens, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert model.head.parameters().__next__().grad is not None


def test_energy_loss_decreases_when_next_chunk_is_a_function_of_the_context():
    """A cyclic token sequence: every next chunk is determined by the previous one."""
    model = _model(seed=1).train()
    base = torch.arange(V // 2).repeat(4)  # period 20 tokens = 5 chunks
    tokens = torch.stack([base.roll(-4 * i)[:32] for i in range(8)])  # (8, 32)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = model.loss(tokens, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # a perfect model's loss is E||Y - Y'|| of the posterior: estimate it from posterior draws
    with torch.no_grad():
        draws = model.autoencoder.sample_posterior(tokens, 64, generator=g)[:, :, 1:]
        floor = energy_loss(draws[:32], draws[32:]).item()
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end - floor < 0.3 * (start - floor), (start, end, floor)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_vectorised_continuations_equal_per_prefix_generation(k):
    """Every position's rollout == generating from that prefix alone (deterministic head)."""
    model = _model(k=k)
    _deterministic_head(model)
    tokens = torch.randint(V, (2, 24))
    draws, starts = model.sample_continuations(tokens, max_order=4, num_samples=2)
    assert draws.shape == (2, 2, len(starts), 4)
    assert torch.equal(draws[0], draws[1])
    for p, s in enumerate(starts.tolist()):
        expected = model.generate(tokens[:, :s], 4).tokens
        for row in range(2):
            assert torch.equal(draws[0, row, p], expected[row]), (k, s, row)


@pytest.mark.parametrize("k", [2, 4])
def test_cached_and_uncached_generation_agree(k):
    model = _model(k=k)
    prompts = [torch.randint(V, (n,)) for n in (3, 9, 5)]
    for temperature, sampler in [(1.0, "exact"), (0.5, "batch"), (0.7, "exact")]:
        outs = [
            model.generate(
                prompts,
                12,
                temperature=temperature,
                sampler=sampler,
                num_candidates=16,
                use_cache=use_cache,
                generator=torch.Generator().manual_seed(3),
            ).tokens
            for use_cache in (True, False)
        ]
        for a, b in zip(*outs, strict=True):
            assert torch.equal(a, b), (temperature, sampler)


def test_batched_prompts_of_different_lengths_equal_each_alone():
    model = _model(k=4)
    _deterministic_head(model)
    prompts = [torch.randint(V, (n,)) for n in (4, 11, 1, 8)]
    together = model.generate(prompts, 10).tokens
    for prompt, out in zip(prompts, together, strict=True):
        assert torch.equal(model.generate([prompt], 10).tokens[0], out)


def test_generation_stops_each_row_at_eos():
    model = _model(k=4)
    _deterministic_head(model)
    prompts = [torch.randint(V, (n,)) for n in (4, 8)]
    free = model.generate(prompts, 16).tokens
    eos = int(free[0][5])
    stopped = model.generate(prompts, 16, eos_id=eos, pad_id=0).tokens
    for full, cut in zip(free, stopped, strict=True):
        hits = (full == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else len(full)
        assert torch.equal(cut, full[:end])


def test_generate_rejects_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="temperature"):
        model.generate([torch.tensor([1, 2])], 4, temperature=1.5)
    with pytest.raises(ValueError, match="sampler"):
        model.generate([torch.tensor([1, 2])], 4, temperature=0.5, sampler="greedy")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([torch.tensor([1, 2])], 0)


@pytest.mark.parametrize("head", ["flow", "diffusion"])
def test_other_heads_work_unchanged(head):
    model = _model(head=head)
    tokens = torch.randint(V, (2, 16))
    assert torch.isfinite(model.loss(tokens)["loss"])
    assert model.brier_estimates(tokens).shape == (2, 3, 4)
    out = model.generate([tokens[0, :4]], 8, temperature=0.5, sampler="batch", num_candidates=8)
    assert out.tokens[0].shape == (8,)


def test_calm_and_baseline_are_scored_on_the_same_positions():
    calm = _model(k=4)
    base = TokenLM(TokenLMConfig(V, BackboneConfig(hidden_size=32, num_layers=1, num_heads=2)))
    batches = [torch.randint(V, (2, 32)) for _ in range(2)]
    r1 = evaluate_brier_lm(calm, batches, stride=8)
    r2 = evaluate_brier_lm(base, batches, stride=8)
    assert r1.count == r2.count == 2 * 2 * len(evaluation_starts(32, 8))
    # positions 8, 16, 24 are chunk boundaries 2, 4, 6 of the default positions 4, 8, ..., 28
    every = calm.brier_estimates(batches[0], generator=torch.Generator().manual_seed(0))
    chosen = calm.brier_estimates(batches[0], evaluation_starts(32, 8), generator=torch.Generator().manual_seed(0))
    assert every.shape == (2, 7, 4) and torch.equal(chosen, every[:, [1, 3, 5]])
    with pytest.raises(ValueError, match="multiple of the model's chunk size"):
        evaluate_brier_lm(_model(k=4), batches, stride=6)
    with pytest.raises(ValueError, match="multiples of 4"):
        calm.brier_estimates(batches[0], torch.tensor([6]))


def test_oracle_continuations_score_brier_lm_100():
    """If both samples are the observed tokens, every Brier-n estimate is exactly 1."""
    model = _model(k=2)
    tokens = torch.randint(V, (2, 20))

    def oracle(tokens_, *, max_order=4, num_samples=2, generator=None):
        starts = torch.arange(1, (tokens_.shape[1] - max_order) // 2 + 1) * 2
        idx = starts[:, None] + torch.arange(max_order)
        return tokens_[:, idx].expand(num_samples, -1, -1, -1), starts

    model.sample_continuations = oracle
    result = evaluate_brier_lm(model, [tokens], stride=2)
    assert result.brier_lm == pytest.approx(100.0)


def test_flops_accounting_favours_larger_chunks():
    flops = {k: _model(k=k).flops_per_token(64) for k in (1, 2, 4)}
    assert flops[4]["inference"] < flops[2]["inference"] < flops[1]["inference"]
    assert all(f["train"] > f["inference"] for f in flops.values())


@pytest.mark.gpu
def test_bf16_training_step_and_generation_on_cuda():
    model = _model(k=4).cuda().train()
    tokens = torch.randint(V, (4, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(tokens, generator=torch.Generator("cuda").manual_seed(0))["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    outs = [
        model.generate(tokens[:2, :8], 8, generator=torch.Generator("cuda").manual_seed(1), use_cache=cache).tokens
        for cache in (True, False)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
