"""Tests for likelihood_free.energy: exact values, invariances, naive parity, dtypes, gradients,
unbiasedness and propriety of the Monte Carlo energy score.

Axis key: n model draws, m target draws, b batch axes, d features, R Monte Carlo replicates.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from likelihood_free.energy import energy_loss, energy_score, mixture_energy_loss, mixture_energy_score

Z = 5.0  # Monte Carlo tolerance in standard errors
REPLICATES = 4000

# ----------------------------------------------------------------------------- references


def _naive_score(samples: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """The estimator written as a double loop over draws, in float64 -> (*batch)."""
    x, y = samples.double(), targets.double()
    n, m = x.shape[0], y.shape[0]
    spread = sum(torch.linalg.vector_norm(x[i] - x[j], dim=-1) ** beta for i in range(n) for j in range(n) if i != j)
    fit = sum(torch.linalg.vector_norm(x[i] - y[k], dim=-1) ** beta for i in range(n) for k in range(m))
    return spread / (n * (n - 1)) - 2.0 * fit / (n * m)


def _subgradient_of_sum_loss(samples: torch.Tensor, targets: torch.Tensor, beta: float):
    """d/d samples of energy_loss(reduction="sum"), coincident pairs contributing 0; float64."""
    x, y = samples.double(), targets.double()
    n, m = x.shape[0], y.shape[0]

    def pull(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = a - b  # (*batch, d)
        r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
        w = torch.where(r > 0, beta * r.clamp_min(1e-300) ** (beta - 2.0), 0.0)
        return w * diff  # gradient of ||a - b||^beta with respect to a

    grad = torch.zeros_like(x)
    for i in range(n):
        spread = sum(pull(x[i], x[j]) for j in range(n) if j != i)
        fit = sum(pull(x[i], y[k]) for k in range(m))
        # loss = -(1/(n(n-1)) sum_{i!=j} + 2/(nm) sum_{i,k}); each unordered pair appears twice
        grad[i] = -2.0 * spread / (n * (n - 1)) + 2.0 * fit / (n * m)
    return grad


def _mean_abs_normal(mu: float, s: float) -> float:
    """E|Z| for Z ~ N(mu, s^2)."""
    phi = 0.5 * (1.0 + math.erf(-mu / s / math.sqrt(2.0)))  # Phi(-mu/s)
    return s * math.sqrt(2.0 / math.pi) * math.exp(-(mu**2) / (2 * s**2)) + mu * (1 - 2 * phi)


def _exact_gaussian_score(mu1: float, s1: float, mu2: float, s2: float) -> float:
    """E|X - X'| - 2 E|X - Y| for X, X' ~ N(mu1, s1^2), Y ~ N(mu2, s2^2), beta = 1."""
    return _mean_abs_normal(0.0, math.sqrt(2.0) * s1) - 2.0 * _mean_abs_normal(mu1 - mu2, math.hypot(s1, s2))


def _gaussian_draws(mu1, s1, mu2, s2, n, m, seed, replicates=REPLICATES):
    g = torch.Generator().manual_seed(seed)
    samples = mu1 + s1 * torch.randn(n, replicates, 1, generator=g)  # (n, R, 1)
    targets = mu2 + s2 * torch.randn(m, replicates, 1, generator=g)  # (m, R, 1)
    return samples, targets


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    return v.mean().item(), (v.std() / math.sqrt(v.numel())).item()


# ----------------------------------------------------------------------------- exact values


def test_exact_value_one_dimension() -> None:
    samples = torch.tensor([[0.0], [2.0]])
    targets = torch.tensor([[3.0]])
    # |0-2| - 2 * (|0-3| + |2-3|) / 2 = 2 - 4
    assert energy_score(samples, targets).item() == pytest.approx(-2.0, abs=1e-6)


@pytest.mark.parametrize(
    ("beta", "expected"),
    [
        (1.0, 5.0 - (10.0 + 5.0)),  # ||x1-x2|| = 5, ||x1-y|| = 10, ||x2-y|| = 5
        (0.5, 5.0**0.5 - (10.0**0.5 + 5.0**0.5)),
        (1.5, 5.0**1.5 - (10.0**1.5 + 5.0**1.5)),
    ],
)
def test_exact_value_two_dimensions(beta: float, expected: float) -> None:
    samples = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    targets = torch.tensor([[6.0, 8.0]])
    assert energy_score(samples, targets, beta=beta).item() == pytest.approx(expected, rel=1e-6)


def test_exact_value_three_draws_two_targets() -> None:
    samples = torch.tensor([[0.0], [1.0], [3.0]])
    targets = torch.tensor([[1.0], [5.0]])
    # sum_{i != j} |xi - xj| = 2 * (1 + 3 + 2) = 12 -> 12 / 6 = 2
    # sum_{i,k} |xi - yk| = (1 + 5) + (0 + 4) + (2 + 2) = 14 -> 14 / 6
    expected = 2.0 - 2.0 * 14.0 / 6.0
    assert energy_score(samples, targets).item() == pytest.approx(expected, rel=1e-6)


def test_batched_values_match_per_element_calls() -> None:
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(4, 3, 2, 5, generator=g)
    targets = torch.randn(6, 3, 2, 5, generator=g)
    batched = energy_score(samples, targets, beta=1.5)
    assert batched.shape == (3, 2)
    for a, b in itertools.product(range(3), range(2)):
        single = energy_score(samples[:, a, b], targets[:, a, b], beta=1.5)
        torch.testing.assert_close(batched[a, b], single, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- naive parity


@pytest.mark.parametrize(
    ("n", "m", "batch", "d"),
    [(2, 1, (), 3), (5, 4, (), 1), (4, 3, (3,), 1), (3, 7, (2, 3), 4), (6, 2, (2, 1, 2), 7), (8, 5, (3,), 16)],
)
@pytest.mark.parametrize("beta", [0.5, 1.0, 1.5])
def test_matches_naive_double_loop(n, m, batch, d, beta) -> None:
    g = torch.Generator().manual_seed(hash((n, m, batch, d)) % 2**31)
    samples = torch.randn(n, *batch, d, generator=g, dtype=torch.float64)
    targets = 0.5 + 2.0 * torch.randn(m, *batch, d, generator=g, dtype=torch.float64)
    expected = _naive_score(samples, targets, beta)
    got = energy_score(samples, targets, beta=beta)
    assert got.shape == batch and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    got32 = energy_score(samples.float(), targets.float(), beta=beta)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs() -> None:
    g = torch.Generator().manual_seed(1)
    samples = torch.randn(3, 5, 4, 6, generator=g).transpose(1, 2)  # (n=3, 4, 5, d=6)
    targets = torch.randn(2, 4, 5, 12, generator=g)[..., ::2]  # strided feature axis
    torch.testing.assert_close(
        energy_score(samples, targets).double(), _naive_score(samples, targets, 1.0), rtol=1e-5, atol=1e-5
    )


def test_empty_batch() -> None:
    assert energy_score(torch.randn(3, 0, 4), torch.randn(2, 0, 4)).shape == (0,)


# ----------------------------------------------------------------------------- invariances


def test_permuting_draws_changes_nothing() -> None:
    g = torch.Generator().manual_seed(2)
    samples = torch.randn(7, 5, 9, generator=g)
    targets = torch.randn(11, 5, 9, generator=g)
    base = energy_score(samples, targets, beta=0.5)
    shuffled = energy_score(samples[torch.randperm(7, generator=g)], targets[torch.randperm(11, generator=g)], beta=0.5)
    torch.testing.assert_close(shuffled, base, rtol=1e-5, atol=1e-6)


def test_translation_and_rotation_change_nothing() -> None:
    g = torch.Generator().manual_seed(3)
    samples = torch.randn(5, 4, 6, generator=g, dtype=torch.float64)
    targets = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    base = energy_score(samples, targets)
    shift = 25.0 * torch.randn(4, 6, generator=g, dtype=torch.float64)  # one shift per element
    torch.testing.assert_close(energy_score(samples + shift, targets + shift), base)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    torch.testing.assert_close(energy_score(samples @ rotation, targets @ rotation), base)


def test_float32_accurate_far_from_origin() -> None:
    """|a|^2 + |b|^2 - 2 a.b cancels catastrophically at 1e3 from the origin unless centred."""
    g = torch.Generator().manual_seed(4)
    n, m, b, d = 8, 100, 16, 128
    offset = 1e3 * torch.randn(b, d, generator=g)
    samples = offset + torch.randn(n, b, d, generator=g)  # float32
    targets = offset + 0.5 + torch.randn(m, b, d, generator=g)
    got = energy_score(samples, targets)
    expected = _naive_score(samples, targets, 1.0)  # float64 on the same float32 values
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=0.0)


def test_float32_accurate_for_clustered_draws() -> None:
    """Model draws 1e-3 apart next to targets far away: the spread term must stay accurate."""
    g = torch.Generator().manual_seed(5)
    samples = 10.0 + 1e-3 * torch.randn(8, 32, 16, generator=g)
    targets = torch.randn(20, 32, 16, generator=g)
    got = energy_score(samples, targets)
    expected = _naive_score(samples, targets, 1.0)
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=0.0)
    # Targets inside the cluster: every distance is ~1e-3 while the points sit 10 from the origin.
    torch.testing.assert_close(
        energy_score(samples, samples[:2]).double(), _naive_score(samples, samples[:2], 1.0), rtol=1e-5, atol=0.0
    )


@pytest.mark.parametrize("d", [1, 2, 4])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_float32_accurate_for_close_pairs_at_small_d(d: int, beta: float) -> None:
    """Two draws 1e-4 apart among draws spread over ~1: at small d such pairs are common.

    The Gram formula's rounding (~sqrt(32 eps) = 2e-3 of the spread) would count the pair as
    coincident and lose ~(1e-4)^beta / (n (n - 1)) of the score.
    """
    g = torch.Generator().manual_seed(12)
    samples = torch.randn(5, 64, d, generator=g)
    samples[1] = samples[0] + 1e-4 * torch.randn(64, d, generator=g)
    targets = torch.randn(3, 64, d, generator=g)
    got = energy_score(samples, targets, beta=beta)
    expected = _naive_score(samples, targets, beta)  # float64 on the same float32 values
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(low: torch.dtype) -> None:
    g = torch.Generator().manual_seed(6)
    samples = torch.randn(8, 6, 32, generator=g)
    targets = 0.3 + torch.randn(10, 6, 32, generator=g)
    got = energy_score(samples.to(low), targets.to(low))
    assert got.dtype == torch.float32
    # Identical to float32 arithmetic on the rounded inputs ...
    exact_on_rounded = energy_score(samples.to(low).float(), targets.to(low).float())
    torch.testing.assert_close(got, exact_on_rounded, rtol=1e-6, atol=1e-6)
    # ... and close to float32 arithmetic on the unrounded ones (input rounding only).
    torch.testing.assert_close(got, energy_score(samples, targets), rtol=2e-2, atol=2e-2)
    # The loss back-propagates to the inputs in their own dtype.
    leaf = samples.to(low).requires_grad_()
    energy_loss(leaf, targets.to(low)).backward()
    assert leaf.grad.dtype == low and torch.isfinite(leaf.grad.float()).all()


def test_float64_wins_mixed_dtypes() -> None:
    samples = torch.randn(3, 2, 4)
    targets = torch.randn(2, 2, 4, dtype=torch.float64)
    assert energy_score(samples, targets).dtype == torch.float64
    assert energy_score(samples.double(), targets.float()).dtype == torch.float64


def _autocast_case(d: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(11 + d)
    samples = torch.randn(8, 64, d, generator=g).to(device)
    targets = (0.5 + torch.randn(100, 64, d, generator=g)).to(device)
    return samples, targets


@pytest.mark.parametrize("d", [2, 128])  # difference path and Gram (matmul) path
@pytest.mark.parametrize("low", [None, torch.bfloat16])  # float32 or bfloat16 inputs
def test_autocast_cpu_keeps_float32_arithmetic(d: int, low) -> None:
    """Under bf16 autocast the result is float32 and as accurate as without it (issue 14.7)."""
    samples, targets = _autocast_case(d)
    if low is not None:
        samples, targets = samples.to(low), targets.to(low)
    exact = energy_score(samples.double(), targets.double())  # float64 on the same inputs
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = energy_score(samples, targets)
        loss = energy_loss(samples, targets, reduction="none")
    assert got.dtype == torch.float32 and loss.dtype == torch.float32
    # float32 arithmetic: ~1e-6 relative; bf16 matmuls were off by up to 0.12 (1e-2 relative).
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, -got)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert energy_score(samples.double(), targets).dtype == torch.float64
    # Gradients reach bf16 leaves in their own dtype, equal to those computed without autocast.
    leaf = samples.clone().requires_grad_()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        energy_loss(leaf, targets).backward()
    plain = samples.clone().requires_grad_()
    energy_loss(plain, targets).backward()
    assert leaf.grad.dtype == samples.dtype
    torch.testing.assert_close(leaf.grad, plain.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cuda_keeps_float32_arithmetic(dtype) -> None:
    samples, targets = _autocast_case(128, "cuda")
    exact = energy_score(samples.double(), targets.double())
    with torch.autocast(device_type="cuda", dtype=dtype):
        got = energy_score(samples, targets)
    assert got.dtype == torch.float32
    # TF32 matmuls (if enabled) round to ~1e-3 relative; bf16/fp16 ones were ~1e-2 off.
    tol = 1e-5 if not torch.backends.cuda.matmul.allow_tf32 else 2e-3
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)
    leaf = samples.to(dtype).requires_grad_()
    with torch.autocast(device_type="cuda", dtype=dtype):
        energy_loss(leaf, targets.to(dtype)).backward()
    assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad.float()).all()


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("beta", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("d", [3, 6])  # difference path and Gram path
def test_gradcheck_float64(beta: float, batch: tuple, d: int) -> None:
    g = torch.Generator().manual_seed(7)
    samples = torch.randn(3, *batch, d, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(2, *batch, d, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: energy_loss(s, t, beta=beta, reduction="none"), (samples, targets))


@pytest.mark.parametrize("beta", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["two_samples", "all_samples", "sample_and_target"])
@pytest.mark.parametrize("d", [2, 16])  # difference path and Gram path
def test_coincident_points_give_the_zero_subgradient(beta, dtype, case, d) -> None:
    g = torch.Generator().manual_seed(8)
    samples = 3.0 + torch.randn(4, 8, d, generator=g, dtype=dtype)
    targets = 3.0 + torch.randn(3, 8, d, generator=g, dtype=dtype)
    if case == "two_samples":
        samples[2] = samples[0]
    elif case == "all_samples":  # e.g. a freshly zero-initialised generative head
        samples[:] = samples[0]
    else:  # several pairs, so that some rounding residuals of the matmul formula are > 0
        targets[:] = samples[1:]
    leaf = samples.clone().requires_grad_()
    loss = energy_loss(leaf, targets, beta=beta, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(loss.double(), -_naive_score(samples, targets, beta).sum(), rtol=1e-6, atol=0.0)
    expected = _subgradient_of_sum_loss(samples, targets, beta)
    tol = (1e-12 if dtype == torch.float64 else 1e-5) * expected.abs().max().item()
    torch.testing.assert_close(leaf.grad.double(), expected, rtol=0.0, atol=tol)


def test_loss_reductions() -> None:
    g = torch.Generator().manual_seed(9)
    samples = torch.randn(4, 2, 3, 5, generator=g)
    targets = torch.randn(6, 2, 3, 5, generator=g)
    score = energy_score(samples, targets, beta=0.7)
    none = energy_loss(samples, targets, beta=0.7, reduction="none")
    torch.testing.assert_close(none, -score)
    torch.testing.assert_close(energy_loss(samples, targets, beta=0.7), -score.mean())
    torch.testing.assert_close(energy_loss(samples, targets, beta=0.7, reduction="sum"), -score.sum())
    assert energy_loss(samples[:, 0, 0], targets[:, 0, 0]).shape == ()


# ----------------------------------------------------------------------------- statistics


@given(
    mu1=st.floats(-2.0, 2.0),
    s1=st.floats(0.3, 3.0),
    mu2=st.floats(-2.0, 2.0),
    s2=st.floats(0.3, 3.0),
    n=st.integers(2, 6),
    m=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_unbiased_for_gaussians(mu1, s1, mu2, s2, n, m, seed) -> None:
    """Mean over R independent replicates (the batch axis) matches the closed form."""
    samples, targets = _gaussian_draws(mu1, s1, mu2, s2, n, m, seed)
    mean, se = _mean_se(energy_score(samples, targets))
    exact = _exact_gaussian_score(mu1, s1, mu2, s2)
    assert abs(mean - exact) <= Z * se, (mean, exact, se)


@pytest.mark.parametrize(
    ("mu1", "s1", "mu2", "s2", "m"),
    [(0.0, 1.0, 0.0, 1.0, 1), (1.0, 1.0, -1.0, 0.5, 3), (0.0, 2.0, 1.0, 1.0, 1), (0.5, 1.0, 0.0, 2.0, 4)],
)
def test_tolerance_detects_the_n_squared_bias(mu1, s1, mu2, s2, m) -> None:
    """Dividing the spread term by n^2 instead of n(n-1) (n = 2) must fail the check above."""
    samples, targets = _gaussian_draws(mu1, s1, mu2, s2, 2, m, seed=1234)
    exact = _exact_gaussian_score(mu1, s1, mu2, s2)
    scores = energy_score(samples, targets)  # (R,)
    mean, se = _mean_se(scores)
    assert abs(mean - exact) <= Z * se
    # With n = 2 the biased spread term is |x1 - x2| / 2 instead of |x1 - x2|.
    biased = scores - 0.5 * (samples[0] - samples[1]).abs().squeeze(-1)
    biased_mean, biased_se = _mean_se(biased)
    assert abs(biased_mean - exact) > Z * biased_se, (biased_mean, exact, biased_se)


def test_expected_score_is_maximised_at_the_target_distribution() -> None:
    """Strict propriety, by Monte Carlo with common random numbers: N(0, 1) beats the rest."""
    replicates, n, m = 20_000, 4, 2
    g = torch.Generator().manual_seed(10)
    noise = torch.randn(n, replicates, 1, generator=g)  # shared by all candidate models
    targets = torch.randn(m, replicates, 1, generator=g)  # Y ~ N(0, 1)
    candidates = [(0.0, 1.0), (0.5, 1.0), (-0.5, 1.0), (0.0, 0.5), (0.0, 2.0)]
    scores = {c: energy_score(c[0] + c[1] * noise, targets) for c in candidates}
    for (mu, s), score in scores.items():  # each MC mean matches its closed form
        mean, se = _mean_se(score)
        assert abs(mean - _exact_gaussian_score(mu, s, 0.0, 1.0)) <= Z * se
    truth = scores[(0.0, 1.0)]
    for c in candidates[1:]:
        advantage, se = _mean_se(truth - scores[c])
        assert advantage > Z * se, (c, advantage, se)


# ----------------------------------------------------------------------------- errors


def _ok(n=3, m=2, batch=(4,), d=5, dtype=torch.float32):
    return torch.randn(n, *batch, d, dtype=dtype), torch.randn(m, *batch, d, dtype=dtype)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ([[0.0, 1.0]], _ok()[1]), TypeError, "samples must be a torch.Tensor"),
        (lambda: (_ok()[0], None), TypeError, "targets must be a torch.Tensor"),
        (lambda: (_ok()[0].long(), _ok()[1]), TypeError, "samples must have a floating-point"),
        (lambda: (_ok()[0], _ok()[1].int()), TypeError, "targets must have a floating-point"),
        (lambda: (torch.randn(3), _ok()[1]), ValueError, r"samples must have shape \(n, \*batch"),
        (lambda: _ok(n=1), ValueError, "samples must hold n >= 2"),
        (lambda: _ok(d=0), ValueError, "non-empty feature axis"),
        (lambda: _ok(m=0), ValueError, "targets must hold m >= 1"),
        (
            lambda: (_ok()[0], torch.randn(2, 3, 5)),
            ValueError,
            r"targets must have shape \(m, 4, 5\).*got shape \(2, 3, 5\)",
        ),
        (lambda: (_ok()[0], torch.randn(2, 4, 6)), ValueError, r"targets must have shape \(m, 4, 5\)"),
        (lambda: (_ok()[0], torch.randn(2, 5)), ValueError, r"targets must have shape"),
        (lambda: (_ok()[0], torch.randn(4, 5)), ValueError, r"targets\.unsqueeze\(0\)"),
        (lambda: (_ok()[0], torch.randn(2, 4, 5, device="meta")), ValueError, "same device"),
    ],
)
@pytest.mark.parametrize("fn", [energy_score, energy_loss])
def test_invalid_inputs_raise(fn, make, error, match) -> None:
    samples, targets = make()
    with pytest.raises(error, match=match):
        fn(samples, targets)


@pytest.mark.parametrize("beta", [0.0, 2.0, -0.5, 2.5, 3])
def test_beta_outside_open_interval_raises(beta) -> None:
    with pytest.raises(ValueError, match=r"beta must lie in the open interval \(0, 2\).*proper"):
        energy_score(*_ok(), beta=beta)


@pytest.mark.parametrize("beta", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_beta_raises(beta) -> None:
    with pytest.raises(ValueError, match="beta must be a finite number"):
        energy_loss(*_ok(), beta=beta)


@pytest.mark.parametrize("beta", ["1.0", True, None, torch.tensor(1.0)])
def test_non_number_beta_raises(beta) -> None:
    with pytest.raises(TypeError, match="beta must be a real number"):
        energy_score(*_ok(), beta=beta)


@pytest.mark.parametrize("reduction", ["avg", "", None, "MEAN"])
def test_unknown_reduction_raises_listing_valid_ones(reduction) -> None:
    with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none'"):
        energy_loss(*_ok(), reduction=reduction)


# ----------------------------------------------------------------------------- mixtures


def _naive_mixture_score(samples, weights, targets, beta):
    """The mixture estimator as loops over components and draws, float64 -> (*batch)."""
    x, w, y = samples.double(), weights.double(), targets.double()
    k, n, m = x.shape[0], x.shape[1], y.shape[0]
    total = 0.0
    for j, jj in itertools.product(range(k), repeat=2):
        pairs = [(a, b) for a in range(n) for b in range(n) if j != jj or a != b]
        d = sum(torch.linalg.vector_norm(x[j, a] - x[jj, b], dim=-1) ** beta for a, b in pairs) / len(pairs)
        total = total + w[..., j] * w[..., jj] * d
    for j in range(k):
        fit = sum(torch.linalg.vector_norm(x[j, a] - y[i], dim=-1) ** beta for a in range(n) for i in range(m))
        total = total - 2.0 * w[..., j] * fit / (n * m)
    return total


def test_mixture_with_one_component_is_the_energy_score() -> None:
    g = torch.Generator().manual_seed(0)
    samples, targets = torch.randn(5, 3, 7, generator=g), torch.randn(4, 3, 7, generator=g)
    got = mixture_energy_score(samples[None], torch.ones(3, 1), targets, beta=0.8)
    torch.testing.assert_close(got, energy_score(samples, targets, beta=0.8), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("k", "n", "batch", "d", "beta"), [(3, 2, (4,), 2, 1.0), (2, 3, (2, 3), 6, 0.5), (4, 2, (), 9, 1.5)]
)
def test_mixture_matches_naive_loops(k, n, batch, d, beta) -> None:
    g = torch.Generator().manual_seed(k * 10 + n)
    samples = torch.randn(k, n, *batch, d, generator=g)
    weights = torch.rand(*batch, k, generator=g).softmax(-1)
    targets = torch.randn(3, *batch, d, generator=g)
    got = mixture_energy_score(samples, weights, targets, beta=beta)
    torch.testing.assert_close(
        got.double(), _naive_mixture_score(samples, weights, targets, beta), rtol=1e-5, atol=1e-5
    )


def test_mixture_weight_gradient_is_exact() -> None:
    """The score is pi^T D pi - 2 pi . F in the weights, so d/dpi = 2 D pi - 2 F (D symmetric)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)  # (J, n = 2, d)
    targets = torch.randn(4, 5, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    mixture_energy_score(x, weights, targets).backward()
    fit = torch.stack([torch.linalg.vector_norm(x[j][:, None] - targets[None], dim=-1).mean() for j in range(3)])
    dmat = torch.empty(3, 3, dtype=torch.float64)
    for j, jj in itertools.product(range(3), repeat=2):
        dist = torch.linalg.vector_norm(x[j][:, None] - x[jj][None], dim=-1)  # (n, n)
        dmat[j, jj] = dist.sum() / 2 if j == jj else dist.mean()  # j = k: the n(n-1) = 2 ordered pairs
    torch.testing.assert_close(weights.grad, 2 * dmat @ weights.detach() - 2 * fit)


def _discrete_mixture(seed: int):
    """Three components on finite point sets of R^2, fixed weights, a discrete target law."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(3, 4, 2, generator=g, dtype=torch.float64) * 2  # component j: 4 atoms
    probs = torch.rand(3, 4, generator=g, dtype=torch.float64).softmax(-1)
    weights = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    target_atoms, target_probs = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.full((5,), 0.2).double()
    return points, probs, weights, target_atoms, target_probs


def _exact_mixture_score(points, probs, weights, target_atoms, target_probs, beta):
    mix_atoms = points.reshape(-1, 2)  # (12, 2)
    mix_probs = (weights[:, None] * probs).reshape(-1)
    dxx = torch.cdist(mix_atoms, mix_atoms) ** beta
    dxy = torch.cdist(mix_atoms, target_atoms) ** beta
    return float(mix_probs @ dxx @ mix_probs - 2 * mix_probs @ dxy @ target_probs)


@pytest.mark.parametrize(("n", "beta"), [(2, 1.0), (3, 0.5)])
def test_mixture_score_is_unbiased(n, beta) -> None:
    points, probs, weights, target_atoms, target_probs = _discrete_mixture(seed=n)
    g = torch.Generator().manual_seed(100 + n)
    idx = torch.multinomial(probs, n * REPLICATES, replacement=True, generator=g).reshape(3, n, REPLICATES)
    samples = points[torch.arange(3)[:, None, None], idx]  # (J, n, R, 2)
    targets = target_atoms[torch.multinomial(target_probs, REPLICATES, replacement=True, generator=g)][None]
    scores = mixture_energy_score(samples, weights.expand(REPLICATES, 3), targets, beta=beta)
    mean, se = _mean_se(scores)
    exact = _exact_mixture_score(points, probs, weights, target_atoms, target_probs, beta)
    assert abs(mean - exact) <= Z * se, (mean, exact, se)
    # The tolerance is tight enough to see the bias of counting a draw's zero distance to itself.
    k = 3
    pair = (
        torch.cdist(
            samples.permute(2, 0, 1, 3).reshape(REPLICATES, k * n, 2),
            samples.permute(2, 0, 1, 3).reshape(REPLICATES, k * n, 2),
        )
        ** beta
    )
    within = torch.stack(
        [pair[:, j * n : (j + 1) * n, j * n : (j + 1) * n].sum((1, 2)) for j in range(k)], -1
    )  # (R, J)
    biased = scores - (weights**2 * within).sum(-1) * (1 / (n * (n - 1)) - 1 / n**2)
    biased_mean, biased_se = _mean_se(biased)
    assert abs(biased_mean - exact) > Z * biased_se, (biased_mean, exact, biased_se)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: (torch.randn(2, 1, 3, 4), torch.full((3, 2), 0.5), torch.randn(1, 3, 4)), ValueError, "n >= 2 draws"),
        (
            lambda: (torch.randn(2, 2, 3, 4), torch.full((3, 3), 1 / 3), torch.randn(1, 3, 4)),
            ValueError,
            r"weights must have shape \(3, 2\)",
        ),
        (
            lambda: (torch.randn(2, 2, 3, 4), torch.tensor([[1.5, -0.5]] * 3), torch.randn(1, 3, 4)),
            ValueError,
            "non-negative",
        ),
        (lambda: (torch.randn(2, 2, 3, 4), torch.full((3, 2), 0.4), torch.randn(1, 3, 4)), ValueError, "sum to 1"),
        (
            lambda: (torch.randn(2, 2, 3, 4), torch.ones(3, 2, dtype=torch.long), torch.randn(1, 3, 4)),
            TypeError,
            "weights must be a floating",
        ),
        (
            lambda: (torch.randn(2, 2, 3, 4), torch.full((3, 2), 0.5), torch.randn(1, 4, 4)),
            ValueError,
            "targets must have shape",
        ),
    ],
)
def test_mixture_invalid_inputs_raise(make, error, match) -> None:
    with pytest.raises(error, match=match):
        mixture_energy_score(*make())


def test_mixture_loss_reductions_and_low_precision() -> None:
    g = torch.Generator().manual_seed(5)
    samples, targets = torch.randn(2, 3, 4, 6, generator=g), torch.randn(5, 4, 6, generator=g)
    weights = torch.rand(4, 2, generator=g).softmax(-1)
    score = mixture_energy_score(samples, weights, targets)
    torch.testing.assert_close(mixture_energy_loss(samples, weights, targets, reduction="none"), -score)
    torch.testing.assert_close(mixture_energy_loss(samples, weights, targets), -score.mean())
    low = mixture_energy_score(samples.bfloat16(), weights.bfloat16(), targets.bfloat16())
    assert low.dtype == torch.float32
    with pytest.raises(ValueError, match="reduction must be one of"):
        mixture_energy_loss(samples, weights, targets, reduction="max")
