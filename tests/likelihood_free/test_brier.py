"""Tests for likelihood_free.brier: exact Brier scores, the two-sample estimate, BrierLM.

Axis key: N positions / Monte Carlo pairs, V vocabulary, n n-gram order, R replicates.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from likelihood_free.brier import BrierLM, BrierLMResult, brier_estimate, brier_lm, brier_score

NUM_PAIRS = 20_000


# ----------------------------------------------------------------------------- helpers


def _decode(idx: torch.Tensor, vocab: int, order: int) -> torch.Tensor:
    """Flat n-gram indices (...,) -> tokens (..., order), first token most significant."""
    powers = vocab ** torch.arange(order - 1, -1, -1)  # (order,)
    return (idx.unsqueeze(-1) // powers) % vocab


def _sample_ngrams(joint: np.ndarray, vocab: int, order: int, shape: tuple, g) -> torch.Tensor:
    """Draw iid n-grams from a joint distribution over V**order outcomes -> (*shape, order)."""
    num = int(np.prod(shape))
    idx = torch.multinomial(torch.from_numpy(joint), num, replacement=True, generator=g)
    return _decode(idx, vocab, order).reshape(*shape, order)


def _exact_prefix_briers(joint: np.ndarray, vocab: int, order: int, y) -> np.ndarray:
    """Brier-k of the k-gram marginal of `joint` at prefix y[:k], k = 1..order, by enumeration."""
    p_y, sum_sq = _prefix_moments(joint, vocab, order, y)
    return 2.0 * p_y - sum_sq


def _prefix_moments(joint: np.ndarray, vocab: int, order: int, y) -> tuple[np.ndarray, np.ndarray]:
    """``(P_k(y[:k]), sum_x P_k(x)^2)`` of the k-gram marginals, k = 1..order."""
    table = joint.reshape((vocab,) * order)
    p_y, sum_sq = [], []
    for k in range(1, order + 1):
        marginal = table.sum(axis=tuple(range(k, order)))  # (V,)*k
        p_y.append(marginal[tuple(y[:k])])
        sum_sq.append((marginal**2).sum())
    return np.array(p_y), np.array(sum_sq)


def _exact_variance(p_y, sum_sq) -> np.ndarray:
    """Variance of one estimate ``1{x1=y} + 1{x2=y} - 1{x1=x2}`` from ``P(y)`` and ``sum_x P(x)^2``.

    The three indicators are 0/1, so ``E[est^2] = 2 p + s + 2 E[h1 h2] - 2 E[h1 c] - 2 E[h2 c]``,
    and ``E[h1 h2] = E[h1 c] = E[h2 c] = p^2`` (each means x1 = x2 = y).
    """
    p, s = np.asarray(p_y, dtype=np.float64), np.asarray(sum_sq, dtype=np.float64)
    return 2 * p + s - 2 * p**2 - (2 * p - s) ** 2


def _bernstein_excess(est: torch.Tensor, exact, variance, delta: float = 1e-6) -> np.ndarray:
    """``|MC mean - exact|`` over the Bernstein bound that it exceeds with probability ``< delta``.

    For ``N`` iid estimates with variance ``v`` and ``|est - E est| <= b = 2`` (values in
    ``[-1, 1]``), ``P(|mean - E| >= t) <= 2 exp(-N t^2 / (2 v + 2 b t / 3))``; solving for
    ``t`` at ``delta`` gives the bound. Unlike a z-test with the sample SE it stays valid for rare
    events (where the sample SE can be 0). Values ``> 1`` are failures.
    """
    e = est.double().reshape(-1, est.shape[-1]).numpy()  # (N, n)
    num, log_term, b = e.shape[0], math.log(2.0 / delta), 2.0
    linear = 2.0 * b * log_term / 3.0
    t = (linear + np.sqrt(linear**2 + 8.0 * num * np.asarray(variance) * log_term)) / (2.0 * num)
    return np.abs(e.mean(axis=0) - np.asarray(exact)) / t


def _naive_estimate(x1: np.ndarray, x2: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Loop-based reference: prefix matches via all() on the first j+1 tokens."""
    out = np.zeros(x1.shape, dtype=np.float64)
    for idx in np.ndindex(*x1.shape[:-1]):
        for j in range(x1.shape[-1]):
            a, b, t = x1[idx][: j + 1], x2[idx][: j + 1], y[idx][: j + 1]
            out[idx + (j,)] = float((a == t).all()) + float((b == t).all()) - float((a == b).all())
    return out


