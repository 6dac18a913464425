"""Temperature sampling for black-box samplers.

A likelihood-free model (for example a CALM generative head) gives a *sampler*, not logits, so
the tempered distribution ``P_T(x) = P(x)^(1/T) / Z_T`` with ``Z_T = sum_x P(x)^(1/T)`` has to be
reached from samples alone. This module offers:

* :func:`temperature_sample`: an exact rejection sampler for any ``T`` in ``(0, 1]``. Write
  ``1/T = n + alpha`` with ``n = floor(1/T)`` and ``alpha`` in ``[0, 1)``. One *attempt* draws ``n``
  values; they must all be identical (probability ``P(x)^n`` for the value ``x``). When
  ``alpha > 0`` the candidate must then also pass :func:`bernoulli_factory_power` for
  ``P(x)^alpha``, whose coin is "a fresh draw equals the candidate". An attempt therefore accepts
  ``x`` with probability ``P(x)^(n + alpha) = P(x)^(1/T)`` and the accepted values follow
  ``P_T`` exactly. The expected number of draws per row is

  ``E[draws] = (n + 1{alpha > 0} * sum_x P(x)^(1/T - 1)) / Z_T``

  (Wald's identity: an attempt costs ``n`` draws plus, after the ``n`` draws agreed on ``x``, the
  factory's ``P(x)^(alpha - 1)`` expected draws; attempts repeat ``1 / Z_T`` times on average).
  For a spread-out ``P`` this grows exponentially in ``1/T``. A sampler call asks for at most
  ``max_draws_per_call`` draws per row (attempts longer than that span several calls) and there
  are at most ``max_rounds`` calls; rows left over raise, or fall back with a warning.
* :func:`bernoulli_factory_power`: the generic factory turning a coin of unknown success
  probability ``p`` into a coin of success probability ``p^alpha``, ``alpha`` in ``(0, 1]``.
* :func:`batched_temperature_sample`: a fixed-cost approximation that re-weights ``N`` given
  draws per row (the CALM paper's batch scheme, generalised to any ``T``), fully vectorised.

Samples come first everywhere, as in :mod:`likelihood_free.energy`: a sampler returns
``(k, batch, *event)`` and the batched approximation takes ``(N, *batch, *event)``. Events are
compared as a whole: a CALM chunk of ``K`` token ids is one event, and two events are equal when
all their elements are equal (``==``), so draws must be integers or otherwise exactly comparable
values; an event containing NaN equals no other draw.
"""

# Axis key (tensor shapes in comments):
#   k      draws (or coin flips) requested from the sampler in one round (one call)
#   b      batch rows (all batch axes flattened into one)
#   r      rows still active (not yet accepted) in the exact sampler
#   N      candidate draws per row (batched approximation)
#   E      number of elements of one event (prod of *event; 1 for scalar events)
#   *event trailing shape of one event (e.g. (K,) for a chunk of K token ids)

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BernoulliFactoryResult",
    "TemperatureFallbackWarning",
    "TemperatureSample",
    "TemperatureSamplingExhausted",
    "batched_temperature_sample",
    "bernoulli_factory_power",
    "temperature_sample",
]

# 1/T is snapped to the nearest integer when it is this close (relative), so that T = 1/3, 0.1
# and friends give alpha = 0 exactly despite floating point.
_SNAP_TOLERANCE = 1e-9
# Beyond this, n identical draws per attempt is hopeless (and 1/T may not even be finite).
_MAX_INVERSE_TEMPERATURE = 1e6
_ON_EXHAUSTED = ("raise", "fallback")
# With pass_rows=True and the default draws_per_round, a round asks the last rows for up to this
# many times the base number of draws (tail rows of the factory can need thousands of draws).
_MAX_GROWTH = 16
# Default cap on the draws per row in one sampler call: bounds the memory of a call at low T
# (an attempt of n > cap identical draws then spans several calls).
_MAX_DRAWS_PER_CALL = 1024
# The batched sampler reads group weights from an (N+1)^2 table up to this N (8 MiB).
_MAX_LOOKUP_N = 1023


class TemperatureSample(NamedTuple):
    """Result of :func:`temperature_sample`.

    Attributes:
        samples: ``(batch, *event)`` one value per row, same dtype and device as the draws.
        draws: ``(batch,)`` long, draws consumed by each row's procedure (draws requested in the
            same round but not needed after the row accepted are not counted).
        exhausted: ``(batch,)`` bool, rows that had not accepted after ``max_rounds`` rounds (only
            ever ``True`` with ``on_exhausted="fallback"``; their sample is the fallback value,
            *not* a tempered draw). :attr:`num_exhausted` counts them.
    """

    samples: Tensor
    draws: Tensor
    exhausted: Tensor

    @property
    def num_exhausted(self) -> int:
        """Number of rows that fell back to an untempered value (``exhausted.sum()``)."""
        return int(self.exhausted.sum())


class BernoulliFactoryResult(NamedTuple):
    """Result of :func:`bernoulli_factory_power`.

    Attributes:
        outcome: ``(batch,)`` bool, ``True`` with probability ``p^alpha`` per row (``False`` for
            exhausted rows).
        flips: ``(batch,)`` long, coin flips consumed by each row.
        exhausted: ``(batch,)`` bool, rows that had not decided after ``max_steps`` flips.
    """

    outcome: Tensor
    flips: Tensor
    exhausted: Tensor


class TemperatureFallbackWarning(UserWarning):
    """Warned by :func:`temperature_sample` when ``on_exhausted="fallback"`` returned rows that
    did not accept within ``max_rounds``: their values are *not* tempered samples.

    The message gives the number of such rows; the result marks them in ``exhausted`` and counts
    them in ``num_exhausted``. Silence it with
    ``warnings.simplefilter("ignore", TemperatureFallbackWarning)`` when the fallback is expected.
    """


class TemperatureSamplingExhausted(RuntimeError):
    """Raised by :func:`temperature_sample` when rows have not accepted within ``max_rounds``.

    Attributes:
        rows: indices of the rows that did not accept, as a Python list.
        result: the :class:`TemperatureSample` that ``on_exhausted="fallback"`` would have returned.
    """

    def __init__(self, message: str, rows: list[int], result: TemperatureSample) -> None:
        super().__init__(message)
        self.rows = rows
        self.result = result


# ----------------------------------------------------------------------------- validation helpers


