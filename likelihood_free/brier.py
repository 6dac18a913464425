"""Brier scores and BrierLM: likelihood-free evaluation of categorical predictors.

The Brier score of a predictive distribution ``P`` over a vocabulary of ``V`` outcomes, for the
observed outcome ``y``, is (in its positively oriented form, higher is better)::

    Brier(P, y) = 2 P(y) - sum_x P(x)^2 = 1 - sum_x (P(x) - 1{x = y})^2

It is a strictly proper scoring rule with values in ``[-1, 1]``. Unlike the log-likelihood it can
be estimated without evaluating ``P``: given two independent samples ``x1, x2 ~ P``::

    E[1{x1 = y}] = P(y)            E[1{x1 = x2}] = sum_x P(x)^2

so ``1{x1 = y} + 1{x2 = y} - 1{x1 = x2}`` is an unbiased estimate of ``Brier(P, y)`` that only
needs a sampler. CALM (Shao et al. 2025, arXiv 2510.27688) applies this to n-grams: Brier-n is
the Brier score of the model's distribution over the next n tokens, and::

    BrierLM = 100 * (Brier-1 * Brier-2 * Brier-3 * Brier-4) ** (1/4)

This module provides the exact score from probabilities (:func:`brier_score`), the two-sample
estimate (:func:`brier_estimate`), the geometric mean (:func:`brier_lm`) and a streaming,
distributed-aware metric with standard errors (:class:`BrierLM`).

Axis key:
    ...  batch axes (any number, kept in the outputs)
    V    vocabulary size
    n    n-gram order axis (column j <-> the (j+1)-gram prefix)
    N    number of positions (flattened batch axes)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["BrierLM", "BrierLMResult", "brier_estimate", "brier_lm", "brier_score"]


def _is_integer_like(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def _require_tensor(value: Any, name: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _default_atol(dtype: torch.dtype) -> float:
    # Rounding each probability to `dtype` moves the sum by at most eps/2 (relative), so a
    # tolerance of 2 eps (at least 1e-4) accepts softmax outputs stored in low precision.
    return max(1e-4, 2.0 * torch.finfo(dtype).eps)


def _check_atol(atol: object) -> float | None:
    if atol is None:
        return None
    if isinstance(atol, bool) or not isinstance(atol, Real):
        raise TypeError(f"atol must be a nonnegative finite number or None, got {atol!r}")
    if not (math.isfinite(atol) and atol >= 0):  # also refuses nan
        raise ValueError(f"atol must be a nonnegative finite number or None, got {atol!r}")
    return float(atol)


def _check_brier_inputs(probs: Tensor, target: Tensor, atol: object) -> float | None:
    """Types, shapes and devices of :func:`brier_score`'s arguments (no host sync); the checked ``atol``."""
    _require_tensor(probs, "probs")
    _require_tensor(target, "target")
    atol = _check_atol(atol)
    if not probs.is_floating_point():
        raise TypeError(f"probs must have a floating dtype, got {probs.dtype}")
    if not _is_integer_like(target) or target.dtype == torch.bool:
        raise TypeError(f"target must have an integer dtype, got {target.dtype}")
    if probs.ndim < 1 or probs.shape[-1] == 0:
        raise ValueError(f"probs must have shape (..., V) with V >= 1, got {tuple(probs.shape)}")
    if probs.shape[:-1] != target.shape:
        raise ValueError(
            "target must have the shape of probs without its last axis: probs "
            f"{tuple(probs.shape)} expects target {tuple(probs.shape[:-1])}, got "
            f"{tuple(target.shape)}"
        )
    if probs.device != target.device:
        raise ValueError(f"probs and target must be on the same device, got {probs.device} and {target.device}")
    return atol


def _validate_distribution(p: Tensor, in_range: Tensor, tol: float) -> None:
    """Finite, nonnegative rows summing to 1 (within ``tol``) and targets in range: one host sync."""
    bad = torch.stack(
        [(~torch.isfinite(p)).any(), (p < -tol).any(), ((p.sum(-1) - 1.0).abs() > tol).any(), (~in_range).any()]
    ).tolist()
    problems = (
        "probs contains NaN or infinite values",
        f"probs must be nonnegative (tolerance {tol:g})",
        f"probs must sum to 1 over the last axis (tolerance {tol:g})",
        f"target values must lie in [0, V) = [0, {p.shape[-1]})",
    )
    for is_bad, problem in zip(bad, problems, strict=True):
        if is_bad:
            raise ValueError(problem)