def _metric_data(num: int, seed: int, order: int = 4, vocab: int = 3, mismatch: float = 0.5) -> torch.Tensor:
    """Realistic per-position estimates (num, order): model P, data Q, both random 4-gram laws.

    ``Q = (1 - mismatch) P + mismatch R`` for a random law ``R``; with ``mismatch = 0`` the data
    follow the model and every Brier-k is ``sum_x P_k(x)^2 > 0``.
    """
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    model = rng.dirichlet(np.full(vocab**order, 0.3))
    data = (1 - mismatch) * model + mismatch * rng.dirichlet(np.ones(vocab**order))
    x = _sample_ngrams(model, vocab, order, (2, num), g)
    y = _sample_ngrams(data, vocab, order, (num,), g)
    return brier_estimate(x[0], x[1], y)


def _reference(est: np.ndarray) -> dict:
    """Direct numpy computation of means, SEs, BrierLM and its delta-method SE."""
    num, n = est.shape
    mean = est.mean(axis=0)
    cov = np.cov(est, rowvar=False, ddof=1).reshape(n, n)

    def lm(b):
        return 100.0 * max(np.prod(b), 0.0) ** (1.0 / n)

    # dBrierLM/db by float64 autograd through 100 * exp(mean(log b)): exact up to rounding
    b = torch.tensor(mean, dtype=torch.float64, requires_grad=True)
    (100.0 * b.log().mean().exp()).backward()
    grad = b.grad.numpy()
    return {
        "brier": mean,
        "brier_se": np.sqrt(np.diag(cov) / num),
        "brier_lm": lm(mean),
        "brier_lm_se": math.sqrt(grad @ cov @ grad / num),
        "count": num,
    }


def _assert_results_close(a: BrierLMResult, b: BrierLMResult, rtol: float = 1e-10) -> None:
    da, db = a.to_dict(), b.to_dict()
    assert da.keys() == db.keys()
    assert da["count"] == db["count"]
    np.testing.assert_allclose([v for v in da.values()], [v for v in db.values()], rtol=rtol, atol=1e-12)


# ----------------------------------------------------------------------------- brier_score


def test_brier_score_hand_checked_values():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1 / 3] * 3])
    target = torch.tensor([0, 1, 0, 2, 1])
    # sum P^2 = 0.375 for the first rows: 2*0.5-0.375, 2*0.25-0.375; point mass: 1 and -1.
    expected = torch.tensor([0.625, 0.125, 1.0, -1.0, 1 / 3])
    torch.testing.assert_close(brier_score(probs, target), expected)


def test_brier_score_equals_one_minus_squared_error():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 3, 7, generator=g, dtype=torch.float64).softmax(-1)  # (2, 3, V)
    target = torch.randint(0, 7, (2, 3), generator=g)
    onehot = torch.nn.functional.one_hot(target, 7).double()
    naive = 1.0 - ((probs - onehot) ** 2).sum(-1)
    out = brier_score(probs, target)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    torch.testing.assert_close(out, naive, rtol=0, atol=1e-14)


def test_brier_score_low_precision_keeps_dtype_and_uses_fp32_math():
    g = torch.Generator().manual_seed(1)
    probs32 = torch.rand(4, 50, generator=g).softmax(-1)
    probs16 = probs32.to(torch.bfloat16)
    target = torch.arange(4)
    out = brier_score(probs16, target)
    assert out.dtype == torch.bfloat16
    ref = brier_score(probs16.float(), target, validate=False)  # same inputs, fp32 math
    # bit-identical to rounding the fp32 result (bf16 arithmetic would differ in row 1)
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=0, atol=0)