def _split_inverse_temperature(temperature: float) -> tuple[int, float]:
    """Validate ``temperature`` and return ``(n, alpha)`` with ``1/T = n + alpha``.

    ``alpha`` is snapped to ``0`` when ``1/T`` is within a relative ``1e-9`` of an integer, so that
    ``T = 0.5`` gives ``(2, 0.0)`` and ``T = 1/3`` gives ``(3, 0.0)``.
    """
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1 or temperature.is_complex():
            raise TypeError(
                "temperature must be a real number or a one-element real tensor, got a tensor "
                f"of shape {tuple(temperature.shape)} and dtype {temperature.dtype}"
            )
        temperature = float(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    t = float(temperature)
    if math.isnan(t):
        raise ValueError("temperature must be in (0, 1], got nan")
    if t > 1.0:
        raise ValueError(
            f"temperature must be in (0, 1], got {t}: T > 1 flattens the distribution, which "
            "cannot be reached by rejection from the model's own samples"
        )
    if t <= 0.0:
        raise ValueError(
            f"temperature must be in (0, 1], got {t}: T <= 0 is greedy decoding (the mode), "
            "which a sampler cannot give exactly; use a small positive temperature instead"
        )
    inv = 1.0 / t
    if inv > _MAX_INVERSE_TEMPERATURE:
        raise ValueError(
            f"temperature must be at least {1.0 / _MAX_INVERSE_TEMPERATURE:g}, got {t}: it would "
            f"need {inv:.3g} identical draws per attempt"
        )
    nearest = round(inv)
    if abs(inv - nearest) <= _SNAP_TOLERANCE * inv:
        return int(nearest), 0.0
    n = math.floor(inv)
    return n, inv - n


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _uniform(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Float64 uniforms in [0, 1) on ``device``, drawn on the generator's own device."""
    if generator is None:
        return torch.rand(shape, device=device, dtype=torch.float64)
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
    return u.to(device)


def _first_true(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(k, r)`` bool -> ``(any (r,), index (r,))`` of the first ``True`` along dim 0 (0 if none)."""
    return mask.any(dim=0), mask.to(torch.uint8).argmax(dim=0)


def _factory_step(flip: Tensor, u: Tensor, step: Tensor | int, alpha: float) -> tuple[Tensor, Tensor]:
    """One step ``i`` (``step``, 1-based) of the p^alpha factory: ``(accept, reject)`` masks.

    Heads accepts; tails rejects with probability ``alpha / i`` (``u < alpha / i``), else the
    factory continues with step ``i + 1``.
    """
    return flip, ~flip & (u * step < alpha)


# ----------------------------------------------------------------------------- Bernoulli factory


def bernoulli_factory_power(
    coin: Callable[[int], Tensor],
    alpha: float,
    *,
    flips_per_call: int = 4,
    max_steps: int = 10_000,
    generator: torch.Generator | None = None,
) -> BernoulliFactoryResult:
    """Turn coins of unknown success probability ``p`` into coins of probability ``p^alpha``.

    For every row independently: for ``i = 1, 2, ...`` flip the coin; heads returns ``True``;
    tails returns ``False`` with probability ``alpha / i``, else continue. Since
    ``prod_{j<=m} (1 - alpha/j) = (-1)^m binom(alpha - 1, m)``, the binomial series gives

    ``P(True) = p * sum_m (1-p)^m prod_{j<=m}(1 - alpha/j) = p * p^(alpha-1) = p^alpha``

    and the expected number of flips is ``sum_m (1-p)^m prod_{j<=m}(1 - alpha/j) = p^(alpha-1)``
    (one flip when ``alpha = 1``; unbounded tail when ``p`` is tiny, hence ``max_steps``).

    All rows run in parallel: each call asks ``coin(flips_per_call)`` for several flips of every row
    and the first deciding flip of each row is found with whole-tensor operations. Flips after a
    row's decision are discarded (they are independent, so this does not bias anything) and are
    not counted in ``flips``.

    Args:
        coin: ``coin(k) -> (k, batch)`` bool tensor of independent flips, row ``j`` having its own
            unknown success probability ``p_j``. The batch size must not change between calls.
        alpha: exponent in ``(0, 1]``.
        flips_per_call: flips requested per call (``k``), ``>= 1``.
        max_steps: flips after which undecided rows stop; they get ``outcome=False`` and
            ``exhausted=True`` (``p^alpha`` is then small: at least that many tails in a row).
        generator: random generator for the factory's own ``alpha / i`` decisions.

    Returns:
        :class:`BernoulliFactoryResult` with ``outcome`` ``(batch,)`` bool, ``flips`` ``(batch,)``
        long and ``exhausted`` ``(batch,)`` bool, on the coin's device.

    Raises:
        TypeError: ``alpha``, ``flips_per_call``, ``max_steps`` or ``generator`` of the wrong
            type, or a coin that does not return a bool tensor.
        ValueError: ``alpha`` outside ``(0, 1]``, non-positive counts, or a coin returning the
            wrong shape.

    Example:
        >>> import torch
        >>> from likelihood_free.temperature import bernoulli_factory_power
        >>> g = torch.Generator().manual_seed(0)
        >>> p = torch.full((20000,), 0.25)
        >>> coin = lambda k: torch.rand(k, p.numel(), generator=g) < p
        >>> res = bernoulli_factory_power(coin, 0.5, generator=g)
        >>> round(res.outcome.float().mean().item(), 1)  # 0.25 ** 0.5
        0.5
        >>> round(res.flips.float().mean().item(), 0)  # 0.25 ** -0.5
        2.0
    """
    if isinstance(alpha, bool) or not isinstance(alpha, Real):
        raise TypeError(f"alpha must be a real number in (0, 1], got {type(alpha).__name__}")
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:  # also rejects nan
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    k = _check_int(flips_per_call, "flips_per_call", 1)
    max_steps = _check_int(max_steps, "max_steps", 1)
    _check_generator(generator)

    outcome = flips = done = None
    batch = -1
    steps_done = 0  # every undecided row has used exactly this many flips
    while steps_done < max_steps:
        k_now = min(k, max_steps - steps_done)
        f = coin(k_now)
        if not isinstance(f, Tensor) or f.dtype != torch.bool:
            got = f.dtype if isinstance(f, Tensor) else type(f).__name__
            raise TypeError(f"coin(k) must return a bool tensor of shape (k, batch), got {got}")
        if outcome is None:
            if f.dim() != 2:
                raise ValueError(f"coin(k) must return shape (k, batch), got {tuple(f.shape)} for k={k_now}")
            batch = f.shape[1]
            outcome = torch.zeros(batch, dtype=torch.bool, device=f.device)
            flips = torch.zeros(batch, dtype=torch.long, device=f.device)
            done = torch.zeros(batch, dtype=torch.bool, device=f.device)
        if tuple(f.shape) != (k_now, batch):
            raise ValueError(f"coin(k) must return shape (k, batch) = ({k_now}, {batch}), got {tuple(f.shape)}")
        u = _uniform((k_now, batch), f.device, generator)  # (k, b)
        steps = torch.arange(steps_done + 1, steps_done + k_now + 1, device=f.device)[:, None]
        accept, reject = _factory_step(f, u, steps, alpha)  # (k, b) each
        decided, first = _first_true(accept | reject)  # (b,) each: first deciding flip
        newly = decided & ~done
        outcome = torch.where(newly, accept.gather(0, first[None]).squeeze(0), outcome)
        used = torch.where(decided, first + 1, torch.full_like(first, k_now))
        flips = flips + torch.where(done, torch.zeros_like(used), used)
        done = done | decided
        steps_done += k_now
        if bool(done.all()):  # one host sync per call, never per row
            break
    return BernoulliFactoryResult(outcome=outcome, flips=flips, exhausted=~done)


# ----------------------------------------------------------------------------- exact sampler


def temperature_sample(
    sampler: Callable[..., Tensor],
    temperature: float,
    *,
    max_rounds: int = 10_000,
    on_exhausted: str = "raise",
    pass_rows: bool = False,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    draws_per_round: int | None = None,
    max_draws_per_call: int = _MAX_DRAWS_PER_CALL,
    generator: torch.Generator | None = None,
) -> TemperatureSample:
    """Sample exactly from ``P(x)^(1/T) / Z_T`` for every row, given only a sampler of ``P``.

    *Cost first.* With ``1/T = n + alpha`` and ``Z_T = sum_x P(x)^(1/T)``, a row needs on average

    ``E[draws] = (n + 1{alpha > 0} sum_x P(x)^(1/T - 1)) / Z_T``

    draws (at most that when attempts span several calls, see below), which grows like
    ``V^(1/T - 1)`` for a spread-out ``P`` over ``V`` values: the sampler must repeat itself
    ``n`` times in a row. Every sampler call asks for at most ``max_draws_per_call`` draws per
    active row, and there are at most ``max_rounds`` calls, so a call's memory and the total work
    are bounded. For very low temperatures, where rows rarely accept within that budget, the
    fixed-cost approximation :func:`batched_temperature_sample` is the practical choice.

    *Procedure.* With ``n = floor(1/T)`` and ``alpha`` (snapped to 0 near integers), every row
    repeats *attempts* until one accepts: draw ``n`` values; if they are not all identical the
    attempt fails; otherwise, if ``alpha > 0``, run the ``p^alpha`` Bernoulli factory
    (:func:`bernoulli_factory_power`) whose coin is "a fresh draw equals the candidate": for
    ``i = 1, 2, ...`` a draw equal to the candidate accepts it, otherwise the attempt fails with
    probability ``alpha / i`` or the factory continues. An attempt accepts ``x`` with probability
    ``P(x)^n * P(x)^alpha``, so accepted values are distributed as ``P^(1/T) / Z_T`` exactly.
    Events are compared with ``==`` (whole events: all elements equal), so an event containing
    NaN never equals another draw (it can only be accepted at ``T = 1``, whose single draw is
    compared with nothing).

    All rows run in parallel with whole-batch tensor operations, and every *round* is one
    sampler call for ``k`` draws of each active row (``k`` is ``draws_per_round``, never above
    ``max_draws_per_call``). When ``k >= n``, a row in the identical-draws phase splits its ``k``
    draws into ``k // n`` attempts of ``n`` draws and takes the first that passes; each attempt is
    charged its ``n`` draws even when the first two already differ, as in the CALM paper. When
    ``n > k`` (low ``T``), an attempt spans several calls: it continues into the next call while
    every draw so far equals its first draw and fails at the first call that shows a mismatch,
    whose draws are its last (later draws are never asked for, so the mean of ``draws`` is then
    below the formula above). The factory then consumes the draws after the attempt (or, for a
    row already in the factory, all ``k``) up to its first decision, all found with tensor
    operations (no loop over rows or draws). Draws left over in a round (after an acceptance, a
    factory rejection, a failed or a partial attempt) are discarded: they are independent of
    everything decided, so this does not bias anything, and ``draws`` only counts the draws each
    row's procedure used. Rows that have accepted stop asking: with ``pass_rows=True`` the
    sampler is only called for the active rows; with ``pass_rows=False`` it is called for the
    whole batch and finished rows' draws are ignored. ``T = 1`` takes one draw per row.

    Args:
        sampler: with ``pass_rows=False``, ``sampler(k) -> (k, batch, *event)``: ``k`` independent
            draws for every row. With ``pass_rows=True``, ``sampler(k, rows) -> (k, len(rows),
            *event)`` where ``rows`` is a LongTensor of the still-active row indices (ascending);
            this lets a model skip its head for finished rows. Draws must be integers or otherwise
            exactly comparable; whole events are compared (all elements equal). Its randomness
            must be independent of ``generator`` (sharing one generator object is fine; two
            generators seeded alike are not).
        temperature: ``T`` in ``(0, 1]``.
        max_rounds: maximum number of sampler calls, ``>= 1``.
        on_exhausted: what to do with rows that have not accepted after ``max_rounds``:
            ``"raise"`` raises :class:`TemperatureSamplingExhausted` listing them;
            ``"fallback"`` returns, for those rows, the value of their latest attempt (its first
            draw, which is *not* a tempered sample), marks them in ``exhausted`` and warns with a
            :class:`TemperatureFallbackWarning` giving their number.
        pass_rows: call the sampler with the active row indices (see ``sampler``).
        batch_size: number of rows; required when ``pass_rows=True`` (the first call gets
            ``rows = arange(batch_size)``), otherwise optional and checked against the sampler.
        device: device of the ``rows`` tensors given to the sampler. Default: the generator's
            device (else the CPU) for the first call, then the device of the draws.
        draws_per_round: draws ``k`` per active row and round, from ``n`` to
            ``max_draws_per_call``. Default: ``n`` when ``alpha = 0``, ``n + 1`` otherwise, capped
            at ``max_draws_per_call``; with ``pass_rows=True`` the default then grows as rows
            finish (``k = base * batch / (4 * rows left)``, at most 16 times the base and
            ``max_draws_per_call``), so that the last rows, which can need many draws, take fewer
            sampler calls.
        max_draws_per_call: most draws asked per active row in one sampler call, ``>= 1``
            (default 1024): a call holds at most ``max_draws_per_call * batch`` draws. When
            ``n = floor(1/T)`` exceeds it, attempts span several calls.
        generator: random generator for the factory's ``alpha / i`` decisions.

    Returns:
        :class:`TemperatureSample`: ``samples`` ``(batch, *event)`` with the draws' dtype and
        device, ``draws`` ``(batch,)`` long and ``exhausted`` ``(batch,)`` bool.

    Raises:
        ValueError: temperature outside ``(0, 1]`` or nan (``T > 1`` cannot be reached by
            rejection from the model's own samples; ``T <= 0`` is greedy decoding), bad
            ``max_rounds``/``draws_per_round``/``max_draws_per_call``/``batch_size``, unknown
            ``on_exhausted``, missing ``batch_size`` with ``pass_rows=True``, or a sampler output
            of the wrong shape.
        TypeError: arguments of the wrong type (``generator`` not a ``torch.Generator``) or a
            sampler that does not return a tensor.
        TemperatureSamplingExhausted: rows still active after ``max_rounds`` with
            ``on_exhausted="raise"``; the message lists their indices.

    Warns:
        TemperatureFallbackWarning: rows fell back with ``on_exhausted="fallback"``.

    Example:
        >>> import torch
        >>> from likelihood_free.temperature import temperature_sample
        >>> probs = torch.tensor([0.6, 0.3, 0.1])
        >>> g = torch.Generator().manual_seed(0)
        >>> def sampler(k):  # k draws for each of 4000 rows: (k, 4000)
        ...     return torch.multinomial(probs.expand(4000, 3), k, True, generator=g).T
        >>> out = temperature_sample(sampler, 0.5, generator=g)
        >>> out.samples.shape, out.draws.dtype, out.num_exhausted
        (torch.Size([4000]), torch.int64, 0)
        >>> target = probs**2 / (probs**2).sum()  # about [0.78, 0.20, 0.02]
        >>> freq = torch.bincount(out.samples, minlength=3) / 4000
        >>> bool((freq - target).abs().max() < 0.03)
        True
        >>> expected = 2 / (probs**2).sum()  # E[draws] = n / Z_T at T = 1/2
        >>> bool(abs(out.draws.double().mean() - expected) < 0.25)  # 5 standard errors
        True
    """
    n, alpha = _split_inverse_temperature(temperature)
    opts = _exact_options(
        n, alpha, max_rounds, on_exhausted, pass_rows, batch_size, device, draws_per_round, max_draws_per_call
    )
    _check_generator(generator)
    run: _ExactRun | None = None  # created from the first call's draws
    k = opts.base_k
    for _ in range(opts.max_rounds):
        k = opts.round_size(k, run)
        x = _call_sampler(sampler, k, run, opts, generator)  # (k, batch or r, *event)
        if run is None:
            run = _ExactRun(x, opts)
        if run.active == 0:
            break
        x = run.prepare(x)  # (k, r, E)
        passed, picked, attempt_end = run.attempts(x) if not opts.span else run.spanning_attempt(x)
        run.cand = torch.where(run.in_factory[:, None], run.cand, picked)
        accepted = passed if alpha == 0 else run.factory(x, passed, attempt_end, generator)
        if run.retire(accepted) == 0:
            break
    return _finish(run, opts, temperature, k)


@dataclass
class _ExactOptions:
    """The checked settings of one :func:`temperature_sample` call."""

    n: int
    alpha: float
    max_rounds: int
    on_exhausted: str
    pass_rows: bool
    batch_size: int | None
    cap: int  # max_draws_per_call
    base_k: int  # draws per row and call before any growth
    adaptive: bool  # pass_rows and a default draws_per_round: k grows as rows finish
    span: bool  # attempts of n identical draws span several calls of k < n draws
    rows_device: torch.device | None

    @property
    def what(self) -> str:
        return "sampler(k, rows)" if self.pass_rows else "sampler(k)"

    def round_size(self, k: int, run: _ExactRun | None) -> int:
        """Draws per active row of the next call: with fewer rows left, more draws each (~batch * base_k / 4 in all)."""
        if not self.adaptive or run is None:
            return k
        grown = max(self.base_k, self.base_k * self.batch_size // (4 * run.active))
        return min(_MAX_GROWTH * self.base_k, grown, self.cap)


def _exact_options(
    n, alpha, max_rounds, on_exhausted, pass_rows, batch_size, device, draws_per_round, max_draws_per_call
) -> _ExactOptions:
    """Check :func:`temperature_sample`'s arguments (naming the bad one) and resolve the defaults."""
    max_rounds = _check_int(max_rounds, "max_rounds", 1)
    if not isinstance(on_exhausted, str) or on_exhausted not in _ON_EXHAUSTED:
        raise ValueError(f"on_exhausted must be one of {_ON_EXHAUSTED}, got {on_exhausted!r}")
    if not isinstance(pass_rows, bool):
        raise TypeError(f"pass_rows must be a bool, got {type(pass_rows).__name__}")
    if batch_size is not None:
        batch_size = _check_int(batch_size, "batch_size", 0)
    elif pass_rows:
        raise ValueError("batch_size is required when pass_rows=True (the first call gets rows = arange(batch_size))")
    cap = _check_int(max_draws_per_call, "max_draws_per_call", 1)
    base_k = min(n + (1 if alpha > 0 else 0), cap) if draws_per_round is None else _check_round(draws_per_round, n, cap)
    return _ExactOptions(
        n,
        alpha,
        max_rounds,
        on_exhausted,
        pass_rows,
        batch_size,
        cap,
        base_k,
        adaptive=draws_per_round is None and pass_rows,
        span=n > base_k,
        rows_device=torch.device(device) if device is not None else None,
    )


def _check_round(draws_per_round: object, n: int, cap: int) -> int:
    base_k = _check_int(draws_per_round, "draws_per_round", 1)
    if base_k < n:
        raise ValueError(f"draws_per_round must be at least n = floor(1/T) = {n} (one attempt), got {base_k}")
    if base_k > cap:
        raise ValueError(
            f"draws_per_round={base_k} exceeds max_draws_per_call={cap}; raise "
            "max_draws_per_call or leave draws_per_round at its default"
        )
    return base_k


def _call_sampler(
    sampler: Callable[..., Tensor], k: int, run: _ExactRun | None, opts: _ExactOptions, generator
) -> Tensor:
    """One sampler call for ``k`` draws of every (active) row, its shape checked: ``(k, rows, *event)``."""
    if opts.pass_rows:
        if run is None:
            first_device = opts.rows_device or (generator.device if generator is not None else torch.device("cpu"))
            call_rows = torch.arange(opts.batch_size, device=first_device)
        else:
            call_rows = run.rows if opts.rows_device is None else run.rows.to(opts.rows_device)
        x, expected_batch = sampler(k, call_rows), call_rows.shape[0]
    else:
        x, expected_batch = sampler(k), None if run is None else run.batch
    if not isinstance(x, Tensor):
        raise TypeError(f"{opts.what} must return a tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] != k or (expected_batch is not None and x.shape[1] != expected_batch):
        want = "len(rows)" if opts.pass_rows else "batch"
        raise ValueError(
            f"{opts.what} must return shape (k, {want}, *event) with k={k}"
            + (f" and {want}={expected_batch}" if expected_batch is not None else "")
            + f", got {tuple(x.shape)}"
        )
    return x


class _ExactRun:
    """The state of every row of one :func:`temperature_sample` call, learnt from the first call's draws.

    Per-row tensors of the active rows ``(r, ...)``: ``rows`` (their batch indices), ``cand`` (the
    current attempt's value), ``in_factory`` (the attempt is in the ``p^alpha`` factory), ``step``
    (its next factory step ``i``), ``used`` (draws consumed) and ``progress`` (draws of a spanning
    attempt so far, all equal to ``cand``; 0: the next call starts a new attempt). Accepted rows
    are written to ``samples`` / ``draws`` ``(batch, ...)`` and leave the active set.
    """

    def __init__(self, x: Tensor, opts: _ExactOptions) -> None:
        batch = x.shape[1]
        if opts.batch_size is not None and batch != opts.batch_size:
            raise ValueError(f"sampler(k) returned batch {batch} but batch_size={opts.batch_size}")
        self.opts, self.batch = opts, batch
        self.event_shape, self.dtype, self.device = x.shape[2:], x.dtype, x.device
        e, dev = math.prod(self.event_shape), x.device
        self.samples = torch.empty((batch, e), dtype=x.dtype, device=dev)
        self.draws = torch.zeros(batch, dtype=torch.long, device=dev)
        self.exhausted = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.rows = torch.arange(batch, device=dev)
        self.cand = torch.empty((batch, e), dtype=x.dtype, device=dev)
        self.in_factory = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.step = torch.ones(batch, dtype=torch.long, device=dev)
        self.used = torch.zeros(batch, dtype=torch.long, device=dev)
        self.progress = torch.zeros(batch, dtype=torch.long, device=dev)

    @property
    def active(self) -> int:
        return self.rows.shape[0]

    def prepare(self, x: Tensor) -> Tensor:
        """The call's draws of the active rows as ``(k, r, E)`` on the state's device."""
        if x.shape[2:] != self.event_shape or x.dtype != self.dtype:
            raise ValueError(
                f"{self.opts.what} changed its event shape or dtype between calls: first "
                f"{tuple(self.event_shape)} {self.dtype}, now {tuple(x.shape[2:])} {x.dtype}"
            )
        if not self.opts.pass_rows:
            x = x.index_select(1, self.rows.to(x.device))
        return x.to(self.device).reshape(x.shape[0], self.active, math.prod(self.event_shape))

    def attempts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Identical-draws phase, ``k >= n``: ``k // n`` attempts per row, the first that passes.

        Returns ``(passed (r,), picked value (r, E), attempt_end (r,))``, the position after the
        passing (or last) attempt; counts the draws of rows not in the factory.
        """
        n, (k, r, e) = self.opts.n, x.shape
        attempts = k // n
        blocks = x[: attempts * n].view(attempts, n, r, e)  # (a, n, r, E)
        firsts = blocks[:, 0]  # (a, r, E)
        # the first draw is not compared with itself: with n = 1 every attempt passes, NaN too
        same = (blocks[:, 1:] == firsts[:, None]).all(dim=-1).all(dim=1)  # (a, r)
        passed, block = _first_true(same & ~self.in_factory)  # (r,) each
        block = torch.where(passed, block, torch.full_like(block, attempts - 1))
        picked = firsts.gather(0, block[None, :, None].expand(1, r, e)).squeeze(0)  # (r, E)
        attempt_end = (block + 1) * n  # (r,)
        self.used = self.used + torch.where(self.in_factory, 0, torch.where(passed, attempt_end, attempts * n))
        return passed, picked, attempt_end

    def spanning_attempt(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Identical-draws phase, ``n > k``: this call holds the next draws of each row's attempt, which
        goes on while they all equal its first draw. Returns what :meth:`attempts` returns."""
        n, k = self.opts.n, x.shape[0]
        pos = torch.arange(k, device=self.device)[:, None]  # (k, 1)
        fresh = self.progress == 0  # (r,) the attempt starts with this call
        picked = torch.where(fresh[:, None], x[0], self.cand)  # (r, E) the attempt's first draw
        attempt_end = torch.clamp(n - self.progress, max=k)  # (r,) its draws in this call
        equal = (x == picked).all(dim=-1) | ((pos == 0) & fresh)  # (k, r), first: itself
        whole = (equal | (pos >= attempt_end)).all(dim=0) & ~self.in_factory  # (r,)
        passed = whole & (self.progress + attempt_end == n)  # (r,) all n draws identical
        self.progress = torch.where(whole & ~passed, self.progress + attempt_end, 0)
        self.used = self.used + torch.where(self.in_factory, 0, attempt_end)
        return passed, picked, attempt_end

    def factory(self, x: Tensor, passed: Tensor, attempt_end: Tensor, generator) -> Tensor:
        """The ``p^alpha`` factory with coin "draw == candidate", from position ``attempt_end`` on: accepted ``(r,)``."""
        k, r = x.shape[:2]
        pos = torch.arange(k, device=self.device)[:, None]  # (k, 1)
        begin = torch.where(self.in_factory, 0, attempt_end)  # (r,)
        first_step = torch.where(self.in_factory, self.step, 1)
        factory = self.in_factory | passed
        steps = first_step + (pos - begin)  # (k, r) factory step of each draw
        heads = (x == self.cand).all(dim=-1)  # (k, r)
        accept, reject = _factory_step(heads, _uniform((k, r), self.device, generator), steps, self.opts.alpha)
        live = (pos >= begin) & factory
        decided, at = _first_true(live & (accept | reject))
        accepted = decided & heads.gather(0, at[None]).squeeze(0)
        self.used = self.used + torch.where(factory, torch.where(decided, at + 1, k) - begin, 0)
        self.step = first_step + (k - begin)
        self.in_factory = factory & ~decided
        return accepted

    def retire(self, accepted: Tensor) -> int:
        """Write out the accepted rows, keep the others (two host syncs per round); the rows left."""
        done = accepted.nonzero().squeeze(1)
        self.samples[self.rows[done]] = self.cand[done]
        self.draws[self.rows[done]] = self.used[done]
        keep = (~accepted).nonzero().squeeze(1)
        for name in ("rows", "cand", "in_factory", "step", "used", "progress"):
            setattr(self, name, getattr(self, name)[keep])
        return self.active

    def result(self) -> TemperatureSample:
        """The samples; rows still active get the first draw of their latest attempt, marked exhausted."""
        if self.active > 0:  # known on the host: no sync
            self.samples[self.rows] = self.cand
            self.draws[self.rows] = self.used
            self.exhausted[self.rows] = True
        samples = self.samples.view(self.batch, *self.event_shape)
        return TemperatureSample(samples=samples, draws=self.draws, exhausted=self.exhausted)


def _finish(run: _ExactRun, opts: _ExactOptions, temperature: float, k: int) -> TemperatureSample:
    """The result, or (rows left after ``max_rounds``) an exception or a warning naming the budget."""
    result, left = run.result(), run.active
    if left == 0:
        return result
    budget = (
        f"within max_rounds={opts.max_rounds} sampler calls (T={float(temperature):g}: attempts of "
        f"{opts.n} identical draws, {k} draws per row and call)"
    )
    advice = (
        "The sampler rarely repeats itself at this temperature (each row needs (n + "
        "1{alpha > 0} sum_x P(x)^(1/T - 1)) / sum_x P(x)^(1/T) draws on average); raise "
        "max_rounds, or use batched_temperature_sample, whose cost is fixed, for very low "
        "temperatures"
    )
    if opts.on_exhausted == "raise":
        bad = run.rows.tolist()  # error path only
        shown = ", ".join(map(str, bad[:20])) + (", ..." if len(bad) > 20 else "")
        raise TemperatureSamplingExhausted(
            f"{left} row(s) did not accept a sample {budget}: rows [{shown}]. {advice}, or pass "
            "on_exhausted='fallback' to return untempered draws for those rows",
            rows=bad,
            result=result,
        )
    warnings.warn(
        TemperatureFallbackWarning(
            f"{left} of {run.batch} row(s) did not accept a sample {budget} and fell back to the "
            f"first draw of their latest attempt, which is not a tempered sample (marked in "
            f"`exhausted`, counted in `num_exhausted`). {advice}"
        ),
        stacklevel=3,
    )
    return result


# ----------------------------------------------------------------------------- batch approximation


def _splitmix64(x: int) -> int:
    """SplitMix64 output for ``x`` (Python ints), as a signed 64-bit value."""
    z = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


_HASH_BASE = _splitmix64(2024) | 1  # odd; as a signed int64
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # SplitMix64's multipliers as signed int64
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_LANE_DTYPES = {8: torch.int8, 16: torch.int16, 32: torch.int32}
# Key of every event containing NaN: the largest int64, a NaN bit pattern in every float format
# (exponent and mantissa all ones), so no packed float event without NaN has it.
_NAN_KEY = (1 << 63) - 1


def _event_keys(flat: Tensor) -> Tensor:
    """``(..., E)`` events -> ``(...)`` int64 keys: equal events get equal keys.

    With ``w = 64 // E`` bits per element, an event whose elements are all integers in
    ``[0, 2**w)`` (e.g. token ids below 65536 for ``E = 4``, below 2**32 for ``E = 2``; always the
    case when the dtype itself has at most ``w`` bits) is packed exactly into one int64 (an
    injective key). Other events get a polynomial hash ``sum_e mix(x_e) B^(E-1-e) mod 2**64``
    (``mix`` a bijective 64-bit mixer, ``B`` a fixed random odd base): two different events then
    share a key with probability about ``E * 2**-64``. Floats are keyed by their bit pattern
    after mapping ``-0.0`` to ``0.0``, packed when the dtype has at most ``w`` bits and hashed
    otherwise (so that only events containing NaN can pack to ``_NAN_KEY``); bools as 0/1. On
    CPU, when every element of int64 events fits (one check for the whole tensor), the low ``w``
    bits of each element are copied side by side in one pass instead. Any layout of the leading
    axes is accepted (a transposed view costs no extra copy on that path).
    """
    e = flat.shape[-1]
    bits, x = _as_int64(flat)
    if e == 1:
        return x[..., 0]
    width = 64 // e
    if bits <= width:  # known from the dtype: every event packs exactly
        mask = (1 << bits) - 1
        key = x[..., 0] & mask
        for i in range(1, e):
            key = torch.add(x[..., i] & mask, key, alpha=1 << bits)  # key * 2**bits + x_i
        return key
    if (
        x.device.type == "cpu"
        and flat.dtype == torch.int64
        and width in _LANE_DTYPES
        and x.stride(-1) == 1
        and sys.byteorder == "little"
    ):
        low, high = torch.aminmax(x)  # reading CPU flags costs no device sync
        if bool(low >= 0) and bool(high < (1 << width)):
            # every element fits in its lowest `width` bits: keep those lanes, one copy
            lanes = x.view(_LANE_DTYPES[width])[..., :: 64 // width]  # (..., E) strided
            return lanes.contiguous().view(torch.int64).squeeze(-1)
    if flat.dtype.is_floating_point:  # bit patterns of floats rarely fit: hash
        return _hash_events(x)
    packed = any_bits = x[..., 0]
    for i in range(1, e):
        packed = torch.add(x[..., i], packed, alpha=1 << width)  # Horner in base 2**w (wraps)
        any_bits = any_bits | x[..., i]
    fits = (any_bits >> width) == 0  # all elements in [0, 2**w) (negatives have high bits)
    if x.device.type == "cpu" and bool(fits.all()):  # reading a CPU flag costs no device sync
        return packed
    return torch.where(fits, packed, _hash_events(x))


def _as_int64(flat: Tensor) -> tuple[int, Tensor]:
    """``(..., E)`` events -> (bits of the dtype, the elements as int64): bools as 0/1, floats as the
    bit pattern after mapping ``-0.0`` to ``0.0`` (float8 widened exactly to float32 first)."""
    if flat.dtype == torch.bool:
        return 1, flat.to(torch.int64)
    if flat.dtype.is_floating_point:
        if torch.finfo(flat.dtype).bits == 8:  # float8: widen exactly first
            flat = flat.to(torch.float32)
        bits = torch.finfo(flat.dtype).bits
        as_int = {16: torch.int16, 32: torch.int32, 64: torch.int64}[bits]
        return bits, (flat + 0.0).view(as_int).to(torch.int64)  # -0.0 -> 0.0, then the bit pattern
    return torch.iinfo(flat.dtype).bits, flat.to(torch.int64)


def _hash_events(x: Tensor) -> Tensor:
    """``(..., E)`` int64 elements -> ``(...)`` polynomial hashes ``sum_e mix(x_e) B^(E-1-e)``."""
    hashed = _mix64(x[..., 0])
    for i in range(1, x.shape[-1]):
        hashed = torch.add(_mix64(x[..., i]), hashed, alpha=_HASH_BASE)  # Horner in base B (wraps)
    return hashed


def _nan_events(flat: Tensor) -> Tensor | None:
    """``(..., E)`` events -> ``(...)`` bool, events containing NaN; ``None`` when there is none.

    ``None`` is known for free for non-float dtypes and, on CPU, from one flag; on other devices
    the mask is returned without looking at it (no synchronisation).
    """
    if not flat.is_floating_point():
        return None
    nan = flat.isnan().any(dim=-1)  # (...)
    if flat.device.type == "cpu" and not bool(nan.any()):  # reading a CPU flag costs no sync
        return None
    return nan


def _mix64(x: Tensor) -> Tensor:
    """SplitMix64's bijective finaliser on int64 tensors (wrapping products, logical shifts)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def _sort_rows(keys: Tensor) -> Tensor:
    """``(b, N)`` int64 keys, any layout -> ``(b, N)`` contiguous, each row sorted ascending.

    On CPU this is NumPy's in-place sort of one row-major copy (made by torch, which transposes
    faster than NumPy), SIMD-accelerated (x86-simd-sort) and several times faster than
    ``torch.sort`` for many short rows. Other devices use ``torch.sort`` along the row.
    """
    if keys.device.type == "cpu":
        rows = keys.clone(memory_format=torch.contiguous_format)  # one copy, transposing if need be
        rows.numpy().sort(axis=1)  # in place, on the shared memory
        return rows
    return torch.sort(keys, dim=1).values


def _group_counts(sorted_keys: Tensor) -> Tensor:
    """``(b, N)`` row-sorted keys -> ``(b, N)`` int32 counts: a run's length at its end, else 0.

    A run is a maximal block of equal keys within a row. At the run's last position ``j`` its
    length is ``j - begin + 1``, where ``begin`` (the position of the run's first key) is a running
    maximum over the run starts, so no host synchronisation is needed.
    """
    b, n_cand = sorted_keys.shape
    change = sorted_keys[:, 1:] != sorted_keys[:, :-1]  # (b, N-1): a new run starts at j+1
    edge = change.new_ones(b, 1)
    starts = torch.cat([edge, change], dim=1)  # (b, N)
    ends = torch.cat([change, edge], dim=1)  # (b, N)
    # int32 arithmetic: counts are at most N, and it is several times faster than int64 on CPU
    pos = torch.arange(n_cand, device=sorted_keys.device, dtype=torch.int32)  # (N,)
    begin = torch.cummax(starts.to(torch.int32) * pos, dim=1).values  # (b, N) run's first index
    return (pos + 1 - begin) * ends.to(torch.int32)


@functools.lru_cache(maxsize=32)
def _log_weight_table(num_candidates: int, n: int, alpha: float, device: torch.device) -> Tensor:
    """``(N + 1,)`` float64 ``log W(c)`` for counts ``c = 0..N`` (``-inf`` where ``W = 0``).

    ``W(c) = binom(c, n) ((c - n) / (N - n))^alpha`` is the weight of a value seen ``c`` times. It
    is non-decreasing in ``c``, so a row's largest weight belongs to its most frequent value.
    """
    c = torch.arange(num_candidates + 1, device=device, dtype=torch.float64)
    positive = c > n if alpha > 0 else (c >= n) & (c > 0)  # W(c) > 0
    d = (c - n).clamp_min(0)
    log_w = torch.lgamma(c + 1) - math.lgamma(n + 1) - torch.lgamma(d + 1)
    if alpha > 0:
        log_w = log_w + alpha * (torch.log(d) - math.log(max(num_candidates - n, 1)))
    return torch.where(positive, log_w, torch.full_like(c, -math.inf))


@functools.lru_cache(maxsize=32)
def _weight_lookup(num_candidates: int, n: int, alpha: float, device: torch.device) -> Tensor:
    """``((N + 1)**2,)`` float64 table of group weights indexed by ``c_max * (N + 1) + c``.

    Entry ``[c_max, c]`` is ``W(c) / W(c_max)`` (in ``[0, 1]``) for a row whose largest count
    ``c_max`` has positive weight, and ``1{c = c_max}`` for a fallback row (uniform over its most
    frequent values). Count 0 (not the end of a run) always has weight 0. One gather then gives
    every group's weight.
    """
    log_w = _log_weight_table(num_candidates, n, alpha, device)
    c = torch.arange(num_candidates + 1, device=device)
    relative = torch.exp(log_w[None, :] - log_w[:, None]).nan_to_num(0.0)  # (c_max, c)
    modes = ((c[None, :] == c[:, None]) & (c[None, :] > 0)).to(torch.float64)
    return torch.where(log_w[:, None] > -math.inf, relative, modes).view(-1)


def _group_weights(counts: Tensor, n: int, alpha: float) -> Tensor:
    """``(b, N)`` run lengths (0 off run ends) -> ``(b, N)`` float64 choice weights."""
    b, n_cand = counts.shape
    c_max = counts.amax(dim=1, keepdim=True)  # (b, 1)
    if n_cand <= _MAX_LOOKUP_N:  # one gather from an (N+1)^2 table
        lookup = _weight_lookup(n_cand, n, alpha, counts.device)
        return lookup.index_select(0, counts.add(c_max, alpha=n_cand + 1).view(-1)).view(b, n_cand)
    log_w = _log_weight_table(n_cand, n, alpha, counts.device)
    relative = log_w.index_select(0, counts.view(-1)).view(b, n_cand) - log_w[c_max]
    fallback = c_max < n + (1 if alpha > 0 else 0)  # (b, 1): no value has positive weight
    modes = ((counts == c_max) & (counts > 0)).to(torch.float64)
    return torch.where(fallback, modes, relative.exp())


def batched_temperature_sample(
    candidates: Tensor,
    temperature: float,
    *,
    event_ndim: int = 0,
    generator: torch.Generator | None = None,
    return_index: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Approximate temperature sampling by re-weighting ``N`` given draws per row.

    ``candidates`` holds ``N`` draws for every batch element (a *row*), samples first as in
    :func:`temperature_sample`'s sampler and :func:`~likelihood_free.energy.energy_score`:
    ``(N, *batch, *event)``, where the last ``event_ndim`` axes form one event compared as a
    whole (``event_ndim=1`` for CALM's chunks of ``K`` token ids). Equal candidates of a row are
    grouped with tensor operations and a value ``x`` seen ``c_x`` times among the row's ``N``
    draws is chosen with probability proportional to

    ``W_x = binom(c_x, n) * ((c_x - n) / (N - n))^alpha``,   ``1/T = n + alpha``,

    computed in log space (``lgamma``). For ``T = 1/n`` this is the CALM paper's
    ``binom(c_x, n)``, and ``binom(c_x, n) / binom(N, n)`` is the unbiased U-statistic of
    ``P(x)^n``. Since ``binom(c, n+1) / binom(c, n) = (c - n) / (n + 1)``, ``W_x`` is (up to a
    per-row constant) the geometric interpolation ``U_n^(1-alpha) U_(n+1)^alpha`` of the unbiased
    estimators ``U_m`` of ``P(x)^m``: the weights move continuously from the paper's ``T = 1/n``
    weights to its ``T = 1/(n+1)`` weights as ``T`` decreases.

    *Consistency*: as ``N -> oo``, ``c_x / N -> P(x)`` almost surely, so
    ``W_x / binom(N, n) -> P(x)^(n + alpha) / n!`` for every ``x`` and the normalised weights
    converge to ``P(x)^(1/T) / Z_T``; the choice probabilities (bounded ratios) converge too.

    *Bias at small N*: a ratio of estimators is biased by ``O(1/N)``; for ``alpha > 0``,
    ``((c - n)/(N - n))^alpha`` underestimates ``P(x)^alpha`` on average (Jensen: the power is
    concave), most for rare values, and a value seen exactly ``n`` times gets weight 0. Both move
    mass to frequent values: a slightly *lower* effective temperature at small ``N``.

    *Fallback*: a row where no value has weight (``max_x c_x < n``, or ``<= n`` when
    ``alpha > 0``) uses ``n_eff = max_x c_x`` and ``alpha = 0``: it picks uniformly among its most
    frequent values (the paper falls back to ``n-1, n-2, ...``; this is where that ends).
    ``T = 1`` returns a uniformly chosen draw, which is exact.

    *Equality*: events are equal when all their elements are ``==``: floats compare by value
    (``-0.0 == 0.0``) and an event containing NaN equals no other draw, even one with the same
    NaN bit pattern (it is a group of its own, ``c = 1``), as in :func:`temperature_sample`.

    *Grouping*: each event becomes one int64 key. Events of small non-negative integers (up to
    ``64 // E`` bits each: token ids below 65536 with 4 tokens per event, below 2**32 with 2) or
    of narrow dtypes are packed exactly; other events are hashed to 64 bits, and two different
    events of a row would be merged only if their hashes collide (probability about
    ``E * 2**-64`` per pair). Each row's ``N`` keys are sorted (NumPy's SIMD sort on CPU,
    ``torch.sort`` elsewhere), so equal events form runs; a run's length is its value's count
    ``c_x``, read from a running maximum over the run starts, and its weight comes from a
    table indexed by count. No Python loop over rows and no device synchronisation: the same code
    runs on CPU and GPU (on CPU, where reading a flag is free, key packing takes a cheaper path
    when a check allows).

    Args:
        candidates: ``(N, *batch, *event)`` draws (``N >= 1``) for each of the ``prod(batch)``
            rows, integers or otherwise exactly comparable values. Any number of batch axes
            (none: one row).
        temperature: ``T`` in ``(0, 1]``.
        event_ndim: number of trailing axes that form one event, ``>= 0`` (0: every scalar is
            an event).
        generator: random generator for the final choice (one uniform per row).
        return_index: also return the chosen index into ``N``.

    Returns:
        ``(*batch, *event)`` the chosen event per row (same dtype and device as ``candidates``);
        with ``return_index=True`` a tuple ``(events, index)`` where ``index`` is ``(*batch)``
        long, the first draw of the row equal to the chosen value: with one batch axis,
        ``candidates[index[i], i]`` is ``events[i]``.

    Raises:
        TypeError: ``candidates`` not a tensor or complex, ``temperature`` not a real number,
            ``event_ndim`` not an int, ``generator`` not a ``torch.Generator``, ``return_index``
            not a bool.
        ValueError: ``candidates`` with fewer than ``1 + event_ndim`` dimensions or ``N = 0``,
            ``event_ndim < 0``, temperature outside ``(0, 1]`` or nan.

    Example:
        >>> import torch
        >>> from likelihood_free.temperature import batched_temperature_sample
        >>> cands = torch.tensor([[[1, 2], [4, 4]],    # (N=4, batch=2, event=2): draw 0
        ...                       [[1, 2], [4, 4]],
        ...                       [[1, 2], [5, 5]],
        ...                       [[7, 7], [5, 5]]])   # row 0: (1,2) three times; row 1: 2 + 2
        >>> batched_temperature_sample(cands, 0.5, event_ndim=1)[0]  # binom(3,2)=3 vs 0
        tensor([1, 2])
        >>> g = torch.Generator().manual_seed(0)
        >>> many = cands[:, 1:].expand(4, 10000, 2)  # (N, batch=10000, 2): row 1 repeated
        >>> ev, idx = batched_temperature_sample(
        ...     many, 0.5, event_ndim=1, generator=g, return_index=True)
        >>> round((ev[:, 0] == 4).float().mean().item(), 1)  # binom(2,2) each: 50/50
        0.5
        >>> bool((many[idx, torch.arange(10000)] == ev).all())
        True
    """
    if not isinstance(candidates, Tensor):
        raise TypeError(f"candidates must be a tensor, got {type(candidates).__name__}")
    if candidates.is_complex():
        raise TypeError(f"candidates must be real or integer, got {candidates.dtype}")
    event_ndim = _check_int(event_ndim, "event_ndim", 0)
    if candidates.dim() < 1 + event_ndim:
        raise ValueError(
            f"candidates must have shape (N, *batch, *event) with event_ndim={event_ndim} "
            f"trailing event axes, got shape {tuple(candidates.shape)}"
        )
    n, alpha = _split_inverse_temperature(temperature)
    _check_generator(generator)
    if not isinstance(return_index, bool):
        raise TypeError(f"return_index must be a bool, got {type(return_index).__name__}")
    split = candidates.dim() - event_ndim  # candidates: (N, *batch | *event), event from split
    n_cand = candidates.shape[0]
    batch_shape, event_shape = candidates.shape[1:split], candidates.shape[split:]
    if n_cand == 0:
        raise ValueError("candidates must hold at least one draw per row (N >= 1), got N = 0")
    dev = candidates.device
    b, e = math.prod(batch_shape), math.prod(event_shape)
    flat = candidates.reshape(n_cand * b, e)  # (N*b, E): position j*b + i is draw j of row i
    if b == 0 or e == 0:  # no rows, or empty events (all equal): any draw will do
        index = torch.zeros(batch_shape, dtype=torch.long, device=dev)
        events = candidates[0]
        return (events, index) if return_index else events

    # ---- group equal events of a row: sort each row's keys, measure the runs of equal keys
    keys = _event_keys(flat).view(n_cand, b)  # (N, b) int64, equal events <-> equal keys
    nan = _nan_events(flat)  # (N*b,) bool or None: events containing NaN, each its own group
    if nan is not None:  # NaN events sort last; no other event has this key (a NaN bit pattern)
        nan = nan.view(n_cand, b)  # (N, b)
        keys = keys.masked_fill(nan, _NAN_KEY)
    sorted_keys = _sort_rows(keys.T)  # (b, N), each row's keys ascending
    counts = _group_counts(sorted_keys)  # (b, N): c_x at the end of x's run, 0 elsewhere
    if nan is not None:
        first_nan = n_cand - nan.sum(dim=0, dtype=torch.int32)[:, None]  # (b, 1)
        sorted_nan = torch.arange(n_cand, device=dev, dtype=torch.int32) >= first_nan  # (b, N)
        counts = torch.where(sorted_nan, torch.ones_like(counts), counts)

    # ---- one weight W(c_x) per distinct value (relative to the row's largest), inverse CDF
    cdf = _group_weights(counts, n, alpha).cumsum(dim=1)  # (b, N) float64
    total = cdf[:, -1:]  # (b, 1) > 0: the row's most frequent value has weight
    u = _uniform((b, 1), dev, generator)
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    pick = (cdf <= target).sum(dim=1, keepdim=True)  # (b, 1) first run whose cdf passes u
    chosen = sorted_keys.gather(1, pick).T  # (1, b) key of the chosen value
    match = keys == chosen  # (N, b) the chosen value's draws
    if nan is not None:  # a NaN pick is the (pick - first_nan)-th NaN event of the row
        nth_nan = nan.cumsum(dim=0, dtype=torch.int32) - 1  # (N, b)
        nan_pick = (pick - first_nan).T  # (1, b), >= 0 for a NaN pick
        match = torch.where(nan_pick >= 0, nan & (nth_nan == nan_pick), match & ~nan)
    # first draw of the chosen value, as N - max_j match_j (N - j): a maximum over dim 0 is much
    # faster than an argmax there
    small = torch.int16 if n_cand <= torch.iinfo(torch.int16).max else torch.int64
    rank = torch.arange(n_cand, 0, -1, device=dev, dtype=small)[:, None]  # (N, 1): N - j
    index = n_cand - (match * rank).amax(dim=0).long()  # (b,)
    rows = torch.arange(b, device=dev)
    events = flat.index_select(0, index * b + rows).reshape(*batch_shape, *event_shape)
    index = index.reshape(batch_shape)
    return (events, index) if return_index else events
