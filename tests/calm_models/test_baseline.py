"""Tests of calm_models.baseline.TokenLM: training loss, generation, BrierLM estimates."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

from calm_models.backbone import BackboneConfig
from calm_models.baseline import TokenLM, TokenLMConfig
from calm_models.flops import backbone_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _naive import loop_brier_terms  # noqa: E402  (the per-position reference lives with the benchmarks)


def _model(vocab: int = 13, seed: int = 0, dtype=torch.float64, **overrides) -> TokenLM:
    kw = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=48, init_std=0.3)
    kw.update(overrides)
    torch.manual_seed(seed)
    return TokenLM(TokenLMConfig(vocab, BackboneConfig(**kw))).to(dtype)


def _tokens(vocab: int, *shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, shape, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- forward / loss
def test_forward_shapes_train_eval_and_untied_head():
    model = _model()
    tokens = _tokens(13, 3, 9)
    logits = model.logits(tokens)
    assert logits.shape == (3, 9, 13)
    model.eval()
    torch.testing.assert_close(model.logits(tokens), logits, atol=0, rtol=0)
    untied = TokenLM(TokenLMConfig(13, BackboneConfig(hidden_size=16, num_layers=1, num_heads=2), tie_embeddings=False))
    assert untied.lm_head is not None and untied.logits(tokens).shape == (3, 9, 13)
    tied_params = sum(p.numel() for p in _model(dtype=torch.float32).parameters())
    assert tied_params == sum(p.numel() for p in model.parameters())  # no separate head


def test_loss_matches_manual_cross_entropy():
    model = _model()
    tokens = _tokens(13, 2, 7)
    out = model.loss(tokens)
    logp = model.logits(tokens[:, :-1]).log_softmax(-1)
    manual = -logp.gather(-1, tokens[:, 1:, None]).mean()
    torch.testing.assert_close(out["loss"], manual.float(), atol=1e-6, rtol=0)
    acc = (logp.argmax(-1) == tokens[:, 1:]).double().mean()
    torch.testing.assert_close(out["accuracy"].double(), acc)


def test_loss_decreases_on_synthetic_task():
    # next token = current + 1 (mod V): learnable from the last token alone
    torch.manual_seed(0)
    model = TokenLM(TokenLMConfig(16, BackboneConfig(hidden_size=32, num_layers=1, num_heads=2, max_seq_len=32)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    start = torch.randint(16, (16, 1), generator=_gen(0))
    batch = (start + torch.arange(16)) % 16
    losses = []
    for _ in range(30):
        out = model.loss(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[0] > 2.5  # ~ log(16) at init
    assert losses[-1] < 0.5 * losses[0]
    assert model.loss(batch)["accuracy"] > 0.5


def test_flops_per_token():
    model = _model(vocab=100)
    bcfg = model.cfg.backbone
    inference = backbone_flops(bcfg, 20) + 2 * 32 * 100
    assert model.flops_per_token(20) == {"train": 3 * inference, "inference": inference}


def test_input_errors():
    model = _model()
    with pytest.raises(TypeError, match="integer"):
        model.logits(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"shape \(b, L\)"):
        model.logits(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="L >= 2"):
        model.loss(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids in \[0, 13\), got 13 at position \(1, 0\)"):
        model.loss(torch.tensor([[1, 2], [13, 0]]))
    with pytest.raises(ValueError, match="vocab_size"):
        TokenLMConfig(1, BackboneConfig())


# ----------------------------------------------------------------------------- generation
PROMPT_LENGTHS = (3, 7, 1, 5)


def _prompts(vocab: int = 13) -> list[torch.Tensor]:
    return [_tokens(vocab, n, seed=20 + i) for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.mark.parametrize(
    ("temperature", "top_k", "eos_id"), [(0.0, None, None), (0.7, None, None), (0.7, 5, 3), (1.0, None, 3)]
)
def test_cached_and_uncached_generation_agree(temperature, top_k, eos_id):
    model = _model()
    kw = dict(temperature=temperature, top_k=top_k, eos_id=eos_id)
    cached = model.generate(_prompts(), 12, generator=_gen(5), **kw).tokens
    uncached = model.generate(_prompts(), 12, generator=_gen(5), use_cache=False, **kw).tokens
    assert len(cached) == len(PROMPT_LENGTHS)
    for a, b in zip(cached, uncached, strict=True):
        assert a.dtype == torch.long and torch.equal(a, b)
    if temperature > 0:  # sampling really is random: another seed changes something
        other = model.generate(_prompts(), 12, generator=_gen(6), **kw).tokens
        assert any(not torch.equal(a, b) for a, b in zip(cached, other, strict=True))


def test_batched_prompts_equal_each_alone_greedy():
    model = _model()
    batched = model.generate(_prompts(), 10, temperature=0.0).tokens
    for prompt, row in zip(_prompts(), batched, strict=True):
        (alone,) = model.generate([prompt], 10, temperature=0.0).tokens
        assert row.shape == (10,) and torch.equal(row, alone)
    # a (b, t) tensor of prompts is accepted as well
    square = torch.stack([p[:1] for p in _prompts()])
    out = model.generate(square, 4, temperature=0.0).tokens
    for prompt, row in zip(_prompts(), out, strict=True):
        assert torch.equal(row, model.generate([prompt[:1]], 4, temperature=0.0).tokens[0])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_eos_stops_each_row(temperature):
    model = _model()
    free = model.generate(_prompts(), 12, temperature=temperature, generator=_gen(2)).tokens
    # pick as EOS the token row 0 emits at step 2 (its first occurrence cuts row 0 there)
    eos = int(free[0][2])

    def cut(row):
        hits = (row == eos).nonzero()
        return row if hits.numel() == 0 else row[: int(hits[0]) + 1]

    calls = []
    handle = model.backbone.register_forward_hook(lambda *_: calls.append(1))
    stopped = model.generate(_prompts(), 12, temperature=temperature, generator=_gen(2), eos_id=eos).tokens
    handle.remove()
    for a, b in zip(free, stopped, strict=True):
        assert torch.equal(cut(a), b)
    lengths = [len(r) for r in stopped]
    assert lengths[0] <= 3 and len(set(lengths)) > 1  # rows stop independently
    assert len(calls) == max(lengths)  # the loop ends once every row has stopped
    assert all(int(r[-1]) == eos for r, n in zip(stopped, lengths, strict=True) if n < 12)


def test_generate_errors():
    model = _model()
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(_prompts(), 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(_prompts(), 42)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(_prompts(), 3, temperature=-0.5)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(_prompts(), 3, top_k=14)
    with pytest.raises(ValueError, match="eos_id"):
        model.generate(_prompts(), 3, eos_id=13)
    with pytest.raises(ValueError, match="every prompt must hold at least one token"):
        model.generate([torch.tensor([1]), torch.tensor([], dtype=torch.long)], 3)
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        model.generate([torch.tensor([1.0])], 3)
    with pytest.raises(ValueError, match=r"prompts\[0\] must hold ids in \[0, 13\), got 13"):
        model.generate([torch.tensor([13])], 3)


# ----------------------------------------------------------------------------- BrierLM
def _brute_prob(model: TokenLM, prefix: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """P(cont_1..n | prefix) for n = 1..N by separate uncached forwards: (b, N)."""
    probs, seq = [], prefix
    for j in range(cont.shape[1]):
        p = model.logits(seq)[:, -1].softmax(-1).gather(-1, cont[:, j : j + 1]).squeeze(-1)
        probs.append(p)
        seq = torch.cat([seq, cont[:, j : j + 1]], 1)
    return torch.stack(probs, -1).cumprod(-1)


@pytest.mark.parametrize(("max_order", "positions"), [(4, None), (3, [1, 3, 6]), (1, [5])])
def test_brier_terms_equal_brute_force(max_order, positions):
    model = _model(vocab=11)
    tokens = _tokens(11, 2, 10, seed=3)
    pos = None if positions is None else torch.tensor(positions)
    terms = model.brier_terms(tokens, max_order=max_order, positions=pos, generator=_gen(0))
    pos_list = list(range(10 - max_order)) if positions is None else [p - 1 for p in positions]
    assert terms.target_prob.shape == (2, len(pos_list), max_order)
    with torch.no_grad():
        for i, t in enumerate(pos_list):
            prefix = tokens[:, : t + 1]
            target = tokens[:, t + 1 : t + 1 + max_order]
            torch.testing.assert_close(terms.target_prob[:, i], _brute_prob(model, prefix, target), atol=1e-5, rtol=0)
            # the rollout probabilities are those of the sampled tokens given prefix and rollout
            torch.testing.assert_close(
                terms.sample_prob[:, i], _brute_prob(model, prefix, terms.samples[:, i]), atol=1e-5, rtol=0
            )
    est = model.brier_estimates(tokens, max_order=max_order, positions=pos, generator=_gen(0))
    torch.testing.assert_close(est, 2 * terms.target_prob - terms.sample_prob)


def test_batched_and_loop_reference_agree_with_same_seed():
    model = _model(vocab=11)
    tokens = _tokens(11, 3, 12, seed=4)
    pos = torch.tensor([8, 2, 5])  # unsorted on purpose
    a = model.brier_terms(tokens, positions=pos, generator=_gen(9))
    b = loop_brier_terms(model, tokens, positions=pos, generator=_gen(9))
    assert torch.equal(a.samples, b.samples)
    torch.testing.assert_close(a.target_prob, b.target_prob, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.sample_prob, b.sample_prob, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.estimates(), model.brier_estimates(tokens, positions=pos, generator=_gen(9)))


def _exact_brier(model: TokenLM, seq: torch.Tensor, t: int, order: int) -> torch.Tensor:
    """Exact Brier-1..order at prefix end t by enumerating all V^order continuations: (order,).

    Brier_n = 2 P(y_1:n) - sum_x P(x_1:n)^2 and sum_x P(x_1:n)^2 = sum_{x_1:N} P(x_1:n) P(x_1:N).
    """
    vocab = model.cfg.vocab_size
    conts = torch.tensor(list(itertools.product(range(vocab), repeat=order)))  # (V^N, N)
    inputs = torch.cat([seq[: t + 1].expand(len(conts), -1), conts], 1)
    logp = model.logits(inputs).log_softmax(-1)[:, t : t + order]  # (V^N, N, V)
    cum = logp.gather(-1, conts[..., None]).squeeze(-1).cumsum(-1).exp()  # P(x_1:n), (V^N, N)
    collision = (cum * cum[:, -1:]).sum(0)  # (N,)
    target = seq[t + 1 : t + 1 + order]
    is_target = (conts == target).all(-1)
    return 2 * cum[is_target][0] - collision


def test_brier_estimates_are_unbiased():
    """Monte Carlo mean over 4000 replicated rows equals the enumerated Brier-1..4 (5 SE)."""
    model = _model(vocab=5, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, init_std=0.5)
    seq = _tokens(5, 7, seed=11)
    rows = seq.expand(4000, -1).contiguous()
    with torch.no_grad():
        exact = torch.stack([_exact_brier(model, seq, t, 4) for t in range(3)])  # (3, 4)
    # the model is far from uniform, so the check is not trivial
    assert exact[:, 0].max() > 0.2
    batched = model.brier_estimates(rows, generator=_gen(0))  # (4000, 3, 4)
    loop = loop_brier_terms(model, rows, generator=_gen(1)).estimates()
    for method, est in (("batched", batched), ("loop", loop)):
        mean, se = est.mean(0), est.std(0) / 4000**0.5
        assert (se > 0).all()
        assert ((mean - exact).abs() <= 5 * se).all(), (method, mean, exact, se)


def test_brier_argument_errors():
    model = _model()
    tokens = _tokens(13, 2, 8)
    with pytest.raises(ValueError, match="positions must be a non-empty"):
        model.brier_estimates(tokens[:, :4])
    with pytest.raises(ValueError, match=r"in \[1, 4\]"):
        model.brier_estimates(tokens, positions=torch.tensor([5]))
    with pytest.raises(ValueError, match="positions"):
        model.brier_estimates(tokens, positions=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="max_order"):
        model.brier_estimates(tokens, max_order=0)
    with pytest.raises(ValueError, match="tokens must hold ids"):
        model.brier_estimates(tokens + 13)
