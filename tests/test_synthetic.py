"""The exact Brier scores of the synthetic-language benchmark (``benchmarks/synthetic.py``).

The closed form ``(T o T)^n 1`` is checked against brute-force enumeration of every n-gram of a
tiny chain of each order, and against the Monte Carlo mean of the two-sample estimator on
sequences sampled from the chain (within a bound derived from the standard error).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from likelihood_free.brier import brier_estimate

_SYNTHETIC = Path(__file__).resolve().parents[1] / "benchmarks" / "synthetic.py"


def _load():
    spec = importlib.util.spec_from_file_location("synthetic", _SYNTHETIC)
    module = importlib.util.module_from_spec(spec)
    sys.modules["synthetic"] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


synthetic = _load()


@pytest.fixture(params=[1, 2], ids=["order1", "order2"])
def tiny_language(request, monkeypatch):
    """A chain of 5 words of the given order (small enough to enumerate every 4-gram)."""
    spec = synthetic.LanguageSpec(
        order=request.param, num_words=5, successors=(2, 3), concentration=0.7, end_prob=0.2, start_words=3, seed=7
    )
    monkeypatch.setitem(synthetic.LANGUAGES, "tiny-test", spec)
    return synthetic.make_language("tiny-test")


def _brute_force(lang, state: int, max_order: int) -> list[float]:
    """sum over every n-gram x of P(x | state)^2, by enumeration of all V^n token sequences."""
    out = []
    for n in range(1, max_order + 1):
        total = 0.0
        for seq in itertools.product(range(lang.vocab_size), repeat=n):
            p, s = 1.0, state
            for tok in seq:
                p *= lang.probs[s, tok]
                if p == 0.0:
                    break
                s = lang.next_state[s, tok]
            total += p * p
        out.append(total)
    return out


def test_language_is_a_valid_chain(tiny_language):
    lang = tiny_language
    np.testing.assert_allclose(lang.probs.sum(1), 1.0)
    assert ((lang.next_state >= 0) == (lang.probs > 0)).all()
    # a state's context is the previous context shifted by the emitted token
    s, tok = np.nonzero(lang.probs > 0)
    shifted = np.concatenate([lang.states[s, 1:], tok[:, None]], axis=1)
    np.testing.assert_array_equal(lang.states[lang.next_state[s, tok]], shifted)
    pi = lang.stationary()
    np.testing.assert_allclose(pi @ lang.transition_matrix(), pi, atol=1e-12)


def test_exact_brier_matches_enumeration(tiny_language):
    lang = tiny_language
    exact = lang.brier_by_state(4)  # (S, 4)
    for state in range(len(lang.states)):
        np.testing.assert_allclose(exact[state], _brute_force(lang, state, 4), rtol=1e-12)


def test_monte_carlo_estimator_matches_closed_form(tiny_language):
    """Mean of 1{x1=y} + 1{x2=y} - 1{x1=x2} with y, x1, x2 drawn from the chain in a stationary
    state equals pi^T (T o T)^n 1, within 4 standard errors (fixed seed)."""
    lang = tiny_language
    rng = np.random.default_rng(0)
    num = 40_000
    states = rng.choice(len(lang.states), size=num, p=lang.stationary())
    y, x1, x2 = (torch.as_tensor(lang.sample(states, 4, rng)) for _ in range(3))
    est = brier_estimate(x1, x2, y).double().numpy()  # (num, 4)
    mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(num)
    closed = synthetic.stationary_oracle(lang)["brier"]
    assert (np.abs(mean - closed) < 4 * se).all(), (mean, closed, se)


def test_held_out_oracle_on_sampled_text(tiny_language):
    """On text from the chain, the three views of the true model agree within their errors."""
    lang = tiny_language
    rng = np.random.default_rng(1)
    stream = np.concatenate([np.r_[d, synthetic.EOS_ID] for d in lang.documents(64 * 300, rng)])
    blocks = stream[: len(stream) // 64 * 64].reshape(-1, 64)
    oracle = synthetic.held_out_oracle(lang, blocks, stride=8, seed=0)
    exp, exact, sampled = oracle["expected"], oracle["exact"], oracle["sampled"]
    for j in range(1, 5):
        for other in (exact, sampled):
            diff = abs(other[f"brier{j}"] - exp[f"brier{j}"])
            assert diff < 4 * other[f"brier{j}_se"], (j, other, exp)


class _Sampler:
    """A stand-in for CALM's ``sample_continuations`` (positions every 4 tokens): draws from the
    chain itself, or uniform tokens."""

    def __init__(self, lang, uniform: bool) -> None:
        self.lang, self.uniform, self.rng = lang, uniform, np.random.default_rng(3)

    def sample_continuations(self, tokens, num_samples, generator=None):
        blocks, lang = tokens.numpy(), self.lang
        starts = np.arange(4, blocks.shape[1] - 4 + 1, 4)
        if self.uniform:
            draws = self.rng.integers(0, lang.vocab_size, size=(num_samples, len(blocks), len(starts), 4))
        else:
            states = lang.state_of(blocks[:, starts[:, None] + np.arange(-lang.order, 0)])  # (b, P)
            flat = np.tile(states.reshape(-1), num_samples)
            draws = lang.sample(flat, 4, self.rng).reshape(num_samples, *states.shape, 4)
        return torch.as_tensor(draws), torch.as_tensor(starts)


class _TokenSampler(_Sampler):
    """A stand-in for the token baseline's ``brier_terms``: one continuation per position (every
    token), with its probability under the sampler (the chain's, or ``V^-n``)."""

    def brier_terms(self, tokens, positions, generator=None):
        draws, starts = self.sample_continuations(tokens, 1, generator)
        keep = np.searchsorted(starts.numpy(), positions.numpy())
        x = draws[0][:, keep].numpy()  # (b, P, n)
        if self.uniform:
            q = np.broadcast_to(float(self.lang.vocab_size) ** -np.arange(1, 5), x.shape)
        else:
            states = self.lang.state_of(tokens.numpy()[:, positions.numpy()[:, None] + np.arange(-self.lang.order, 0)])
            q = self.lang.ngram_probs(states, x)
        return SimpleNamespace(samples=torch.as_tensor(x), sample_prob=torch.as_tensor(q.copy()))


@pytest.mark.parametrize("sampler", [_Sampler, _TokenSampler], ids=["samples", "token-model"])
@pytest.mark.parametrize("uniform", [False, True], ids=["true-model", "uniform"])
def test_expected_brier_is_unbiased(tiny_language, uniform, sampler):
    """Samples of the true model score sum P^2 at each state (the oracle); uniform tokens score
    exactly 2 sum P Q - sum Q^2 = V^-n. Within 4 standard errors (fixed seeds)."""
    lang = tiny_language
    rng = np.random.default_rng(2)
    stream = np.concatenate([np.r_[d, synthetic.EOS_ID] for d in lang.documents(64 * 200, rng)])
    blocks = torch.as_tensor(stream[: len(stream) // 64 * 64].reshape(-1, 64))
    result = synthetic.expected_brier(sampler(lang, uniform), lang, blocks, stride=8, seed=0, num_samples=8)
    if uniform:
        truth = [lang.vocab_size**-n for n in range(1, 5)]
    else:
        expected = synthetic.held_out_oracle(lang, blocks.numpy(), stride=8)["expected"]
        truth = [expected[f"brier{n}"] for n in range(1, 5)]
    for j in range(4):
        assert result.brier_se[j] > 0
        assert abs(result.brier[j] - truth[j]) < 4 * result.brier_se[j], (j, result, truth)


def test_languages_have_oracle_between_10_and_30():
    for name in synthetic.LANGUAGES:
        assert 10.0 < synthetic.stationary_oracle(synthetic.make_language(name))["brier_lm"] < 30.0


def test_word_tokenizer_round_trip(tmp_path, tiny_language):
    from calm_models.data import TextTokenizer

    lang = tiny_language
    path = tmp_path / "tokenizer.json"
    synthetic.word_tokenizer(lang).save(str(path))
    tok = TextTokenizer.load(path)
    assert tok.eos_id == synthetic.EOS_ID and tok.vocab_size == lang.vocab_size
    doc = lang.documents(50, np.random.default_rng(0))[0]
    assert tok.encode(" ".join(lang.words[i] for i in doc)) == doc.tolist()


def test_documents_have_the_chains_length_distribution(tiny_language):
    """Every word ends the document with ``end_prob``, so a document holds Geometric(p) words:
    mean 1/p (a sampler that drops documents cut by a window would favour short ones)."""
    lang = tiny_language
    p = synthetic.LANGUAGES["tiny-test"].end_prob
    lengths = np.array([len(d) for d in lang.documents(100_000, np.random.default_rng(0))])
    se = math.sqrt(1 - p) / p / math.sqrt(len(lengths))
    assert abs(lengths.mean() - 1 / p) < 4 * se, (lengths.mean(), 1 / p, se)
    assert lengths.min() >= 1