def test_brier_score_validation_errors():
    probs = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    with pytest.raises(TypeError, match="probs"):
        brier_score(torch.tensor([[1, 0]]), torch.tensor([0]))
    with pytest.raises(TypeError, match="target"):
        brier_score(probs, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        brier_score(probs, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="V >= 1"):
        brier_score(torch.zeros(2, 0), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        brier_score(probs, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        brier_score(probs, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="sum to 1"):
        brier_score(torch.tensor([[0.5, 0.6]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="nonnegative"):
        brier_score(torch.tensor([[1.5, -0.5]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="NaN"):
        brier_score(torch.tensor([[math.nan, 1.0]]), torch.tensor([0]))


@pytest.mark.parametrize("atol", [math.nan, -1e-3, math.inf, -math.inf])
def test_brier_score_refuses_a_bad_atol(atol):
    probs = torch.tensor([[0.5, 0.6]])  # sums to 1.1: a nan tolerance would let it through
    for validate in (True, False):
        with pytest.raises(ValueError, match="atol must be a nonnegative finite number"):
            brier_score(probs, torch.tensor([0]), atol=atol, validate=validate)


def test_brier_score_atol_type_and_zero():
    with pytest.raises(TypeError, match="atol"):
        brier_score(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), atol="1e-3")
    with pytest.raises(TypeError, match="atol"):
        brier_score(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), atol=True)
    exact = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)  # sums to 1 exactly
    assert brier_score(exact, torch.tensor([0]), atol=0).item() == 0.625


def test_brier_score_without_validation():
    # No host checks: unnormalised input is the caller's business, bad targets give NaN.
    out = brier_score(torch.tensor([[0.5, 0.6], [0.5, 0.5]]), torch.tensor([0, 5]), validate=False)
    assert out[0].item() == pytest.approx(1.0 - 0.61)
    assert math.isnan(out[1].item())


# ----------------------------------------------------------------------------- brier_estimate


def test_brier_estimate_unigram_cases():
    y = torch.tensor([[3], [3], [3], [3], [3]])
    x1 = torch.tensor([[3], [3], [1], [1], [1]])
    x2 = torch.tensor([[3], [0], [3], [1], [2]])
    # both hit: 1+1-1; one hit: 1; one hit: 1; miss + collision: -1; miss, distinct: 0
    expected = torch.tensor([[1.0], [1.0], [1.0], [-1.0], [0.0]])
    out = brier_estimate(x1, x2, y)
    assert out.dtype == torch.get_default_dtype()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_brier_estimate_ngram_hand_checked():
    y = torch.tensor([1, 2, 3, 4])
    cases = [
        ([1, 2, 3, 4], [1, 2, 3, 4], [1.0, 1.0, 1.0, 1.0]),
        ([1, 2, 9, 4], [1, 2, 9, 4], [1.0, 1.0, -1.0, -1.0]),  # collide after the prefix breaks
        ([1, 2, 9, 4], [1, 2, 3, 0], [1.0, 1.0, 1.0, 0.0]),
        ([0, 2, 3, 4], [5, 2, 3, 4], [0.0, 0.0, 0.0, 0.0]),  # first token wrong: nothing counts
        ([0, 2, 3, 4], [0, 2, 3, 4], [-1.0, -1.0, -1.0, -1.0]),
    ]
    for a, b, exp in cases:
        out = brier_estimate(torch.tensor(a), torch.tensor(b), y)
        torch.testing.assert_close(out, torch.tensor(exp), rtol=0, atol=0)


@given(seed=st.integers(0, 2**31 - 1), order=st.integers(1, 5), vocab=st.integers(2, 3))
def test_brier_estimate_matches_naive_prefix_and_is_symmetric(seed, order, vocab):
    g = torch.Generator().manual_seed(seed)
    x1, x2, y = torch.randint(0, vocab, (3, 4, 6, order), generator=g)
    out = brier_estimate(x1, x2, y)
    assert out.shape == (4, 6, order)
    np.testing.assert_array_equal(out.numpy(), _naive_estimate(x1.numpy(), x2.numpy(), y.numpy()))
    torch.testing.assert_close(brier_estimate(x2, x1, y), out, rtol=0, atol=0)


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_brier_estimate_mismatch_zeroes_later_orders(j):
    n = 4
    y = torch.tensor([7, 8, 9, 10])
    x = y.clone()
    x[j] = 0  # single mismatch at position j
    never = torch.tensor([50, 51, 52, 53])  # matches neither y nor x anywhere
    hit = torch.tensor([1.0] * j + [0.0] * (n - j))
    torch.testing.assert_close(brier_estimate(x, never, y), hit, rtol=0, atol=0)
    # x1 = x2 = x: the collision term survives the mismatch, the hits do not
    torch.testing.assert_close(brier_estimate(x, x, y), 2 * hit - 1, rtol=0, atol=0)


def test_brier_estimate_dtypes_and_errors():
    a = torch.tensor([[True, False]])
    out = brier_estimate(a, a, torch.tensor([[1, 0]], dtype=torch.int32))
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0]]))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert brier_estimate(a, a, a).dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)
    ints = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="x1"):
        brier_estimate(ints.float(), ints, ints)
    with pytest.raises(TypeError, match="target"):
        brier_estimate(ints, ints, ints.double())
    with pytest.raises(TypeError, match="x2"):
        brier_estimate(ints, [0, 0, 0], ints)
    with pytest.raises(ValueError, match="same shape"):
        brier_estimate(ints, ints[:, :2], ints)
    with pytest.raises(ValueError, match="n >= 1"):
        brier_estimate(ints[:, :0], ints[:, :0], ints[:, :0])
    with pytest.raises(ValueError, match="n >= 1"):
        brier_estimate(torch.tensor(1), torch.tensor(1), torch.tensor(1))


