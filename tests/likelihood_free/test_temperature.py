"""Tests for likelihood_free.temperature.

The exact sampler and the Bernoulli factory are checked against closed forms with fixed seeds
(chi-square against P^(1/T)/Z_T, means within 5 standard errors), with power checks showing that
the same tests reject the wrong targets. The batched approximation is checked against a plain
per-row ``Counter`` implementation of its documented weights, on hand-checked cases, and for
consistency (its distance to the target shrinks as N grows).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import chi2_contingency, chisquare

import likelihood_free.temperature as temperature_module
from likelihood_free.temperature import (
    BernoulliFactoryResult,
    TemperatureFallbackWarning,
    TemperatureSample,
    TemperatureSamplingExhausted,
    _split_inverse_temperature,
    batched_temperature_sample,
    bernoulli_factory_power,
    temperature_sample,
)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tests use many small tensor ops; one thread avoids OpenMP contention on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


P5 = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)
# Five 3-token events sharing prefixes/suffixes: comparing any single position would merge some.
TOKENS = torch.tensor([[1, 2, 3], [1, 2, 4], [1, 5, 3], [7, 2, 3], [7, 5, 4]])


def tempered(p: torch.Tensor, temperature: float) -> torch.Tensor:
    w = p ** (1.0 / temperature)
    return w / w.sum()


def expected_draws(p: torch.Tensor, temperature: float) -> float:
    """The CALM paper's mean draws: (n + 1{alpha>0} sum_x P^(1/T-1)) / Z_T."""
    inv = 1.0 / temperature
    n = round(inv) if abs(inv - round(inv)) < 1e-9 else math.floor(inv)
    alpha = inv - n if abs(inv - round(inv)) >= 1e-9 else 0.0
    z = float((p**inv).sum())
    return (n + (float((p ** (inv - 1)).sum()) if alpha > 0 else 0.0)) / z


class CategoricalSampler:
    """Draws from known categorical probabilities for every row (seeded torch.Generator).

    ``probs`` is ``(C,)`` (same for all rows) or ``(batch, C)``; with ``tokens`` ``(C, K)`` each
    draw is the K-token event of its category. Usable with ``pass_rows`` True or False.
    """

    def __init__(self, probs, batch, seed, tokens=None):
        self.probs = probs.float()
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens = tokens
        self.calls: list[tuple[int, torch.Tensor | None]] = []

    def __call__(self, k, rows=None):
        self.calls.append((k, None if rows is None else rows.clone()))
        r = self.batch if rows is None else rows.numel()
        if self.probs.dim() == 1:
            ids = torch.multinomial(self.probs, k * r, replacement=True, generator=self.gen)
            ids = ids.view(k, r)
        else:
            p = self.probs if rows is None else self.probs[rows]
            ids = torch.multinomial(p, k, replacement=True, generator=self.gen).T
        return ids if self.tokens is None else self.tokens[ids]