def brier_score(probs: Tensor, target: Tensor, *, validate: bool = True, atol: float | None = None) -> Tensor:
    """Exact Brier score ``2 P(y) - sum_x P(x)^2`` from predicted probabilities.

    The positively oriented (higher is better) multi-class Brier score::

        Brier(P, y) = 2 P(y) - sum_x P(x)^2 = 1 - sum_x (P(x) - 1{x = y})^2

    It lies in ``[-1, 1]``: 1 for a point mass on ``y``, -1 for a point mass elsewhere.

    Args:
        probs: Probabilities, shape ``(..., V)``, floating dtype, each row nonnegative and
            summing to 1. Computed in at least fp32.
        target: Observed outcomes, shape ``(...)``, integer dtype, values in ``[0, V)``.
        validate: When True (default), check that ``probs`` is finite, nonnegative (up to
            ``-atol``) and sums to 1 (within ``atol``) and that ``target`` is in range; this costs
            one host synchronisation. Pass False in hot paths: nothing is checked on the host
            and positions whose target is out of range return NaN.
        atol: Tolerance of the probability checks, a nonnegative finite number; default
            ``max(1e-4, 2 * eps(probs.dtype))``.

    Returns:
        Tensor of shape ``(...)`` with the dtype of ``probs``.

    Raises:
        TypeError: If ``probs`` is not floating, ``target`` is not an integer tensor or
            ``atol`` is not a number.
        ValueError: If the shapes or devices do not match, ``V == 0``, ``atol`` is negative or
            not finite, or (with ``validate``) the probabilities are not a distribution or a
            target is out of range.

    Example:
        >>> import torch
        >>> probs = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
        >>> brier_score(probs, torch.tensor([0, 1]))
        tensor([ 0.6250, -1.0000])
    """
    atol = _check_brier_inputs(probs, target, atol)
    vocab = probs.shape[-1]
    p = probs.to(torch.promote_types(probs.dtype, torch.float32))  # (..., V)
    in_range = (target >= 0) & (target < vocab)  # (...)
    if validate:
        _validate_distribution(p, in_range, _default_atol(probs.dtype) if atol is None else atol)

    idx = target.clamp(0, vocab - 1).long().unsqueeze(-1)  # (..., 1)
    p_y = p.gather(-1, idx).squeeze(-1)  # (...)
    score = 2.0 * p_y - (p * p).sum(-1)  # (...)
    score = torch.where(in_range, score, torch.full_like(score, math.nan))
    return score.to(probs.dtype)


def brier_estimate(x1: Tensor, x2: Tensor, target: Tensor) -> Tensor:
    """Unbiased two-sample estimate of the n-gram Brier scores ``Brier-1 .. Brier-n``.

    ``x1`` and ``x2`` are two independent samples of the next ``n`` tokens drawn from the model
    given the same context, ``target`` the observed next ``n`` tokens. Column ``j`` of the result
    estimates the Brier score of the model's distribution ``P_{j+1}`` over (j+1)-grams::

        est_j = 1{x1[:j+1] = y[:j+1]} + 1{x2[:j+1] = y[:j+1]} - 1{x1[:j+1] = x2[:j+1]}

    where two prefixes match only if every token up to ``j`` matches (a cumulative product of
    the elementwise equalities, so a mismatch at position ``j`` zeroes columns ``j' >= j``). It is
    unbiased because ``E[1{x1 = y}] = P(y)`` and, by independence,
    ``E[1{x1 = x2}] = sum_x P(x)^2``, so ``E[est] = 2 P(y) - sum_x P(x)^2``. Each value lies in
    ``{-1, 0, 1}``; average over positions to estimate the expected score. For unigrams pass
    tensors of shape ``(..., 1)``. The estimate is symmetric in ``x1`` and ``x2``.

    Args:
        x1: First sample, shape ``(..., n)``, integer or bool dtype.
        x2: Second, independent sample, shape ``(..., n)``, integer or bool dtype.
        target: Observed tokens, shape ``(..., n)``, integer or bool dtype.

    Returns:
        Tensor of shape ``(..., n)`` with dtype ``torch.get_default_dtype()`` on the inputs'
        device.

    Raises:
        TypeError: If an input is not a tensor of integer or bool dtype.
        ValueError: If the shapes differ, ``n == 0`` or the devices differ.

    Example:
        >>> import torch
        >>> y = torch.tensor([5, 6, 7])
        >>> brier_estimate(torch.tensor([5, 6, 0]), torch.tensor([5, 1, 7]), y)
        tensor([1., 1., 0.])
        >>> brier_estimate(torch.tensor([2, 6, 7]), torch.tensor([2, 6, 8]), y)
        tensor([-1., -1.,  0.])
    """
    for name, t in (("x1", x1), ("x2", x2), ("target", target)):
        _require_tensor(t, name)
        if not _is_integer_like(t):
            raise TypeError(f"{name} must have an integer or bool dtype (token ids), got {t.dtype}")
    if not (x1.shape == x2.shape == target.shape):
        raise ValueError(
            "x1, x2 and target must have the same shape (..., n), got "
            f"{tuple(x1.shape)}, {tuple(x2.shape)} and {tuple(target.shape)}"
        )
    if x1.ndim < 1 or x1.shape[-1] == 0:
        raise ValueError(
            "x1, x2 and target must have shape (..., n) with an n-gram axis n >= 1 last "
            f"(use (..., 1) for unigrams), got {tuple(x1.shape)}"
        )
    if not (x1.device == x2.device == target.device):
        raise ValueError(
            f"x1, x2 and target must be on the same device, got {x1.device}, {x2.device} and {target.device}"
        )
    dtype = torch.get_default_dtype()
    hit1 = torch.cumprod((x1 == target).to(dtype), dim=-1)  # (..., n) prefix of x1 matches y
    hit2 = torch.cumprod((x2 == target).to(dtype), dim=-1)  # (..., n)
    collide = torch.cumprod((x1 == x2).to(dtype), dim=-1)  # (..., n)
    return hit1 + hit2 - collide