# ----------------------------------------------------------------------------- unbiasedness


@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 8),
    alpha=st.sampled_from([0.3, 1.0, 5.0]),
    target=st.integers(0, 7),
)
def test_brier_estimate_unbiased_unigram(seed, vocab, alpha, target):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(vocab, alpha))  # (V,)
    g = torch.Generator().manual_seed(seed)
    x = _sample_ngrams(probs, vocab, 1, (2, NUM_PAIRS), g)  # (2, N, 1)
    y = torch.full((NUM_PAIRS, 1), target % vocab)
    est = brier_estimate(x[0], x[1], y)  # (N, 1)
    exact = brier_score(torch.from_numpy(probs), torch.tensor(target % vocab))
    variance = _exact_variance([probs[target % vocab]], [(probs**2).sum()])
    assert _bernstein_excess(est, [exact.item()], variance).max() <= 1.0


@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 3),
    order=st.integers(2, 3),
    alpha=st.sampled_from([0.3, 1.0]),
    target_from_model=st.booleans(),
)
def test_brier_estimate_unbiased_ngrams(seed, vocab, order, alpha, target_from_model):
    rng = np.random.default_rng(seed)
    joint = rng.dirichlet(np.full(vocab**order, alpha))  # (V**n,)
    if target_from_model:
        y = np.array(np.unravel_index(rng.choice(vocab**order, p=joint), (vocab,) * order))
    else:
        y = rng.integers(0, vocab, order)
    g = torch.Generator().manual_seed(seed)
    x = _sample_ngrams(joint, vocab, order, (2, NUM_PAIRS), g)  # (2, N, n)
    est = brier_estimate(x[0], x[1], torch.from_numpy(y).expand(NUM_PAIRS, order))
    exact = _exact_prefix_briers(joint, vocab, order, y)
    variance = _exact_variance(*_prefix_moments(joint, vocab, order, y))
    assert _bernstein_excess(est, exact, variance).max() <= 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unbiasedness_check_detects_biased_variants(seed):
    vocab, order = 3, 3
    rng = np.random.default_rng(seed)
    joint = rng.dirichlet(np.ones(vocab**order))
    y = rng.integers(0, vocab, order)
    exact = _exact_prefix_briers(joint, vocab, order, y)
    variance = _exact_variance(*_prefix_moments(joint, vocab, order, y))
    g = torch.Generator().manual_seed(seed)
    x1, x2 = _sample_ngrams(joint, vocab, order, (2, NUM_PAIRS), g)
    yt = torch.from_numpy(y).expand(NUM_PAIRS, order)
    assert _bernstein_excess(brier_estimate(x1, x2, yt), exact, variance).max() <= 1.0
    # Omitting the collision term estimates 2 P(y) instead: biased by sum P^2.
    hits = brier_estimate(x1, x2, yt) + torch.cumprod((x1 == x2).float(), dim=-1)
    assert _bernstein_excess(hits, exact, variance).min() > 1.0
    # Reusing one sample (x2 := x1) estimates 2 P(y) - 1: biased by 1 - sum P^2.
    assert _bernstein_excess(brier_estimate(x1, x1, yt), exact, variance).min() > 1.0