def decode(events: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(b, K) events -> (b,) category ids; asserts each event is exactly one known category."""
    match = (events[:, None, :] == tokens[None]).all(-1)
    assert bool((match.sum(-1) == 1).all()), "an output is not one of the sampler's events"
    return match.float().argmax(-1)


def chi2_pvalue(ids: torch.Tensor, target: torch.Tensor) -> float:
    counts = torch.bincount(ids, minlength=target.numel()).double()
    return float(chisquare(counts.numpy(), (target * counts.sum()).numpy()).pvalue)


def assert_mean_within(values: torch.Tensor, expected: float, n_se: float = 5.0) -> None:
    """Sample mean within ``n_se`` standard errors (plus 1e-4 relative, for degenerate cases)."""
    v = values.double()
    se = float(v.std()) / math.sqrt(v.numel())
    slack = n_se * se + 1e-4 * abs(expected)
    assert abs(float(v.mean()) - expected) < slack, (float(v.mean()), expected, se)


# ----------------------------------------------------------------------------- 1/T = n + alpha


@pytest.mark.parametrize(
    ("temperature", "n", "alpha"),
    [
        (1.0, 1, 0.0),
        (0.5, 2, 0.0),
        (1 / 3, 3, 0.0),
        (0.1, 10, 0.0),
        (1 / 7, 7, 0.0),
        (0.7, 1, 1 / 0.7 - 1),
        (0.37, 2, 1 / 0.37 - 2),
        (0.9, 1, 1 / 0.9 - 1),
    ],
)
def test_split_inverse_temperature(temperature, n, alpha):
    got_n, got_alpha = _split_inverse_temperature(temperature)
    assert got_n == n
    assert got_alpha == pytest.approx(alpha, abs=1e-12)
    if alpha == 0.0:
        assert got_alpha == 0.0


@given(st.integers(min_value=1, max_value=10_000))
def test_split_reciprocal_integers_snap_to_alpha_zero(n):
    assert _split_inverse_temperature(1.0 / n) == (n, 0.0)


# ----------------------------------------------------------------------------- exact sampler


@pytest.mark.parametrize(("temperature", "events"), [(0.5, False), (1 / 3, True), (0.7, True), (0.37, False)])
def test_exact_sampler_matches_tempered_distribution(temperature, events):
    batch = 30_000
    tokens = TOKENS if events else None
    sampler = CategoricalSampler(P5, batch, seed=11, tokens=tokens)
    g = torch.Generator().manual_seed(12)
    out = temperature_sample(sampler, temperature, generator=g)
    assert isinstance(out, TemperatureSample)
    assert out.samples.shape == ((batch, 3) if events else (batch,))
    assert out.draws.dtype == torch.long and not bool(out.exhausted.any())
    ids = decode(out.samples, TOKENS) if events else out.samples
    assert chi2_pvalue(ids, tempered(P5, temperature)) > 1e-3
    # Power: the same test rejects the untempered P and, for alpha > 0, P^n (alpha ignored).
    assert chi2_pvalue(ids, P5) < 1e-8
    n, alpha = _split_inverse_temperature(temperature)
    if alpha > 0:
        assert chi2_pvalue(ids, tempered(P5, 1.0 / n)) < 1e-8
    # Mean number of draws: the paper's formula, within 5 SE.
    assert_mean_within(out.draws, expected_draws(P5, temperature))
    assert int(out.draws.min()) >= n + (1 if alpha > 0 else 0)


def test_exact_sampler_rows_have_their_own_distributions():
    batch = 16_000
    probs = torch.stack([P5, P5.flip(0)]).repeat_interleave(batch // 2, 0)  # two row groups
    sampler = CategoricalSampler(probs, batch, seed=3)
    out = temperature_sample(sampler, 0.6, pass_rows=True, batch_size=batch, generator=torch.Generator().manual_seed(4))
    first, second = out.samples[: batch // 2], out.samples[batch // 2 :]
    assert chi2_pvalue(first, tempered(P5, 0.6)) > 1e-3
    assert chi2_pvalue(second, tempered(P5.flip(0), 0.6)) > 1e-3
    assert_mean_within(out.draws[: batch // 2], expected_draws(P5, 0.6))


@pytest.mark.parametrize("draws_per_round", [2, 5])
def test_draws_per_round_changes_neither_distribution_nor_draw_count(draws_per_round):
    batch = 20_000
    sampler = CategoricalSampler(P5, batch, seed=5)
    out = temperature_sample(sampler, 0.45, draws_per_round=draws_per_round, generator=torch.Generator().manual_seed(6))
    assert all(k == draws_per_round for k, _ in sampler.calls)
    assert chi2_pvalue(out.samples, tempered(P5, 0.45)) > 1e-3
    assert_mean_within(out.draws, expected_draws(P5, 0.45))


class StreamSampler:
    """Row r's m-th draw is streams[r, m], whichever way the rows are asked for."""

    def __init__(self, streams):
        self.streams = streams
        self.next = torch.zeros(streams.shape[0], dtype=torch.long)
        self.calls: list[torch.Tensor] = []

    def __call__(self, k, rows=None):
        if rows is None:
            rows = torch.arange(self.streams.shape[0])
        else:
            self.calls.append(rows.clone())
        idx = self.next[rows, None] + torch.arange(k)  # (r, k)
        self.next[rows] += k
        return self.streams[rows].gather(1, idx).T  # (k, r)


@pytest.mark.parametrize("temperature", [0.5, 0.7, 0.37])
def test_pass_rows_true_and_false_agree_given_the_same_draws(temperature):
    batch, length, k = 3000, 600, 3
    gen = torch.Generator().manual_seed(8)
    streams = torch.multinomial(P5.float(), batch * length, True, generator=gen).view(batch, -1)
    kwargs = dict(max_rounds=length // k, draws_per_round=k, on_exhausted="fallback")
    by_rows = StreamSampler(streams)
    a = temperature_sample(
        by_rows, temperature, pass_rows=True, batch_size=batch, generator=torch.Generator().manual_seed(9), **kwargs
    )
    b = temperature_sample(StreamSampler(streams), temperature, generator=torch.Generator().manual_seed(9), **kwargs)
    assert not bool(a.exhausted.any())
    assert torch.equal(a.samples, b.samples) and torch.equal(a.draws, b.draws)
    # Rows are passed in ascending order from the first call until they accept, then never again:
    # each row is asked in a prefix of the calls, using between 1 and k draws per call.
    assert torch.equal(by_rows.calls[0], torch.arange(batch))
    asked = torch.zeros(batch, dtype=torch.long)
    last = torch.full((batch,), -1)
    for i, rows in enumerate(by_rows.calls):
        assert bool((rows[1:] > rows[:-1]).all())
        assert bool((last[rows] == i - 1).all())
        asked[rows] += 1
        last[rows] = i
    assert bool((asked <= a.draws).all()) and bool((a.draws <= asked * k).all())
    n, alpha = _split_inverse_temperature(temperature)
    if alpha == 0:  # one attempt of n draws per call until the accepting one
        assert torch.equal(asked, a.draws // n)


def test_pass_rows_true_and_false_are_identically_distributed():
    batch = 20_000
    outs = []
    for pass_rows, seed in [(True, 21), (False, 22)]:
        sampler = CategoricalSampler(P5, batch, seed=seed, tokens=TOKENS)
        out = temperature_sample(
            sampler, 0.7, pass_rows=pass_rows, batch_size=batch, generator=torch.Generator().manual_seed(seed + 100)
        )
        ids = decode(out.samples, TOKENS)
        assert chi2_pvalue(ids, tempered(P5, 0.7)) > 1e-3
        outs.append(torch.bincount(ids, minlength=5).numpy())
    assert chi2_contingency(outs).pvalue > 1e-3


def test_temperature_one_returns_the_first_draw():
    batch = 20_000
    sampler = CategoricalSampler(P5, batch, seed=31, tokens=TOKENS)
    recorded = []

    def recording(k):
        x = sampler(k)
        recorded.append(x)
        return x

    out = temperature_sample(recording, 1.0)
    assert len(recorded) == 1 and recorded[0].shape[0] == 1
    assert torch.equal(out.samples, recorded[0][0])
    assert bool((out.draws == 1).all()) and not bool(out.exhausted.any())
    assert chi2_pvalue(decode(out.samples, TOKENS), P5) > 1e-3


def test_float_and_multidim_events_compare_whole_events():
    # Every draw is one of two 2x2 float events that differ in one element only.
    a = torch.tensor([[0.5, 1.0], [2.0, 3.0]])
    b = torch.tensor([[0.5, 1.0], [2.0, 4.0]])
    gen = torch.Generator().manual_seed(0)

    def sampler(k):
        pick = torch.rand(k, 4000, generator=gen) < 0.75  # P(a) = 0.75
        return torch.where(pick[..., None, None], a, b)

    out = temperature_sample(sampler, 0.5, generator=gen)
    is_a = (out.samples == a).flatten(1).all(1)
    assert bool((is_a | (out.samples == b).flatten(1).all(1)).all())
    frac = float(is_a.double().mean())
    expect = 0.75**2 / (0.75**2 + 0.25**2)  # 0.9
    assert abs(frac - expect) < 5 * math.sqrt(expect * (1 - expect) / 4000)


def test_sampler_on_empty_batch():
    out = temperature_sample(
        lambda k, rows: torch.zeros(k, rows.numel(), 2, dtype=torch.long), 0.5, pass_rows=True, batch_size=0
    )
    assert out.samples.shape == (0, 2) and out.draws.shape == (0,)


# ----------------------------------------------------------------------------- low T: attempts span calls


def expected_draws_spanning(p: torch.Tensor, temperature: float, per_call: int) -> float:
    """Mean draws when attempts of n > per_call draws come in pieces of per_call draws.

    An attempt asks for its piece starting at draw s only if its first s draws are identical
    (probability sum_x P(x)^s, 1 for s = 0); Wald's identity divides the mean cost of an attempt
    (plus the factory's sum_x P(x)^(1/T - 1) when alpha > 0) by the acceptance probability Z_T.
    """
    n, alpha = _split_inverse_temperature(temperature)
    starts = range(0, n, per_call)
    cost = sum(min(per_call, n - s) * (float((p**s).sum()) if s else 1.0) for s in starts)
    if alpha > 0:
        cost += float((p ** (n + alpha - 1)).sum())
    return cost / float((p ** (n + alpha)).sum())


@pytest.mark.parametrize(
    ("temperature", "per_call", "pass_rows"), [(0.2, 2, False), (0.2, 3, True), (0.22, 3, False), (1 / 3, 2, True)]
)
def test_attempts_spanning_calls_are_exact(temperature, per_call, pass_rows):
    """n = floor(1/T) > max_draws_per_call: the tempered law and the mean cost are exact."""
    batch = 20_000
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    sampler = CategoricalSampler(p, batch, seed=41, tokens=TOKENS[:3])
    out = temperature_sample(
        sampler,
        temperature,
        max_draws_per_call=per_call,
        pass_rows=pass_rows,
        batch_size=batch,
        generator=torch.Generator().manual_seed(42),
    )
    assert out.num_exhausted == 0 and all(k == per_call for k, _ in sampler.calls)
    ids = decode(out.samples, TOKENS[:3])
    assert chi2_pvalue(ids, tempered(p, temperature)) > 1e-4
    assert chi2_pvalue(ids, tempered(p, 0.5)) < 1e-8  # power: a different temperature fails
    expected = expected_draws_spanning(p, temperature, per_call)
    assert expected < expected_draws(p, temperature)  # failing attempts stop early
    assert_mean_within(out.draws, expected)


def test_attempt_spans_calls_given_the_draws():
    """T = 1/5 with 2 draws per call: pieces of 2, 2, 1 draws; a mismatch ends the attempt."""
    streams = torch.tensor(
        [
            [7, 7, 7, 7, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # 5 identical draws over 3 calls
            [1, 1, 1, 2, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0],  # fails in call 2, then 3 over calls 3-5
            [4, 5, 6, 6, 6, 6, 6, 6, 6, 6, 0, 0, 0, 0],  # fails in call 1, then 6 over calls 2-4
        ]
    )
    for pass_rows in (False, True):
        sampler = StreamSampler(streams)
        out = temperature_sample(sampler, 0.2, max_draws_per_call=2, pass_rows=pass_rows, batch_size=3)
        assert out.samples.tolist() == [7, 3, 6]
        # row 1: 4 draws of the failed attempt (2 + 2) and 5 of the accepted one; the second draw
        # of call 5 is left over. Row 2: 2 + 5, the last call's second draw left over.
        assert out.draws.tolist() == [5, 9, 7]
        assert sampler.next.tolist() == ([10, 10, 10] if not pass_rows else [6, 10, 8])


def test_low_temperature_memory_is_bounded():
    """T = 1e-6 asks for n = 10^6 identical draws, never more than max_draws_per_call at once."""
    batch, asked = 3, []

    def constant(k):  # a point mass: every attempt passes, after ceil(10^6 / 1024) calls
        asked.append(k)
        return torch.full((k, batch, 2), 5)

    out = temperature_sample(constant, 1e-6)
    assert max(asked) == 1024 and len(asked) == math.ceil(1e6 / 1024)
    assert out.draws.tolist() == [10**6] * batch and bool((out.samples == 5).all())
    asked.clear()
    sampler, _ = counter_sampler(batch)

    def recording(k):
        asked.append(k)
        return sampler(k)

    with pytest.warns(TemperatureFallbackWarning, match="3 of 3 row"):
        out = temperature_sample(recording, 1e-6, max_rounds=4, max_draws_per_call=64, on_exhausted="fallback")
    assert asked == [64] * 4 and out.draws.tolist() == [4 * 64] * batch


def test_nan_events_never_equal_another_draw():
    gen = torch.Generator().manual_seed(0)

    def nan_or_one(k):  # row 0 always NaN, row 1 a 50/50 mix of 1.0 and 2.0
        x = torch.where(torch.rand(k, 2, generator=gen) < 0.5, 1.0, 2.0)
        x[:, 0] = math.nan
        return x

    out = temperature_sample(nan_or_one, 1.0)  # T = 1: the first draw, compared with nothing
    assert bool(out.samples[0].isnan()) and out.draws.tolist() == [1, 1]
    for temperature in (0.5, 0.7):  # n = 2; n = 1 and the factory's coin "draw == NaN"
        with pytest.warns(TemperatureFallbackWarning, match="1 of 2 row"):
            out = temperature_sample(nan_or_one, temperature, max_rounds=200, on_exhausted="fallback")
        assert out.exhausted.tolist() == [True, False] and out.samples[1].item() in (1.0, 2.0)


# ----------------------------------------------------------------------------- exhaustion


def counter_sampler(batch):
    """Never repeats a value: draws are consecutive integers."""
    state = {"next": 0, "last": None}

    def sampler(k):
        x = torch.arange(state["next"], state["next"] + k * batch).view(k, batch)
        state["next"] += k * batch
        state["last"] = x
        return x

    return sampler, state


@pytest.mark.parametrize("temperature", [0.5, 0.7])
def test_never_repeating_sampler_raises_listing_rows(temperature):
    sampler, _ = counter_sampler(6)
    with pytest.raises(TemperatureSamplingExhausted, match=r"rows \[0, 1, 2, 3, 4, 5\]") as info:
        temperature_sample(sampler, temperature, max_rounds=4)
    assert info.value.rows == [0, 1, 2, 3, 4, 5]
    assert bool(info.value.result.exhausted.all())


def test_fallback_returns_last_candidate_and_marks_rows():
    batch, k, rounds = 6, 2, 3
    sampler, state = counter_sampler(batch)
    with pytest.warns(TemperatureFallbackWarning, match="6 of 6 row"):
        out = temperature_sample(sampler, 0.5, max_rounds=rounds, on_exhausted="fallback")
    assert bool(out.exhausted.all()) and out.num_exhausted == batch
    assert torch.equal(out.draws, torch.full((batch,), rounds * k))
    assert torch.equal(out.samples, state["last"][0])  # first draw of the last attempt


def test_fallback_with_several_attempts_per_round_returns_the_latest_attempt():
    # n = 2 and 5 draws per round: attempts at draws 0-1 and 2-3 of each call, draw 4 unused.
    batch, rounds = 4, 3
    sampler, state = counter_sampler(batch)
    with pytest.warns(TemperatureFallbackWarning, match="4 of 4 row"):
        out = temperature_sample(sampler, 0.5, max_rounds=rounds, draws_per_round=5, on_exhausted="fallback")
    assert out.num_exhausted == batch
    assert torch.equal(out.samples, state["last"][2])  # first draw of the second attempt
    assert torch.equal(out.draws, torch.full((batch,), rounds * 4))


def test_only_stuck_rows_are_exhausted():
    batch = 8
    odd = torch.arange(batch) % 2 == 1
    sampler, _ = counter_sampler(batch)

    def mixed(k):  # even rows always draw 7, odd rows never repeat
        return torch.where(odd, sampler(k), torch.full((k, batch), 7))

    with pytest.raises(TemperatureSamplingExhausted, match=r"rows \[1, 3, 5, 7\]") as info:
        temperature_sample(mixed, 0.37, max_rounds=5)
    assert info.value.rows == [1, 3, 5, 7]
    assert "batched_temperature_sample" in str(info.value)
    with pytest.warns(TemperatureFallbackWarning) as record:
        out = temperature_sample(mixed, 0.37, max_rounds=5, on_exhausted="fallback")
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith("4 of 8 row(s) did not accept") and "batched_temperature_sample" in message
    assert record[0].filename == __file__  # points at the caller
    assert torch.equal(out.exhausted, odd) and out.num_exhausted == 4
    assert bool((out.samples[~odd] == 7).all())
    assert bool((out.draws[~odd] == 3).all())  # n = 2 identical draws + 1 factory draw


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("temperature", "match"),
    [
        (1.5, "cannot be reached by rejection"),
        (0.0, "greedy"),
        (-0.3, "greedy"),
        (float("nan"), "nan"),
        (float("inf"), "cannot be reached"),
        (1e-9, "at least"),
    ],
)
def test_bad_temperature_raises(temperature, match):
    sampler = CategoricalSampler(P5, 4, seed=0)
    with pytest.raises(ValueError, match=match):
        temperature_sample(sampler, temperature)
    with pytest.raises(ValueError, match=match):
        batched_temperature_sample(torch.zeros(2, 3, dtype=torch.long), temperature)


def test_bad_arguments_raise():
    sampler = CategoricalSampler(P5, 4, seed=0)
    with pytest.raises(TypeError, match="temperature"):
        temperature_sample(sampler, True)
    with pytest.raises(TypeError, match="temperature"):
        temperature_sample(sampler, "0.5")
    with pytest.raises(ValueError, match="max_rounds"):
        temperature_sample(sampler, 0.5, max_rounds=0)
    with pytest.raises(TypeError, match="max_rounds"):
        temperature_sample(sampler, 0.5, max_rounds=2.0)
    with pytest.raises(ValueError, match="draws_per_round"):
        temperature_sample(sampler, 0.5, draws_per_round=0)
    with pytest.raises(ValueError, match=r"draws_per_round must be at least n = floor\(1/T\) = 3"):
        temperature_sample(sampler, 0.3, draws_per_round=2)
    with pytest.raises(ValueError, match=r"on_exhausted must be one of \('raise', 'fallback'\)"):
        temperature_sample(sampler, 0.5, on_exhausted="ignore")
    with pytest.raises(ValueError, match="batch_size is required"):
        temperature_sample(sampler, 0.5, pass_rows=True)
    with pytest.raises(ValueError, match="batch_size=5"):
        temperature_sample(sampler, 0.5, batch_size=5)
    with pytest.raises(ValueError, match="max_draws_per_call"):
        temperature_sample(sampler, 0.5, max_draws_per_call=0)
    with pytest.raises(TypeError, match="max_draws_per_call"):
        temperature_sample(sampler, 0.5, max_draws_per_call=None)
    with pytest.raises(ValueError, match="draws_per_round=9 exceeds max_draws_per_call=8"):
        temperature_sample(sampler, 0.5, draws_per_round=9, max_draws_per_call=8)


@pytest.mark.parametrize("generator", [0, "seed", torch.tensor(0), [torch.Generator()]])
def test_generator_must_be_a_torch_generator(generator):
    sampler = CategoricalSampler(P5, 4, seed=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        temperature_sample(sampler, 0.5, generator=generator)
    coin = coin_for(torch.full((3,), 0.5), torch.Generator())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        bernoulli_factory_power(coin, 0.5, generator=generator)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        batched_temperature_sample(torch.zeros(3, 2, dtype=torch.long), 0.5, generator=generator)


def test_bad_sampler_outputs_raise():
    with pytest.raises(TypeError, match="must return a tensor"):
        temperature_sample(lambda k: [0] * k, 0.5)
    with pytest.raises(ValueError, match=r"shape \(k, batch, \*event\) with k=2"):
        temperature_sample(lambda k: torch.zeros(k + 1, 3, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match=r"len\(rows\)=4"):
        temperature_sample(lambda k, rows: torch.zeros(k, 3, dtype=torch.long), 0.5, pass_rows=True, batch_size=4)
    shapes = iter([(2, 3, 2), (2, 3, 5)])
    with pytest.raises(ValueError, match="changed its event shape"):
        temperature_sample(lambda k: torch.arange(math.prod(s := next(shapes))).view(s), 0.5)


# ----------------------------------------------------------------------------- Bernoulli factory


def coin_for(p: torch.Tensor, gen: torch.Generator):
    return lambda k: torch.rand(k, p.numel(), generator=gen, dtype=torch.float64) < p


@given(
    st.floats(min_value=0.1, max_value=0.95),
    st.floats(min_value=0.05, max_value=1.0),
    st.integers(min_value=1, max_value=6),
)
def test_factory_acceptance_and_flips_match_closed_form(p, alpha, flips_per_call):
    rows = 10_000
    gen = torch.Generator().manual_seed(1)
    res = bernoulli_factory_power(
        coin_for(torch.full((rows,), p, dtype=torch.float64), gen), alpha, flips_per_call=flips_per_call, generator=gen
    )
    assert isinstance(res, BernoulliFactoryResult) and not bool(res.exhausted.any())
    q = p**alpha
    rate = float(res.outcome.double().mean())
    assert abs(rate - q) < 5 * math.sqrt(q * (1 - q) / rows) + 1e-12
    assert_mean_within(res.flips, p ** (alpha - 1))


def test_factory_rejects_wrong_exponent():
    """Power check: with 20k rows the 5-SE test tells p^0.5 from p and from p^0.4."""
    rows, p = 20_000, 0.3
    gen = torch.Generator().manual_seed(2)
    res = bernoulli_factory_power(coin_for(torch.full((rows,), p, dtype=torch.float64), gen), 0.5, generator=gen)
    rate, se = float(res.outcome.double().mean()), math.sqrt(0.25 / rows)
    assert abs(rate - p**0.5) < 5 * se
    assert abs(rate - p) > 5 * se and abs(rate - p**0.4) > 5 * se


def test_factory_rows_have_their_own_coins():
    per = 10_000
    p = torch.tensor([0.1, 0.35, 0.6, 0.9], dtype=torch.float64).repeat_interleave(per)
    gen = torch.Generator().manual_seed(3)
    res = bernoulli_factory_power(coin_for(p, gen), 0.3, generator=gen)
    for j, pj in enumerate([0.1, 0.35, 0.6, 0.9]):
        sl = slice(j * per, (j + 1) * per)
        q = pj**0.3
        assert abs(float(res.outcome[sl].double().mean()) - q) < 5 * math.sqrt(q * (1 - q) / per)


def test_factory_edge_cases():
    gen = torch.Generator().manual_seed(4)
    res = bernoulli_factory_power(coin_for(torch.ones(100, dtype=torch.float64), gen), 0.3)
    assert bool(res.outcome.all()) and bool((res.flips == 1).all())
    # alpha = 1 decides after exactly one flip: the coin itself.
    res = bernoulli_factory_power(coin_for(torch.full((4000,), 0.3), gen), 1.0, generator=gen)
    assert bool((res.flips == 1).all())
    assert abs(float(res.outcome.double().mean()) - 0.3) < 5 * math.sqrt(0.21 / 4000)
    # A coin that never lands heads: False, or exhausted (and False) after max_steps flips.
    res = bernoulli_factory_power(coin_for(torch.zeros(2000), gen), 0.5, max_steps=50, generator=gen)
    assert not bool(res.outcome.any())
    assert bool(res.exhausted.any()) and bool((res.flips[res.exhausted] == 50).all())
    assert bool((res.flips[~res.exhausted] <= 50).all())
    # P(undecided after 50 tails) = prod_{i<=50} (1 - 0.5/i) = Gamma(50.5)/(Gamma(0.5)Gamma(51))
    stuck = math.exp(math.lgamma(50.5) - math.lgamma(0.5) - math.lgamma(51))
    assert abs(float(res.exhausted.double().mean()) - stuck) < 5 * math.sqrt(stuck / 2000)


def test_factory_bad_arguments_raise():
    coin = coin_for(torch.full((3,), 0.5), torch.Generator())
    for alpha in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            bernoulli_factory_power(coin, alpha)
    with pytest.raises(TypeError, match="alpha"):
        bernoulli_factory_power(coin, True)
    with pytest.raises(ValueError, match="flips_per_call"):
        bernoulli_factory_power(coin, 0.5, flips_per_call=0)
    with pytest.raises(ValueError, match="max_steps"):
        bernoulli_factory_power(coin, 0.5, max_steps=0)
    with pytest.raises(TypeError, match="bool tensor"):
        bernoulli_factory_power(lambda k: torch.zeros(k, 3), 0.5)
    with pytest.raises(ValueError, match=r"shape \(k, batch\)"):
        bernoulli_factory_power(lambda k: torch.zeros(k, 3, 2, dtype=torch.bool), 0.5)


# ----------------------------------------------------------------------------- batched approximation


def reference_probs(row: list, temperature: float) -> dict:
    """Plain per-row implementation of the documented weights (Counter + math.comb)."""
    counts = Counter(row)
    big_n = len(row)
    inv = 1.0 / temperature
    if abs(inv - round(inv)) < 1e-9:
        n, alpha = round(inv), 0.0
    else:
        n, alpha = math.floor(inv), inv - math.floor(inv)
    c_max = max(counts.values())
    if c_max < n + (1 if alpha > 0 else 0):  # fallback: uniform over the most frequent values
        w = {x: float(c == c_max) for x, c in counts.items()}
    else:
        w = {x: float(math.comb(c, n)) for x, c in counts.items()}
        if alpha > 0:
            w = {x: v * (max(counts[x] - n, 0) / (big_n - n)) ** alpha for x, v in w.items()}
    total = sum(w.values())
    return {x: v / total for x, v in w.items()}


def choice_frequencies(row: torch.Tensor, temperature: float, reps: int, seed: int) -> Counter:
    """Run the batched sampler on ``reps`` copies of one row ``(N, *event)``; count the choices."""
    cands = row[:, None].expand(row.shape[0], reps, *row.shape[1:])  # (N, reps, *event)
    gen = torch.Generator().manual_seed(seed)
    events, index = batched_temperature_sample(
        cands, temperature, event_ndim=row.dim() - 1, generator=gen, return_index=True
    )
    assert events.shape == (reps, *row.shape[1:]) and index.shape == (reps,)
    assert torch.equal(events, cands[index, torch.arange(reps)])
    flat = events.reshape(reps, -1)
    return Counter(tuple(e) if len(e) > 1 else e[0] for e in flat.tolist())


def assert_matches_reference(row: torch.Tensor, temperature: float, reps=20_000, seed=0):
    as_list = [tuple(e) if len(e) > 1 else e[0] for e in row.reshape(row.shape[0], -1).tolist()]
    probs = reference_probs(as_list, temperature)
    freq = choice_frequencies(row, temperature, reps, seed)
    assert set(freq) <= {x for x, p in probs.items() if p > 0}  # zero-weight values never chosen
    support = [x for x, p in probs.items() if p > 0]
    if len(support) > 1:
        obs = [freq.get(x, 0) for x in support]
        exp = [probs[x] * reps for x in support]
        assert chisquare(obs, exp).pvalue > 1e-3
    return probs, freq


@pytest.fixture(params=["lookup", "direct"])
def weight_path(request, monkeypatch):
    """Run a test with the (N+1)^2 weight table and with the per-row path used for large N."""
    if request.param == "direct":
        monkeypatch.setattr(temperature_module, "_MAX_LOOKUP_N", 0)
    return request.param


def test_batched_hand_checked_weights(weight_path):
    # T = 1/2: counts (3, 1) -> binom(3,2)=3 vs binom(1,2)=0: always the triple.
    _, freq = assert_matches_reference(torch.tensor([4, 9, 4, 4]), 0.5, reps=2000)
    assert freq == Counter({4: 2000})
    # counts (2, 2) -> 50/50.
    _, freq = assert_matches_reference(torch.tensor([5, 8, 8, 5]), 0.5)
    assert abs(freq[5] / 20_000 - 0.5) < 5 * math.sqrt(0.25 / 20_000)
    # T = 1 picks a uniform draw: value probability c_x / N.
    probs, _ = assert_matches_reference(torch.tensor([4, 9, 4, 4]), 1.0)
    assert probs == {4: 0.75, 9: 0.25}


@pytest.mark.parametrize("temperature", [0.7, 0.37, 0.25, 0.5, 1.0])
def test_batched_matches_plain_counter_formula(temperature, weight_path):
    # counts (5, 3, 2, 1, 1) over N = 12 draws.
    row = torch.tensor([3, 1, 3, 2, 3, 0, 1, 3, 2, 4, 1, 3])
    probs, _ = assert_matches_reference(row, temperature, seed=int(100 * temperature))
    if temperature == 0.7:  # W = c ((c-1)/11)^(3/7): hand check of the generalised weights
        w = {3: 5 * (4 / 11) ** (3 / 7), 1: 3 * (2 / 11) ** (3 / 7), 2: 2 * (1 / 11) ** (3 / 7)}
        assert probs[3] == pytest.approx(w[3] / sum(w.values()))
        assert probs[0] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_batched_parity_with_counter_on_random_rows(seed):
    gen = torch.Generator().manual_seed(seed)
    big_n, k = 24, 2
    ids = torch.multinomial(torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1]), big_n, True, generator=gen)
    row = TOKENS[ids][:, :k]  # (N, 2): two-token events
    for temperature in (0.45, 0.8):
        assert_matches_reference(row, temperature, reps=8000, seed=seed)


def test_batched_groups_whole_events():
    # (1,2) twice; (1,3) and (4,2) share one element each with it. Elementwise grouping would be
    # wrong; whole-event grouping gives (1,2) weight binom(2,2) = 1 and the others 0.
    row = torch.tensor([[1, 2], [1, 3], [1, 2], [4, 2]])
    _, freq = assert_matches_reference(row, 0.5, reps=1000)
    assert freq == Counter({(1, 2): 1000})
    # Event shape (2, 2): only the last element differs.
    row = torch.tensor([[[1, 2], [3, 4]], [[1, 2], [3, 5]], [[1, 2], [3, 4]]])
    events = batched_temperature_sample(row[:, None].expand(3, 500, 2, 2), 0.5, event_ndim=2)
    assert events.shape == (500, 2, 2) and bool((events == row[0]).all())
    # event_ndim=0: every element is an event of its own, each column a row: (N=3, 2, 2) -> (2, 2)
    events = batched_temperature_sample(row, 0.5)
    assert torch.equal(events, torch.tensor([[1, 2], [3, 4]]))


def test_batched_fallback_when_no_value_reaches_n(weight_path):
    # T = 1/4 with counts (3, 3, 1): no value occurs 4 times -> uniform over the two triples.
    probs, freq = assert_matches_reference(torch.tensor([1, 2, 1, 2, 1, 2, 3]), 0.25)
    assert probs == {1: 0.5, 2: 0.5, 3: 0.0} and 3 not in freq
    # T = 0.37 (n = 2, alpha > 0) with counts (2, 1, 1): needs 3 -> the pair, always.
    _, freq = assert_matches_reference(torch.tensor([6, 5, 6, 7]), 0.37, reps=1000)
    assert freq == Counter({6: 1000})
    # All distinct: uniform over the draws.
    probs, _ = assert_matches_reference(torch.tensor([0, 1, 2, 3, 4]), 0.7)
    assert all(p == pytest.approx(0.2) for p in probs.values())


@given(
    st.lists(st.lists(st.integers(0, 3), min_size=2, max_size=2), min_size=1, max_size=12),
    st.sampled_from([1.0, 0.8, 0.5, 0.37, 0.3, 0.25, 0.2]),
    st.integers(0, 2**31 - 1),
)
def test_batched_choice_is_a_supported_candidate(row, temperature, seed):
    cands = torch.tensor(row)[:, None].expand(-1, 64, -1)  # (N, 64, 2)
    events, index = batched_temperature_sample(
        cands, temperature, event_ndim=1, generator=torch.Generator().manual_seed(seed), return_index=True
    )
    assert bool(((index >= 0) & (index < len(row))).all())
    assert torch.equal(events, cands[index, torch.arange(64)])
    probs = reference_probs([tuple(e) for e in row], temperature)
    assert all(probs[tuple(e)] > 0 for e in events.tolist())


def reference_probs_from_counts(counts: torch.Tensor, temperature: float) -> torch.Tensor:
    """Documented weights from per-category counts ``(rows, C)`` -> choice probabilities."""
    n, alpha = _split_inverse_temperature(temperature)
    c = counts.double()
    big_n = c.sum(1, keepdim=True)
    c_max = c.max(1, keepdim=True).values
    w = torch.where(c >= n, torch.exp(torch.lgamma(c + 1) - torch.lgamma(c - n + 1)), 0.0)
    if alpha > 0:
        w = w * ((c - n).clamp_min(0) / (big_n - n)) ** alpha
    w = torch.where(c_max < n + (alpha > 0), (c == c_max).double(), w)
    return w / w.sum(1, keepdim=True)


def tv_bounds(per_row: torch.Tensor, target: torch.Tensor, z: float = 5.0) -> tuple[float, float]:
    """Bounds on ``TV(E[q], target)`` from per-row choice probabilities ``q`` ``(rows, C)``.

    Each component of ``mean(q) - target`` is within ``z`` standard errors of its expectation
    (union bound over components: failure probability ``< 2 C Phi(-z)``), so
    ``0.5 sum_x (|d_x| -+ z se_x)`` bound the true distance.
    """
    d = (per_row.mean(0) - target).abs()
    se = per_row.std(0) / math.sqrt(per_row.shape[0])
    return 0.5 * float((d - z * se).clamp_min(0).sum()), 0.5 * float((d + z * se).sum())


def test_batched_distance_to_target_shrinks_with_n():
    """Many rows of N draws from a known P: the choice approaches P^(1/T)/Z as N grows.

    Per row, the documented weights give exact choice probabilities ``q`` given the counts. The
    sampler's choices must follow their average over rows (chi-square), and the method's bias
    ``TV(E[q], P^(1/T)/Z)``, bounded from the rows' mean and standard error, must be clearly
    positive at N = 16 and at most half of that at N = 256 (it falls like 1/N: 0.040 -> 0.003
    at T = 0.5, 0.026 -> 0.0002 at T = 0.7). With 5 standard errors per component each
    statement fails with probability below 1e-5 on any seed.
    """
    p = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.05])
    rows = 50_000
    gen = torch.Generator().manual_seed(0)
    lower, upper = {}, {}
    for big_n in (16, 256):
        cands = torch.multinomial(p, big_n * rows, True, generator=gen).view(big_n, rows)
        counts = torch.zeros(p.numel(), rows, dtype=torch.long)
        counts = counts.scatter_add_(0, cands, torch.ones_like(cands)).T  # (rows, C)
        for temperature in (0.5, 0.7):
            chosen = batched_temperature_sample(cands, temperature, generator=gen)
            per_row = reference_probs_from_counts(counts, temperature)  # (rows, C)
            freq = torch.bincount(chosen, minlength=p.numel()).double()
            assert chisquare(freq.numpy(), (per_row.mean(0) * rows).numpy()).pvalue > 1e-5
            target = tempered(p.double(), temperature)
            lower[temperature, big_n], upper[temperature, big_n] = tv_bounds(per_row, target)
    for temperature in (0.5, 0.7):
        assert upper[temperature, 256] < 0.5 * lower[temperature, 16], (lower, upper)


def test_batched_value_types():
    # Large and negative ids take the hashed-key path; bools, int16 and floats (-0.0 == 0.0).
    def copies(row):  # (N, *event) -> (N, 50, *event)
        return row[:, None].expand(row.shape[0], 50, *row.shape[1:])

    big = torch.tensor([[2**40, -5, 7, 1], [3, 4, 5, 2**20], [2**40, -5, 7, 1]])
    events = batched_temperature_sample(copies(big), 0.5, event_ndim=1)
    assert bool((events == big[0]).all())
    small = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4]], dtype=torch.int16)
    assert bool((batched_temperature_sample(copies(small), 0.5, event_ndim=1) == small[0]).all())
    flags = torch.tensor([True, False, False])
    assert not bool(batched_temperature_sample(copies(flags), 0.5).any())
    zeros = torch.tensor([[0.0, 1.5], [-0.0, 1.5], [2.0, 1.5]])
    events = batched_temperature_sample(copies(zeros), 0.5, event_ndim=1)
    assert events.dtype == torch.float32 and bool((events == zeros[0]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_batched_nan_events_are_groups_of_their_own(dtype, weight_path):
    """Two NaN events with the same bit pattern are two draws seen once each, never a pair."""
    nan = float("nan")
    row = torch.tensor([[nan, 1.0], [2.0, 2.0], [nan, 1.0], [2.0, 2.0], [3.0, 3.0]], dtype=dtype)
    reps = 6000
    cands = row[:, None].expand(5, reps, 2)  # (N=5, reps, 2)
    gen = torch.Generator().manual_seed(7)
    # T = 1/2: binom(2, 2) = 1 for (2, 2), binom(1, 2) = 0 for everything else.
    events, index = batched_temperature_sample(cands, 0.5, event_ndim=1, generator=gen, return_index=True)
    assert bool((events == 2.0).all()) and bool((index == 1).all())
    # T = 1: a uniformly chosen draw, each NaN draw with its own index.
    events, index = batched_temperature_sample(cands, 1.0, event_ndim=1, generator=gen, return_index=True)
    counts = torch.bincount(index, minlength=5)
    assert chisquare(counts[[0, 1, 2, 4]].numpy(), [reps / 5, 2 * reps / 5, reps / 5, reps / 5]).pvalue > 1e-4
    assert counts[3] == 0  # the second (2, 2) is never the reported index: the first copy is
    picked = events[:, 0].isnan()
    assert torch.equal(picked, (index == 0) | (index == 2))
    # Only NaN: all singletons, so the fallback is uniform over the five draws.
    only_nan = torch.full((5, reps), nan, dtype=dtype)
    index = batched_temperature_sample(only_nan, 0.25, generator=gen, return_index=True)[1]
    assert chisquare(torch.bincount(index, minlength=5).numpy()).pvalue > 1e-4


def test_batched_nan_path_without_nan_changes_nothing(monkeypatch):
    """Off CPU the NaN mask is always applied (no sync to check it); with no NaN it is a no-op."""
    cands = torch.randint(0, 4, (30, 200, 2), generator=torch.Generator().manual_seed(8)).float()
    expected = batched_temperature_sample(
        cands, 0.4, event_ndim=1, generator=torch.Generator().manual_seed(9), return_index=True
    )
    monkeypatch.setattr(temperature_module, "_nan_events", lambda f: f.isnan().any(dim=-1))
    got = batched_temperature_sample(
        cands, 0.4, event_ndim=1, generator=torch.Generator().manual_seed(9), return_index=True
    )
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_batched_any_number_of_batch_axes():
    """(N, *batch, *event) with 0, 1 or 2 batch axes: the same choices as one flat batch axis."""
    cands = torch.randint(0, 3, (12, 6, 5, 2), generator=torch.Generator().manual_seed(10))
    flat_events, flat_index = batched_temperature_sample(
        cands.reshape(12, 30, 2), 0.6, event_ndim=1, generator=torch.Generator().manual_seed(11), return_index=True
    )
    events, index = batched_temperature_sample(
        cands, 0.6, event_ndim=1, generator=torch.Generator().manual_seed(11), return_index=True
    )
    assert events.shape == (6, 5, 2) and index.shape == (6, 5)
    assert torch.equal(events.reshape(30, 2), flat_events) and torch.equal(index.reshape(30), flat_index)
    assert torch.equal(events, cands.gather(0, index[None, ..., None].expand(1, 6, 5, 2))[0])
    one, i = batched_temperature_sample(cands[:, 0, 0], 0.6, event_ndim=1, return_index=True)
    assert one.shape == (2,) and i.shape == () and torch.equal(one, cands[i, 0, 0])
    # event_ndim=3: the whole (6, 5, 2) block is one event, a single row of 12 draws
    block = batched_temperature_sample(cands, 0.6, event_ndim=3)
    assert block.shape == (6, 5, 2) and bool((cands == block).flatten(1).all(1).any())


@pytest.mark.parametrize(
    ("dtype", "high", "width", "sliced"),
    [
        (torch.int64, 3, 1, False),
        (torch.int64, 3, 2, True),
        (torch.int64, 70_000, 2, False),
        (torch.int64, 3, 3, False),
        (torch.int64, 3, 4, True),
        (torch.int64, 3, 8, False),
        (torch.int16, 3, 4, False),
        (torch.int32, 3, 3, False),
        (torch.bool, 2, 5, False),
        (torch.float32, 3, 2, False),
        (torch.float64, 3, 3, True),
    ],
)
def test_event_keys_are_injective(dtype, high, width, sliced):
    """Every key path (lane copy, shifts, base-2**w packing, hash) separates distinct events."""
    gen = torch.Generator().manual_seed(width)
    x = torch.randint(0, high, (3000, width + 2), generator=gen)
    x[:5] = -x[:5] + (2**40 if dtype == torch.int64 else 0)  # a few out-of-range events
    x = x.to(dtype)
    x = x[:, :width] if sliced else x[:, :width].contiguous()
    strided = torch.zeros(x.shape[0], 2 * width, dtype=dtype)
    strided[:, ::2] = x
    assert torch.unique(temperature_module._event_keys(strided[:, ::2])).numel() == (torch.unique(x, dim=0).shape[0])
    keys = temperature_module._event_keys(x)
    assert keys.shape == (3000,) and keys.dtype == torch.int64
    assert torch.unique(keys).numel() == torch.unique(x, dim=0).shape[0]


def test_batched_numpy_and_torch_row_sorts_agree(monkeypatch):
    # The CPU path sorts rows with NumPy; other devices use torch.sort. Both must give exactly
    # the same choices for the same uniforms.
    cands = torch.randint(0, 4, (20, 300, 2), generator=torch.Generator().manual_seed(5))
    expected = batched_temperature_sample(cands, 0.4, event_ndim=1, generator=torch.Generator().manual_seed(6))
    monkeypatch.setattr(temperature_module, "_sort_rows", lambda k: torch.sort(k, dim=1).values)
    got = batched_temperature_sample(cands, 0.4, event_ndim=1, generator=torch.Generator().manual_seed(6))
    assert torch.equal(got, expected)


@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.integers(1, 4))
def test_group_counts_are_the_run_lengths(row, rows):
    keys = torch.tensor(row).expand(rows, -1)
    sorted_keys = temperature_module._sort_rows(keys.contiguous())
    counts = temperature_module._group_counts(sorted_keys)
    values, expected = torch.unique(torch.tensor(row), return_counts=True)
    for r in range(rows):
        ends = counts[r].nonzero().squeeze(1)
        assert torch.equal(sorted_keys[r, ends], values)  # one entry per distinct value
        assert torch.equal(counts[r, ends].long(), expected)


def test_batched_reproducible_and_empty():
    cands = torch.randint(0, 3, (10, 200, 2), generator=torch.Generator().manual_seed(0))
    a = batched_temperature_sample(cands, 0.6, generator=torch.Generator().manual_seed(1))
    b = batched_temperature_sample(cands, 0.6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    events, index = batched_temperature_sample(torch.zeros(5, 0, 3), 0.5, event_ndim=1, return_index=True)
    assert events.shape == (0, 3) and index.shape == (0,)
    events, index = batched_temperature_sample(torch.zeros(5, 2, 3, 0), 0.5, event_ndim=1, return_index=True)
    assert events.shape == (2, 3, 0) and index.shape == (2, 3)


def test_batched_bad_inputs_raise():
    with pytest.raises(TypeError, match="candidates must be a tensor"):
        batched_temperature_sample([[1, 2]], 0.5)
    with pytest.raises(TypeError, match="real or integer"):
        batched_temperature_sample(torch.zeros(2, 3, dtype=torch.complex64), 0.5)
    with pytest.raises(ValueError, match=r"\(N, \*batch, \*event\) with event_ndim=1"):
        batched_temperature_sample(torch.zeros(5, dtype=torch.long), 0.5, event_ndim=1)
    with pytest.raises(ValueError, match=r"\(N, \*batch, \*event\)"):
        batched_temperature_sample(torch.tensor(3), 0.5)
    with pytest.raises(ValueError, match="N >= 1"):
        batched_temperature_sample(torch.zeros(0, 2, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="event_ndim"):
        batched_temperature_sample(torch.zeros(2, 3, dtype=torch.long), 0.5, event_ndim=-1)
    with pytest.raises(TypeError, match="event_ndim"):
        batched_temperature_sample(torch.zeros(2, 3, dtype=torch.long), 0.5, event_ndim=1.0)
    with pytest.raises(TypeError, match="return_index"):
        batched_temperature_sample(torch.zeros(2, 3, dtype=torch.long), 0.5, return_index=1)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_exact_and_batched():
    dev = torch.device("cuda")
    probs = P5.float().to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    batch = 20_000

    def sampler(k, rows):
        ids = torch.multinomial(probs, k * rows.numel(), True, generator=gen)
        return ids.view(k, rows.numel())

    out = temperature_sample(sampler, 0.7, pass_rows=True, batch_size=batch, device=dev, generator=gen)
    assert out.samples.device.type == "cuda"
    assert chi2_pvalue(out.samples.cpu(), tempered(P5, 0.7)) > 1e-3
    cands = torch.multinomial(probs, batch * 64, True, generator=gen).view(64, batch)
    chosen = batched_temperature_sample(cands, 0.5, generator=gen)
    assert chosen.device.type == "cuda"
    cpu = batched_temperature_sample(cands.cpu(), 0.5, generator=torch.Generator().manual_seed(0))
    table = chi2_contingency([torch.bincount(x.cpu(), minlength=5).numpy() for x in (chosen, cpu)])
    assert table.pvalue > 1e-3


@pytest.mark.gpu
def test_cuda_batched_never_synchronises():
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    ints = torch.randint(0, 4, (64, 512, 2), device=dev, generator=gen)
    floats = ints.float()
    floats[:8, :16, 1] = math.nan  # NaN events, each a group of its own
    rows = torch.arange(512, device=dev)
    for cands in (ints, floats, ints[..., 0]):
        event_ndim = cands.dim() - 2
        batched_temperature_sample(cands, 0.4, event_ndim=event_ndim, generator=gen)  # warm-up
        torch.cuda.set_sync_debug_mode("error")
        try:
            events, index = batched_temperature_sample(
                cands, 0.4, event_ndim=event_ndim, generator=gen, return_index=True
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert events.device.type == "cuda" and index.shape == (512,)
        picked = cands[index, rows]
        assert bool(((picked == events) | (picked.isnan() & events.isnan())).all())