def brier_lm(briers: Tensor | Any) -> Tensor:
    """BrierLM: 100 times the geometric mean of Brier-1 .. Brier-n.

    ``BrierLM = 100 * (prod_j max(b_j, 0)) ** (1/n)`` over the last axis, computed as
    ``100 * exp(mean_j log max(b_j, 0))`` so that small scores do not underflow. Brier scores can
    be negative (a confident wrong model), where the geometric mean is undefined; as in CALM the
    result is then 0. Each factor is clamped, not just the product, so that an even number of
    negative scores cannot multiply into a positive BrierLM. The paper's BrierLM uses ``n = 4``.

    Args:
        briers: Brier scores in ``[-1, 1]``, shape ``(..., n)`` with ``n >= 1``: a floating
            tensor, or any array-like of numbers (list, tuple, NumPy array), converted with
            :func:`torch.as_tensor` (integers to the default float dtype). Computed in at least
            fp32. Checking the range costs one host synchronisation.

    Returns:
        Tensor of shape ``(...)`` with the dtype of ``briers`` (of the converted tensor for an
        array-like, e.g. float64 for a float64 NumPy array).

    Raises:
        TypeError: If ``briers`` is an integer, bool or complex tensor, or cannot be converted
            to a real tensor.
        ValueError: If ``briers`` has no last axis or ``n == 0``, or holds a value outside
            ``[-1, 1]`` (where no Brier score lies) or NaN.

    Example:
        >>> import torch
        >>> briers = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.8, 0.4, 0.2, 0.1], [0.5, -0.1, 0.3, 0.2]])
        >>> brier_lm(briers)  # 100 * 0.0064 ** 0.25 = 28.28; a negative score gives 0
        tensor([50.0000, 28.2843,  0.0000])
        >>> brier_lm(torch.tensor([-0.5, -0.5, 0.5, 0.5]))  # not 50: two negatives stay 0
        tensor(0.)
        >>> brier_lm([0.8, 0.4, 0.2, 0.1])  # any array-like
        tensor(28.2843)
    """
    if not isinstance(briers, Tensor):
        try:
            converted = torch.as_tensor(briers)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"briers must be a floating tensor or an array-like of numbers, got {type(briers).__name__}"
            ) from err
        if converted.dtype == torch.bool or converted.is_complex():
            raise TypeError(f"briers must hold real numbers, got {converted.dtype}")
        if not converted.is_floating_point():
            converted = converted.to(torch.get_default_dtype())
        briers = converted
    if not briers.is_floating_point():
        raise TypeError(f"briers must have a floating dtype, got {briers.dtype}")
    if briers.ndim < 1 or briers.shape[-1] == 0:
        raise ValueError(f"briers must have shape (..., n) with n >= 1, got {tuple(briers.shape)}")
    b = briers.to(torch.promote_types(briers.dtype, torch.float32))  # (..., n)
    if bool(((b < -1.0) | (b > 1.0) | b.isnan()).any()):  # one host sync
        raise ValueError(
            "briers must hold Brier scores, which lie in [-1, 1]; got values outside [-1, 1] or "
            "NaN (pass the scores, not BrierLM values or percentages)"
        )
    # exp(mean(log b)) rather than prod(b) ** (1/n): the product of n small scores underflows
    # (four scores of 1e-12 gave 0 in float32); log(0) = -inf gives exactly 0 for clamped ones
    mean_log = b.clamp(min=0.0).log().mean(dim=-1)  # (...)
    return (100.0 * mean_log.exp()).to(briers.dtype)