# ----------------------------------------------------------------------------- brier_lm


def test_brier_lm_exact_values_and_clamping():
    briers = torch.tensor(
        [
            [0.5, 0.5, 0.5, 0.5],
            [0.8, 0.4, 0.2, 0.1],
            [1.0, 1.0, 1.0, 1.0],
            [0.5, -0.1, 0.3, 0.2],  # negative product -> 0
            [0.5, 0.0, 0.3, 0.2],  # zero product -> 0
            [0.5, -0.5, -0.5, 0.5],  # two negatives: still 0 (each factor is clamped)
        ],
        dtype=torch.float64,
    )
    expected = torch.tensor([50.0, 100 * 0.0064**0.25, 100.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    out = brier_lm(briers)
    assert out.dtype == torch.float64 and out.shape == (6,)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(brier_lm(torch.tensor([[0.3], [-0.3]])), torch.tensor([30.0, 0.0]))
    assert brier_lm(briers.reshape(2, 3, 4)).shape == (2, 3)
    assert brier_lm(briers.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_brier_lm_low_precision_by_value(dtype):
    """bf16/fp16 input: computed in fp32, so within half an ulp of the fp64 value (plus fp32)."""
    g = torch.Generator().manual_seed(3)
    briers = (0.05 + 0.9 * torch.rand(4000, 4, generator=g, dtype=torch.float64)).to(dtype)
    out = brier_lm(briers)
    assert out.dtype == dtype
    exact = brier_lm(briers.double())  # fp64 arithmetic on the same rounded inputs
    ulp = torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(exact))  # spacing at exact
    err = (out.double() - exact).abs()
    assert bool((err <= 0.5 * ulp + 1e-6 * exact).all()), float((err / ulp).max())


@pytest.mark.parametrize("briers", [[1.5, 0.5], [-1.01, 0.5], [math.nan, 0.5], [math.inf, 0.5], [50.0, 40.0]])
def test_brier_lm_refuses_values_outside_the_brier_range(briers):
    for value in (torch.tensor(briers), torch.tensor(briers, dtype=torch.float64), briers):
        with pytest.raises(ValueError, match=r"briers must hold Brier scores.*\[-1, 1\]"):
            brier_lm(value)


def test_brier_lm_accepts_array_likes():
    expected = torch.tensor(100 * 0.0064**0.25)
    torch.testing.assert_close(brier_lm([0.8, 0.4, 0.2, 0.1]), expected)
    torch.testing.assert_close(brier_lm((0.8, 0.4, 0.2, 0.1)), expected)
    out = brier_lm(np.array([[0.8, 0.4, 0.2, 0.1], [1.0, 1.0, 1.0, 1.0]]))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor([100 * 0.0064**0.25, 100.0], dtype=torch.float64))
    assert brier_lm([1, 0]).item() == 0.0  # integers in range are scores too
    assert brier_lm(np.float32(0.25)[None]).dtype == torch.float32
    with pytest.raises(TypeError, match="briers"):
        brier_lm(["a", "b"])
    with pytest.raises(TypeError, match="briers"):
        brier_lm([True, False])


def test_brier_lm_of_small_scores_does_not_underflow():
    # prod(b) ** (1/n) underflows: 1e-48 is below float32's smallest subnormal.
    small = torch.full((4,), 1e-12)
    torch.testing.assert_close(brier_lm(small), torch.tensor(1e-10))
    torch.testing.assert_close(brier_lm(small.to(torch.bfloat16)).float(), torch.tensor(1e-10), rtol=1e-2, atol=0)
    metric = BrierLM(max_order=40)  # 40 means of 1e-9: a float64 product of 1e-360
    metric.update(torch.full((3, 40), 1e-9, dtype=torch.float64))
    assert metric.compute().brier_lm == pytest.approx(1e-7, rel=1e-9)


def test_brier_lm_errors():
    with pytest.raises(TypeError, match="briers"):
        brier_lm(torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="n >= 1"):
        brier_lm(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="n >= 1"):
        brier_lm(torch.tensor(0.5))


# ----------------------------------------------------------------------------- BrierLM metric


def test_metric_matches_numpy_reference():
    est = _metric_data(3000, seed=0, mismatch=0.0)  # positive Brier scores: BrierLM has an SE
    metric = BrierLM()
    metric.update(est)
    res = metric.compute()
    ref = _reference(est.double().numpy())
    assert res.count == ref["count"] == 3000
    assert all(b > 0 for b in res.brier)
    np.testing.assert_allclose(res.brier, ref["brier"], rtol=1e-12)
    np.testing.assert_allclose(res.brier_se, ref["brier_se"], rtol=1e-10)
    assert res.brier_lm == pytest.approx(ref["brier_lm"], rel=1e-12)
    assert res.brier_lm_se == pytest.approx(ref["brier_lm_se"], rel=1e-6)
    assert res.brier_lm == pytest.approx(brier_lm(torch.tensor(res.brier)).item(), rel=1e-6)
    d = res.to_dict()
    assert list(d) == [
        "brier1", "brier1_se", "brier2", "brier2_se", "brier3", "brier3_se", "brier4",
        "brier4_se", "brier_lm", "brier_lm_se", "count",
    ]  # fmt: skip
    assert d["brier3_se"] == res.brier_se[2] and d["count"] == 3000


def test_metric_accumulates_in_float64():
    """Non-integer estimates (float32, like a probability-based estimate): the sums are exact to
    float64 rounding, which float32 accumulation (relative error ~1e-7) would fail."""
    g = torch.Generator().manual_seed(7)
    est = (2 * torch.rand(200_000, 3, generator=g) - 1).float()  # non-integer, in [-1, 1]
    est[:, 1] = 0.3 + 0.01 * est[:, 1]  # a nearly constant column: its SE cancels badly
    metric = BrierLM(max_order=3)
    for chunk in est.split(25_000):
        metric.update(chunk)
    res = metric.compute()
    ref = _reference(est.double().numpy())
    np.testing.assert_allclose(res.brier, ref["brier"], rtol=1e-12)
    np.testing.assert_allclose(res.brier_se, ref["brier_se"], rtol=1e-9)
    assert metric.state_dict()["sum"].dtype == torch.float64


def test_metric_chunked_updates_equal_one_update():
    est = _metric_data(1000, seed=1)
    whole = BrierLM()
    whole.update(est)
    chunked = BrierLM()
    chunked.update(est[:1])
    chunked.update(est[1:301].reshape(30, 10, 4))  # extra batch axes
    chunked.update(est[301:301])  # empty chunk
    chunked.update(est[301:].to(torch.float64))
    _assert_results_close(chunked.compute(), whole.compute())


def test_metric_mask_selects_positions():
    est = _metric_data(600, seed=2).reshape(20, 30, 4)
    mask = torch.rand(20, 30, generator=torch.Generator().manual_seed(2)) < 0.6
    poisoned = est.masked_fill(~mask.unsqueeze(-1), math.nan)  # masked values never read
    masked = BrierLM()
    masked.update(poisoned, mask=mask)
    direct = BrierLM()
    direct.update(est[mask])
    assert masked.compute().count == int(mask.sum())
    _assert_results_close(masked.compute(), direct.compute())


def test_metric_state_dict_round_trip_and_copy():
    est = _metric_data(500, seed=3)
    metric = BrierLM()
    metric.update(est[:300])
    state = metric.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = BrierLM()
    restored.load_state_dict(torch.load(buf))
    _assert_results_close(restored.compute(), metric.compute())
    metric.update(est[300:])  # the saved state is a copy
    assert int(state["count"]) == 300
    restored.update(est[300:])
    _assert_results_close(restored.compute(), metric.compute())
    with pytest.raises(ValueError, match="max_order"):
        BrierLM(max_order=3).load_state_dict(state)
    with pytest.raises(ValueError, match="keys"):
        BrierLM().load_state_dict({"count": 1})
    bad = dict(state, sum=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="shapes"):
        BrierLM().load_state_dict(bad)
    for count in (torch.tensor(-1), -5, torch.tensor(2.5), math.nan):
        with pytest.raises(ValueError, match="count must be a nonnegative integer"):
            BrierLM().load_state_dict(dict(state, count=count))
    fresh = BrierLM()
    fresh.load_state_dict(dict(state, count=torch.tensor(300.0)))  # an integral float is fine
    assert fresh.compute().count == 300


def test_metric_merge_equals_joint_and_reset():
    est = _metric_data(900, seed=4)
    a, b, joint = BrierLM(), BrierLM(), BrierLM()
    a.update(est[:200])
    b.update(est[200:])
    joint.update(est)
    b_before = b.compute()
    assert a.merge(b) is a
    _assert_results_close(a.compute(), joint.compute())
    _assert_results_close(b.compute(), b_before)  # other untouched
    a.reset()
    assert a.compute().count == 0
    with pytest.raises(ValueError, match="max_order"):
        a.merge(BrierLM(max_order=2))
    with pytest.raises(TypeError, match="BrierLM"):
        a.merge(joint.compute())


def test_metric_edge_cases():
    empty = BrierLM(max_order=2).compute()
    assert empty.count == 0
    assert all(math.isnan(v) for k, v in empty.to_dict().items() if k != "count")
    one = BrierLM(max_order=2)
    one.update(torch.tensor([[1.0, 1.0]]))
    r = one.compute()
    assert r.brier == (1.0, 1.0) and r.brier_lm == 100.0 and r.count == 1
    assert all(math.isnan(s) for s in r.brier_se) and math.isnan(r.brier_lm_se)
    neg = BrierLM(max_order=2)
    neg.update(torch.tensor([[1.0, -1.0], [1.0, 0.0], [0.0, -1.0]]))
    r = neg.compute()  # b = (2/3, -2/3): clamped BrierLM, SE undefined
    assert r.brier_lm == 0.0 and math.isnan(r.brier_lm_se)
    assert r.brier_se[0] == pytest.approx(math.sqrt(1 / 3 / 3))  # var of (1, 1, 0) is 1/3


def test_metric_input_errors():
    metric = BrierLM(max_order=4)
    with pytest.raises(ValueError, match="max_order=4"):
        metric.update(torch.zeros(5, 3))
    with pytest.raises(TypeError, match="estimates"):
        metric.update(torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        metric.update(torch.zeros(5, 4), mask=torch.ones(5))
    with pytest.raises(ValueError, match="mask must have shape"):
        metric.update(torch.zeros(5, 4), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_order"):
        BrierLM(max_order=0)
    assert metric.compute().count == 0  # failed updates left no trace


def test_metric_se_calibrated_across_replicates():
    """Std of BrierLM over independent datasets ~ mean reported delta-method SE."""
    vocab, order, reps, num = 3, 4, 400, 2000

    # Sticky Markov chains: model stays with prob 0.8, data with prob 0.7.
    def chain(first, stay):
        trans = np.full((vocab, vocab), (1 - stay) / (vocab - 1))
        np.fill_diagonal(trans, stay)
        joint = np.asarray(first, dtype=np.float64)  # (V,)*k, extended one token at a time
        for _ in range(order - 1):
            joint = joint[..., None] * trans  # P(..., a, b) = P(..., a) T[a, b]
        return joint.reshape(-1)

    model = chain([0.8, 0.1, 0.1], 0.8)
    data = chain([0.7, 0.2, 0.1], 0.7)
    assert model.sum() == pytest.approx(1.0) and data.sum() == pytest.approx(1.0)
    g = torch.Generator().manual_seed(123)
    x = _sample_ngrams(model, vocab, order, (2, reps, num), g)
    y = _sample_ngrams(data, vocab, order, (reps, num), g)
    est = brier_estimate(x[0], x[1], y)  # (R, N, n)
    lms, ses, diag_ses = [], [], []
    for r in range(reps):
        metric = BrierLM(max_order=order)
        metric.update(est[r])
        res = metric.compute()
        lms.append(res.brier_lm)
        ses.append(res.brier_lm_se)
        grad = res.brier_lm / (order * np.array(res.brier))
        diag_ses.append(math.sqrt(np.sum(grad**2 * np.array(res.brier_se) ** 2)))
    empirical = np.std(lms, ddof=1)
    assert np.mean(ses) == pytest.approx(empirical, rel=0.15)
    # The check is sensitive: ignoring the covariance between orders would fail it.
    assert abs(np.mean(diag_ses) / empirical - 1) > 0.15


# ----------------------------------------------------------------------------- distributed


def _dist_worker(rank: int, world: int, init_file: str, data_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        est = torch.load(data_file)
        split = 700  # unequal shards: averaging instead of summing would be caught
        metric = BrierLM()
        metric.update(est[:split] if rank == 0 else est[split:])
        before = metric.state_dict()
        result = metric.compute()
        after = metric.state_dict()
        unchanged = all(torch.equal(before[k], after[k]) for k in ("count", "sum", "sum_outer"))
        local = int(after["count"])
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({"result": result.to_dict(), "unchanged": unchanged, "local": local})
        )
    finally:
        dist.destroy_process_group()


def test_metric_all_reduces_across_processes(tmp_path):
    est = _metric_data(2000, seed=5)
    data_file = tmp_path / "est.pt"
    torch.save(est, data_file)
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(data_file), str(tmp_path)), nprocs=world, join=True)
    single = BrierLM()
    single.update(est)
    expected = single.compute().to_dict()
    for rank, local in [(0, 700), (1, 1300)]:
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["unchanged"] and out["local"] == local
        assert out["result"].keys() == expected.keys()
        np.testing.assert_allclose(list(out["result"].values()), list(expected.values()), rtol=1e-10)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_follows_device_without_host_sync():
    est = _metric_data(1000, seed=6)
    cpu = BrierLM()
    cpu.update(est)
    gpu = BrierLM()
    est_cuda = est.cuda()
    gpu.update(est_cuda[:10])  # first update moves the state to the GPU
    assert gpu.device.type == "cuda"
    mask = torch.ones(990, dtype=torch.bool, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu.update(est_cuda[10:], mask=mask)
        x = torch.randint(0, 3, (3, 8, 4), device="cuda")
        out = brier_estimate(x[0], x[1], x[2])
        probs = torch.rand(8, 5, device="cuda").softmax(-1)
        score = brier_score(probs, x[0, :, 0], validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and score.device.type == "cuda"
    _assert_results_close(gpu.compute(), cpu.compute(), rtol=1e-9)