@dataclass(frozen=True)
class BrierLMResult:
    """Aggregated Brier-n scores, BrierLM and their standard errors.

    Attributes:
        brier: Mean estimate of Brier-1 .. Brier-n (``n = max_order``).
        brier_se: Standard error of each mean, ``sqrt(var_j / count)`` (unbiased variance);
            NaN when ``count < 2``.
        brier_lm: ``brier_lm(brier)``, in ``[0, 100]``; NaN when ``count == 0``.
        brier_lm_se: Delta-method standard error of ``brier_lm``; NaN when ``count < 2`` or
            when a Brier score is nonpositive (BrierLM clamped to 0).
        count: Number of positions aggregated.
    """

    brier: tuple[float, ...]
    brier_se: tuple[float, ...]
    brier_lm: float
    brier_lm_se: float
    count: int

    def to_dict(self) -> dict[str, float | int]:
        """Flat dictionary for logging.

        Returns:
            ``{"brier1": .., "brier1_se": .., ..., "brier_lm": .., "brier_lm_se": .., "count": ..}``.

        Example:
            >>> BrierLMResult((0.5,), (0.1,), 50.0, 10.0, 7).to_dict()
            {'brier1': 0.5, 'brier1_se': 0.1, 'brier_lm': 50.0, 'brier_lm_se': 10.0, 'count': 7}
        """
        out: dict[str, float | int] = {}
        for j, (b, se) in enumerate(zip(self.brier, self.brier_se, strict=True), start=1):
            out[f"brier{j}"] = b
            out[f"brier{j}_se"] = se
        out["brier_lm"] = self.brier_lm
        out["brier_lm_se"] = self.brier_lm_se
        out["count"] = self.count
        return out


class BrierLM:
    """Streaming BrierLM metric with standard errors and ``torch.distributed`` support.

    Feed per-position estimates of Brier-1 .. Brier-n (e.g. from :func:`brier_estimate`) with
    :meth:`update`; :meth:`compute` returns their means, :func:`brier_lm` of the means and
    standard errors. The state is three running sums in float64 -- the count ``N``, ``S = sum e``
    (n,) and ``Q = sum e e^T`` (n, n) -- so chunked updates, :meth:`merge` and the all-reduce
    across ranks are exact. With ``b = S / N`` and the unbiased covariance
    ``Sigma = (Q - N b b^T) / (N - 1)``:

    * ``SE(b_j) = sqrt(Sigma_jj / N)``;
    * BrierLM ``L = 100 (prod_j b_j)^(1/n)`` has gradient ``g_j = L / (n b_j)`` and the
      delta-method standard error ``SE(L) = sqrt(g^T Sigma g / N)``, which uses the full
      covariance between orders (the Brier-j estimates of one position are strongly correlated).
      When any ``b_j <= 0`` BrierLM is clamped to 0 and its SE is reported as NaN.

    These SEs assume iid positions. Positions of one text are not independent (consecutive
    n-grams overlap and share context), so for text they are approximations that usually
    understate the uncertainty; resample whole documents if you need exact intervals.

    The metric lives on the device of the estimates it receives (its state moves there on
    :meth:`update`); :meth:`update` never synchronises with the host, :meth:`compute` does. When
    ``torch.distributed`` is initialised with more than one rank, :meth:`compute` all-reduces a
    copy of the sums (on CPU for gloo, on the current CUDA device for nccl, otherwise on the
    state's device), so it is a collective call that every rank of the group must make; the
    local state is left unchanged.

    Args:
        max_order: Number of n-gram orders ``n`` (4 for the paper's BrierLM).
        process_group: Process group for the all-reduce; default the global group.

    Raises:
        ValueError: If ``max_order < 1``.

    Example:
        >>> import torch
        >>> metric = BrierLM(max_order=2)
        >>> metric.update(torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
        >>> result = metric.compute()
        >>> result.brier, result.count
        ((0.75, 0.5), 4)
        >>> round(result.brier_lm, 4), round(result.brier_se[0], 4)
        (61.2372, 0.25)
    """

    def __init__(self, max_order: int = 4, *, process_group: Any = None) -> None:
        if isinstance(max_order, bool) or not isinstance(max_order, int) or max_order < 1:
            raise ValueError(f"max_order must be an integer >= 1, got {max_order!r}")
        self._n = max_order
        self._process_group = process_group
        self._count = torch.zeros((), dtype=torch.int64)  # N
        self._sum = torch.zeros(max_order, dtype=torch.float64)  # (n,)
        self._sum_outer = torch.zeros(max_order, max_order, dtype=torch.float64)  # (n, n)

    @property
    def max_order(self) -> int:
        """Number of n-gram orders ``n``."""
        return self._n

    @property
    def device(self) -> torch.device:
        """Device holding the running sums."""
        return self._sum.device

    def _move_to(self, device: torch.device) -> None:
        if self._sum.device != device:
            self._count = self._count.to(device)
            self._sum = self._sum.to(device)
            self._sum_outer = self._sum_outer.to(device)

    def reset(self) -> None:
        """Zero the running sums (the device is kept)."""
        self._count.zero_()
        self._sum.zero_()
        self._sum_outer.zero_()

    def update(self, estimates: Tensor, mask: Tensor | None = None) -> None:
        """Add per-position Brier estimates.

        Args:
            estimates: Shape ``(..., max_order)``, real dtype; column ``j`` estimates Brier-(j+1)
                at each position. Accumulated in float64.
            mask: Optional bool tensor of shape ``(...)``; only positions where it is True count
                (masked-out values may be anything, NaN included).

        Raises:
            TypeError: If ``estimates`` is complex/bool or ``mask`` is not a bool tensor.
            ValueError: If the last axis of ``estimates`` is not ``max_order`` or ``mask`` has
                the wrong shape or device.
        """
        _require_tensor(estimates, "estimates")
        if estimates.is_complex() or estimates.dtype == torch.bool:
            raise TypeError(f"estimates must have a real numeric dtype, got {estimates.dtype}")
        if estimates.ndim < 1 or estimates.shape[-1] != self._n:
            raise ValueError(f"estimates must have shape (..., max_order={self._n}), got {tuple(estimates.shape)}")
        e = estimates.reshape(-1, self._n).to(torch.float64)  # (N, n)
        if mask is not None:
            _require_tensor(mask, "mask")
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
            if mask.shape != estimates.shape[:-1]:
                raise ValueError(
                    f"mask must have shape {tuple(estimates.shape[:-1])} (estimates without its "
                    f"last axis), got {tuple(mask.shape)}"
                )
            if mask.device != estimates.device:
                raise ValueError(f"mask must be on the device of estimates ({estimates.device}), got {mask.device}")
            keep = mask.reshape(-1, 1)  # (N, 1)
            e = torch.where(keep, e, torch.zeros((), dtype=e.dtype, device=e.device))
            added: Tensor | int = keep.sum()
        else:
            added = e.shape[0]
        self._move_to(e.device)
        self._count += added
        self._sum += e.sum(dim=0)
        self._sum_outer += e.T @ e

    def _packed_state(self) -> Tensor:
        return torch.cat(
            [self._count.to(torch.float64).reshape(1), self._sum, self._sum_outer.reshape(-1)]
        )  # (1 + n + n*n,)

    def _global_state(self) -> np.ndarray:
        packed = self._packed_state()
        group = self._process_group
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            backend = str(dist.get_backend(group))
            if backend == "nccl":
                device = (
                    packed.device if packed.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
                )
            elif backend == "gloo":
                device = torch.device("cpu")
            else:  # mixed ("cpu:gloo,cuda:nccl") or other backends dispatch on the device
                device = packed.device
            packed = packed.to(device, copy=True)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        return packed.cpu().numpy()

    def compute(self) -> BrierLMResult:
        """Means, BrierLM and standard errors over all positions (all ranks when distributed).

        Returns:
            :class:`BrierLMResult`. With ``count == 0`` every number is NaN.
        """
        n = self._n
        packed = self._global_state()
        count = float(packed[0])
        total = packed[1 : 1 + n]  # (n,)
        outer = packed[1 + n :].reshape(n, n)  # (n, n)
        nan = math.nan
        if count == 0:
            return BrierLMResult((nan,) * n, (nan,) * n, nan, nan, 0)
        mean = total / count  # (n,)
        positive = bool(np.all(mean > 0))  # any nonpositive Brier-j gives BrierLM 0
        if not np.all(np.isfinite(mean)):
            lm = nan
        else:  # geometric mean in log space: a product of small means would underflow
            lm = 100.0 * math.exp(float(np.mean(np.log(mean)))) if positive else 0.0
        if count >= 2:
            cov = (outer - count * np.outer(mean, mean)) / (count - 1.0)  # (n, n)
            cov = 0.5 * (cov + cov.T)
            se = np.sqrt(np.clip(np.diag(cov), 0.0, None) / count)
            if positive and lm > 0:
                grad = lm / (n * mean)  # (n,) dBrierLM / db_j
                lm_se = math.sqrt(max(float(grad @ cov @ grad), 0.0) / count)
            else:
                lm_se = nan
            brier_se = tuple(float(s) for s in se)
        else:
            brier_se = (nan,) * n
            lm_se = nan
        return BrierLMResult(
            brier=tuple(float(m) for m in mean),
            brier_se=brier_se,
            brier_lm=float(lm),
            brier_lm_se=float(lm_se),
            count=int(round(count)),
        )

    def merge(self, other: BrierLM) -> BrierLM:
        """Add another metric's sums to this one (e.g. from another evaluation shard).

        Args:
            other: A :class:`BrierLM` with the same ``max_order``; it is not modified.

        Returns:
            ``self``.

        Raises:
            TypeError: If ``other`` is not a :class:`BrierLM`.
            ValueError: If the orders differ.
        """
        if not isinstance(other, BrierLM):
            raise TypeError(f"other must be a BrierLM, got {type(other).__name__}")
        if other.max_order != self._n:
            raise ValueError(f"cannot merge BrierLM with max_order={other.max_order} into max_order={self._n}")
        device = self.device
        count = other._count.to(device)
        total = other._sum.to(device)
        outer = other._sum_outer.to(device)
        self._count += count
        self._sum += total
        self._sum_outer += outer
        return self

    def state_dict(self) -> dict[str, Any]:
        """Copy of the state: ``max_order``, ``count`` (int64), ``sum`` (n,), ``sum_outer`` (n, n).

        Returns:
            A dict of plain values and cloned tensors, suitable for ``torch.save``.
        """
        return {
            "max_order": self._n,
            "count": self._count.clone(),
            "sum": self._sum.clone(),
            "sum_outer": self._sum_outer.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (onto this metric's device).

        Args:
            state: Dict with keys ``max_order``, ``count``, ``sum``, ``sum_outer``.

        Raises:
            ValueError: If keys are missing, ``max_order`` / shapes do not match or ``count`` is
                not a nonnegative integer.
        """
        expected = {"max_order", "count", "sum", "sum_outer"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a dict with keys {sorted(expected)}, got {got}")
        if state["max_order"] != self._n:
            raise ValueError(f"state has max_order={state['max_order']}, this metric has max_order={self._n}")
        n = self._n
        count = torch.as_tensor(state["count"])
        total = torch.as_tensor(state["sum"])
        outer = torch.as_tensor(state["sum_outer"])
        if count.shape != () or total.shape != (n,) or outer.shape != (n, n):
            raise ValueError(
                f"state tensors must have shapes count (), sum ({n},), sum_outer ({n}, {n}); got "
                f"{tuple(count.shape)}, {tuple(total.shape)}, {tuple(outer.shape)}"
            )
        if count.is_complex() or count.dtype == torch.bool or not bool(count >= 0 and count == torch.floor(count)):
            raise ValueError(f"state count must be a nonnegative integer, got {state['count']!r}")
        device = self.device
        self._count = count.to(device=device, dtype=torch.int64, copy=True)
        self._sum = total.to(device=device, dtype=torch.float64, copy=True)
        self._sum_outer = outer.to(device=device, dtype=torch.float64, copy=True)
