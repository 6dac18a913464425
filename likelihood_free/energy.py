r"""Energy score of a sampler against targets, and the matching training loss.

The energy score (Gneiting & Raftery, 2007) of a model distribution ``P`` at an observation
``y`` is

.. math::

    S(P, y) = E\|X - X'\|^\beta - 2 E\|X - y\|^\beta, \qquad X, X' \sim P
    \text{ independent},

with ``0 < beta < 2``; it is strictly proper in that range (the expected score under ``y ~ Q``
is maximised only at ``P = Q``). CALM (Shao et al., 2025) trains a generative head by
maximising a Monte Carlo estimate of it that needs only samples of the model, never its
density.

Axis key (used in the shape comments below):
    n: draws of the model (``samples``), n >= 2
    m: draws or observations of the target (``targets``), m >= 1
    B: all batch axes flattened into one
    d: feature size (the vectors whose distances are scored)
"""

from __future__ import annotations

import contextlib
import math
from numbers import Real

import torch
from torch import Tensor

__all__ = ["energy_score", "energy_loss", "mixture_energy_score", "mixture_energy_loss"]

_REDUCTIONS = ("mean", "sum", "none")

# Squared distances from |a|^2 + |b|^2 - 2 a.b carry a rounding error of a few machine
# epsilons times |a|^2 + |b|^2 (measured: at most ~6 eps for d from 1 to 1024 in fp32).
# A squared distance below this many epsilons of |a|^2 + |b|^2 is indistinguishable from
# zero, so it is treated as an exact zero: its contribution is 0 and so is its gradient.
_ZERO_TOL_EPS = 32.0
# Up to this many features, squared distances are summed from the differences themselves: exact
# up to rounding at a memory cost of d (B, n, n+m) tensors. The Gram formula above loses about
# sqrt(32 eps) of the spread's scale to rounding, which at small d is the scale at which
# independent draws come close (at d = 1 a pair of 8 normal draws is closer than 2e-3 of their
# spread with probability ~1%); at larger d such close pairs are vanishingly rare.
_DIRECT_MAX_D = 4


def _check_inputs(samples: Tensor, targets: Tensor, beta: float) -> None:
    """Validates the arguments of :func:`energy_score`; raises on the first problem."""
    for name, value in (("samples", samples), ("targets", targets)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(
                f"{name} must have a floating-point dtype (float16, bfloat16, float32 or float64), got {value.dtype}"
            )
    _check_samples(samples)
    _check_targets(samples, targets)
    _check_beta(beta)


def _check_samples(samples: Tensor) -> None:
    if samples.dim() < 2:
        raise ValueError(
            f"samples must have shape (n, *batch, d) with n >= 2 draws and a feature axis d, "
            f"got shape {tuple(samples.shape)}"
        )
    n, d = samples.shape[0], samples.shape[-1]
    if n < 2:
        raise ValueError(
            f"samples must hold n >= 2 draws along axis 0 (the estimator of E||X - X'|| needs "
            f"two), got shape {tuple(samples.shape)}"
        )
    if d < 1:
        raise ValueError(
            f"samples must have a non-empty feature axis d (the last one), got shape {tuple(samples.shape)}"
        )


def _check_targets(samples: Tensor, targets: Tensor) -> None:
    expected = "(m, " + ", ".join(str(size) for size in samples.shape[1:]) + ")"
    if targets.dim() != samples.dim() or targets.shape[1:] != samples.shape[1:]:
        hint = ""
        if targets.shape == samples.shape[1:]:
            hint = " (for a single observation per batch element use targets.unsqueeze(0))"
        raise ValueError(
            f"targets must have shape {expected}, matching samples of shape "
            f"{tuple(samples.shape)} in every axis but the first, got shape "
            f"{tuple(targets.shape)}{hint}"
        )
    if targets.shape[0] < 1:
        raise ValueError(f"targets must hold m >= 1 draws along axis 0, got shape {tuple(targets.shape)}")
    if samples.device != targets.device:
        raise ValueError(
            f"samples and targets must be on the same device, got samples on {samples.device} "
            f"and targets on {targets.device}"
        )


def _check_beta(beta: object) -> None:
    if isinstance(beta, bool) or not isinstance(beta, Real):
        raise TypeError(f"beta must be a real number in (0, 2), got {beta!r}")
    if not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number in (0, 2), got {beta!r}")
    if not 0.0 < beta < 2.0:
        raise ValueError(
            f"beta must lie in the open interval (0, 2), got {beta!r}: outside it the energy "
            f"score is not strictly proper (at beta = 2 it only compares means)"
        )


def _safe_power(sq: Tensor, zero_below: Tensor | float, beta: float, keep: Tensor) -> Tensor:
    """Returns ``sq ** (beta / 2)`` with numerical zeros (and ``~keep``) mapped to exactly 0.

    ``sq`` holds squared distances and ``zero_below`` the size of their rounding error: for the
    Gram formula ``_ZERO_TOL_EPS * eps * (|a|^2 + |b|^2)``, for differences the smallest normal
    number. Entries with ``sq <= zero_below`` are zero up to rounding; they give 0 with gradient
    0 (a valid subgradient of ``||a - b||^beta`` at ``a = b``), so coincident points never
    produce inf or NaN gradients.
    """
    finfo = torch.finfo(sq.dtype)
    nonzero = (sq > zero_below) & keep
    # Clamping at the smallest normal number keeps the power and its derivative finite where
    # the mask then zeroes the result, and with it the gradient (0 * finite, never 0 * inf).
    safe = sq.clamp_min(finfo.tiny)
    powered = safe.sqrt() if beta == 1.0 else safe.pow(0.5 * beta)
    return powered * nonzero.to(powered.dtype)  # float mask: bool * float is slow on CPU


def _centred(points: Tensor, centre: Tensor, dtype: torch.dtype) -> Tensor:
    """(k, B, d) points -> contiguous (B, k, d) in `dtype`, minus the (B, d) centre."""
    out = points.transpose(0, 1).to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    return out.sub_(centre.unsqueeze(1))


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Disables autocast on ``device`` (where it has one): matmuls then run in their operands' dtype."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _squared_distances(x: Tensor, y: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | float]:
    """(n, B, d) draws and (m, B, d) targets -> ((B, n, n+m) squared distances, zero_below).

    Column ``j < n`` pairs draw ``i`` with draw ``j``, column ``n + k`` pairs it with target
    ``k``. ``zero_below`` is the rounding error of each entry (see :func:`_safe_power`).
    """
    d = x.shape[-1]
    if d <= _DIRECT_MAX_D:
        xs = x.transpose(0, 1).to(dtype)  # (B, n, d)
        z = torch.cat([xs, y.transpose(0, 1).to(dtype)], dim=1)  # (B, n+m, d)
        sq = (xs.unsqueeze(2) - z.unsqueeze(1)).square().sum(dim=-1)  # (B, n, n+m)
        return sq, torch.finfo(dtype).tiny
    # Centre every batch element at the mean of its model draws. Distances are translation
    # invariant, so the centre needs no gradient; it removes the cancellation that
    # |a|^2 + |b|^2 - 2 a.b suffers for points far from the origin.
    centre = x.detach().mean(dim=0, dtype=dtype)  # (B, d)
    xc = _centred(x, centre, dtype)  # (B, n, d)
    yc = _centred(y, centre, dtype)  # (B, m, d)
    gram_xx = torch.bmm(xc, xc.transpose(1, 2))  # (B, n, n)
    x_sq = torch.diagonal(gram_xx, dim1=1, dim2=2)  # (B, n), |x_i|^2
    y_sq = torch.linalg.vector_norm(yc, dim=-1).square()  # (B, m), |y_k|^2
    gram = torch.cat([gram_xx, torch.bmm(xc, yc.transpose(1, 2))], dim=2)  # (B, n, n+m)
    scale = x_sq.unsqueeze(2) + torch.cat([x_sq, y_sq], dim=1).unsqueeze(1)  # (B, n, n+m)
    sq = torch.add(scale, gram, alpha=-2.0)  # (B, n, n+m), |a|^2 + |b|^2 - 2 a.b
    return sq, scale * (_ZERO_TOL_EPS * torch.finfo(dtype).eps)


def energy_score(samples: Tensor, targets: Tensor, *, beta: float = 1.0) -> Tensor:
    r"""Unbiased energy score of model draws against target draws (higher is better).

    For each batch element, with model draws :math:`x_1, \dots, x_n` and target draws (or
    observations) :math:`y_1, \dots, y_m`, returns

    .. math::

        \hat S = \frac{1}{n(n-1)} \sum_{i \ne j} \|x_i - x_j\|^\beta
                 - \frac{2}{nm} \sum_{i=1}^{n} \sum_{k=1}^{m} \|x_i - y_k\|^\beta,

    an unbiased estimate of :math:`E\|X - X'\|^\beta - 2 E\|X - Y\|^\beta` for
    :math:`X, X' \sim P` (the model) and :math:`Y \sim Q` (the target), which is the energy
    score of ``P`` averaged over ``Q``, as in CALM. It is maximised in expectation only at
    ``P = Q``. The diagonal ``i = j`` is excluded exactly. For one observation (``m = 1``) and
    ``beta = 1`` it equals ``-2`` times the negatively oriented "fair" ensemble energy score of
    ``scoringrules`` (``es_ensemble(obs, fct, estimator="fair")``).

    Arithmetic, and the result, are in float32 for float16/bfloat16/float32 input and in
    float64 if either input is float64, whatever the autocast state (autocast is switched off
    inside; gradients still reach the inputs in their own dtype). For ``d > 4`` distances come
    from :math:`|a|^2 + |b|^2 - 2 a \cdot b` on points centred at the mean of the model draws
    (which leaves distances unchanged and keeps the formula accurate), so no
    ``(n, m, *batch, d)`` tensor is ever built: besides one centred copy of the inputs, memory
    is a few ``(B, n, n + m)`` tensors. Pairs at distance zero up to that formula's rounding
    (squared distance below ``32 eps (|a|^2 + |b|^2)`` for the centred points, i.e. closer than
    about ``2e-3 sqrt(|a|^2 + |b|^2)`` in float32) contribute 0 with gradient 0, a valid
    subgradient, so coinciding draws (e.g. a freshly initialised head whose draws are all
    equal) give finite gradients. For ``d <= 4``, where independent draws often come that
    close, distances are summed from the differences themselves (exact up to rounding, memory
    ``d`` times ``(B, n, n + m)``) and only exactly coinciding points count as zero.

    Args:
        samples: ``(n, *batch, d)`` floating tensor, ``n >= 2`` independent draws of the model
            for each batch element.
        targets: ``(m, *batch, d)`` floating tensor, ``m >= 1`` draws or observations of the
            target, on the same device as ``samples``.
        beta: exponent of the distance, in the open interval ``(0, 2)``.

    Returns:
        ``(*batch)`` tensor of scores, float32 (float64 if an input is float64). A 0-dim
        tensor when ``samples`` is ``(n, d)``.

    Raises:
        TypeError: if an input is not a floating-point tensor or ``beta`` is not a real
            number.
        ValueError: if the shapes do not match ``(n, *batch, d)`` / ``(m, *batch, d)``, if
            ``n < 2``, ``m < 1`` or ``d < 1``, if the inputs are on different devices, or if
            ``beta`` is not finite or not in ``(0, 2)`` (where the score is not strictly
            proper).

    Example:
        >>> import torch
        >>> samples = torch.tensor([[0.0], [2.0]])  # n = 2 draws, d = 1, no batch axes
        >>> targets = torch.tensor([[3.0]])  # m = 1 observation
        >>> energy_score(samples, targets)  # |0-2| - 2 * (|0-3| + |2-3|) / 2
        tensor(-2.)
        >>> energy_score(torch.randn(8, 4, 16, 128), torch.randn(100, 4, 16, 128)).shape
        torch.Size([4, 16])
    """
    _check_inputs(samples, targets, beta)
    beta = float(beta)
    n, m, d = samples.shape[0], targets.shape[0], samples.shape[-1]
    batch_shape = samples.shape[1:-1]
    is_double = torch.float64 in (samples.dtype, targets.dtype)
    dtype = torch.float64 if is_double else torch.float32

    # Autocast would run the matmuls below in bf16/fp16 (errors of ~1e-1 on the score); the
    # whole computation stays in `dtype`, and gradients still reach the inputs in their dtype.
    with _autocast_off(samples.device):
        x = samples.reshape(n, -1, d)  # (n, B, d)
        y = targets.reshape(m, -1, d)  # (m, B, d)
        sq, zero_below = _squared_distances(x, y, dtype)  # (B, n, n+m)
        not_self = ~torch.eye(n, n + m, dtype=torch.bool, device=sq.device)  # excludes i == j
        dist = _safe_power(sq, zero_below, beta, not_self)  # (B, n, n+m), ||.||^beta
        # spread = sum_{i != j} / (n(n-1)) and fit = sum_{i,k} / (nm); score = spread - 2 fit.
        weights = torch.cat([dist.new_full((n,), 1.0 / (n * (n - 1))), dist.new_full((m,), -2.0 / (n * m))])  # (n+m,)
        return (dist.sum(dim=1) @ weights).reshape(batch_shape)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(repr(r) for r in _REDUCTIONS)}, got {reduction!r}")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def energy_loss(samples: Tensor, targets: Tensor, *, beta: float = 1.0, reduction: str = "mean") -> Tensor:
    r"""Energy loss for training: the negated :func:`energy_score`, reduced over the batch.

    .. math::

        L = -\hat S = \frac{2}{nm} \sum_{i,k} \|x_i - y_k\|^\beta
            - \frac{1}{n(n-1)} \sum_{i \ne j} \|x_i - x_j\|^\beta

    Minimising it in expectation fits the model to the target (strict propriety for
    ``0 < beta < 2``). Gradients flow to ``samples`` (and to ``targets`` if they require
    grad) in their own dtype.

    Args:
        samples: ``(n, *batch, d)`` floating tensor, ``n >= 2`` draws of the model.
        targets: ``(m, *batch, d)`` floating tensor, ``m >= 1`` draws of the target.
        beta: exponent of the distance, in ``(0, 2)``.
        reduction: ``"mean"`` (scalar mean over batch elements), ``"sum"`` (scalar sum) or
            ``"none"`` (the ``(*batch)`` tensor of losses).

    Returns:
        A 0-dim tensor for ``"mean"``/``"sum"``, else a ``(*batch)`` tensor; float32 (float64
        if an input is float64).

    Raises:
        TypeError: as :func:`energy_score`.
        ValueError: as :func:`energy_score`, or if ``reduction`` is not one of
            ``"mean"``, ``"sum"``, ``"none"``.

    Example:
        >>> import torch
        >>> samples = torch.tensor([[[0.0], [0.0]], [[2.0], [1.0]]])  # (n=2, batch=2, d=1)
        >>> targets = torch.tensor([[[3.0], [4.0]]])  # (m=1, batch=2, d=1)
        >>> energy_loss(samples, targets, reduction="none")
        tensor([2., 6.])
        >>> energy_loss(samples, targets)
        tensor(4.)
    """
    _check_reduction(reduction)
    return _reduce(-energy_score(samples, targets, beta=beta), reduction)


def _check_weights(weights: Tensor, samples: Tensor) -> None:
    """Validates the mixture weights of :func:`mixture_energy_score`."""
    k, batch = samples.shape[0], tuple(samples.shape[2:-1])
    if not isinstance(weights, Tensor) or not weights.is_floating_point():
        got = weights.dtype if isinstance(weights, Tensor) else type(weights).__name__
        raise TypeError(f"weights must be a floating-point torch.Tensor, got {got}")
    if tuple(weights.shape) != (*batch, k):
        raise ValueError(
            f"weights must have shape {(*batch, k)} (*batch, J) for samples of shape {tuple(samples.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    if weights.device != samples.device:
        raise ValueError(f"weights must be on the samples' device {samples.device}, got {weights.device}")
    w = weights.detach().double()
    tol = 1e-4 if weights.dtype in (torch.float32, torch.float64) else 2e-2
    if w.numel() and (
        not bool(torch.isfinite(w).all()) or float(w.min()) < 0 or float((w.sum(-1) - 1).abs().max()) > tol
    ):
        raise ValueError(
            f"weights must be finite, non-negative and sum to 1 over the last axis (within {tol:g}); "
            f"got values in [{float(w.min()):.3g}, {float(w.max()):.3g}] with sums up to "
            f"{float((w.sum(-1) - 1).abs().max()):.3g} away from 1"
        )


def mixture_energy_score(samples: Tensor, weights: Tensor, targets: Tensor, *, beta: float = 1.0) -> Tensor:
    r"""Unbiased energy score of a mixture whose weights are known, differentiable in the weights.

    The model is the mixture :math:`P = \sum_j \pi_j P_j` of ``J`` samplers. With ``n`` draws
    :math:`x_{j1}, \dots, x_{jn}` of every component and targets :math:`y_1, \dots, y_m`,

    .. math::

        \hat S = \sum_{j,k} \pi_j \pi_k \hat D_{jk}
                 - \frac{2}{nm} \sum_j \pi_j \sum_{a,i} \|x_{ja} - y_i\|^\beta,
        \quad
        \hat D_{jk} = \begin{cases}
            \frac{1}{n^2} \sum_{a,b} \|x_{ja} - x_{kb}\|^\beta & j \ne k \\
            \frac{1}{n(n-1)} \sum_{a \ne b} \|x_{ja} - x_{jb}\|^\beta & j = k
        \end{cases}

    is an unbiased estimate of the energy score :math:`E\|X - X'\|^\beta - 2 E\|X - Y\|^\beta`
    of ``P`` (the same quantity as :func:`energy_score`), because the score is a quadratic form in
    the weights whose coefficients :math:`E\|X_j - X_k'\|^\beta` each have an unbiased estimate.
    Unlike :func:`energy_score` on draws of ``P``, which would need the component of each draw to
    be sampled, it gives the weights an exact gradient: a generator can learn discrete choices
    (which component) through ``weights`` and the continuous spread within each component through
    the draws. Arithmetic, precision and the handling of coincident draws are those of
    :func:`energy_score`; ``J = 1`` reproduces it (up to rounding).

    Args:
        samples: ``(J, n, *batch, d)`` floating tensor, ``n >= 2`` independent draws of each of
            the ``J`` components for each batch element.
        weights: ``(*batch, J)`` floating tensor of mixture weights, non-negative and summing to 1
            (e.g. a softmax); gradients flow to it.
        targets: ``(m, *batch, d)`` floating tensor, ``m >= 1`` draws or observations of the target.
        beta: exponent of the distance, in the open interval ``(0, 2)``.

    Returns:
        ``(*batch)`` tensor of scores, float32 (float64 if an input is float64).

    Raises:
        TypeError: as :func:`energy_score`, or if ``weights`` is not a floating tensor.
        ValueError: as :func:`energy_score` (with ``J * n`` draws), or if ``weights`` has the wrong
            shape or device, a negative or non-finite entry, or rows that do not sum to 1.

    Example:
        >>> import torch
        >>> samples = torch.tensor([[[0.0], [0.0]], [[4.0], [4.0]]])  # J = 2 point masses, n = 2
        >>> weights, targets = torch.tensor([0.25, 0.75]), torch.tensor([[4.0]])
        >>> mixture_energy_score(samples, weights, targets)  # 2 * .25 * .75 * 4 - 2 * .25 * 4
        tensor(-0.5000)
        >>> mixture_energy_score(torch.randn(8, 2, 16, 128), torch.full((16, 8), 1 / 8), torch.randn(100, 16, 128)).shape
        torch.Size([16])
    """
    if not isinstance(samples, Tensor) or samples.dim() < 3:
        got = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"samples must have shape (J, n, *batch, d) with n >= 2 draws of each component, got {got}")
    k, n = samples.shape[0], samples.shape[1]
    if k < 1 or n < 2:
        raise ValueError(
            f"samples must hold J >= 1 components with n >= 2 draws each along axes 0 and 1, got shape {tuple(samples.shape)}"
        )
    flat = samples.flatten(0, 1)  # (J n, *batch, d)
    _check_inputs(flat, targets, beta)
    _check_weights(weights, samples)
    beta = float(beta)
    m, d = targets.shape[0], samples.shape[-1]
    batch_shape = samples.shape[2:-1]
    dtype = torch.float64 if torch.float64 in (samples.dtype, targets.dtype, weights.dtype) else torch.float32
    with _autocast_off(samples.device):
        x = flat.reshape(k * n, -1, d)  # (J n, B, d)
        y = targets.reshape(m, -1, d)  # (m, B, d)
        sq, zero_below = _squared_distances(x, y, dtype)  # (B, J n, J n + m)
        not_self = ~torch.eye(k * n, k * n + m, dtype=torch.bool, device=sq.device)
        dist = _safe_power(sq, zero_below, beta, not_self)  # (B, J n, J n + m)
        pair = dist[:, :, : k * n].unflatten(1, (k, n)).unflatten(3, (k, n)).sum(dim=(2, 4))  # (B, J, J)
        fit = dist[:, :, k * n :].unflatten(1, (k, n)).sum(dim=(2, 3)) / (n * m)  # (B, J)
        coef = torch.full((k, k), 1.0 / (n * n), dtype=dtype, device=sq.device)
        coef.diagonal().fill_(1.0 / (n * (n - 1)))
        pi = weights.reshape(-1, k).to(dtype)  # (B, J)
        spread = torch.einsum("bj,bjk,bk->b", pi, pair * coef, pi)
        return (spread - 2.0 * (pi * fit).sum(dim=-1)).reshape(batch_shape)


def mixture_energy_loss(
    samples: Tensor, weights: Tensor, targets: Tensor, *, beta: float = 1.0, reduction: str = "mean"
) -> Tensor:
    r"""Training loss of a mixture sampler: the negated :func:`mixture_energy_score`, reduced over the batch.

    Args:
        samples: ``(J, n, *batch, d)`` draws of every component.
        weights: ``(*batch, J)`` mixture weights (gradients flow to them).
        targets: ``(m, *batch, d)`` target draws.
        beta: exponent of the distance, in ``(0, 2)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A 0-dim tensor for ``"mean"``/``"sum"``, else the ``(*batch)`` losses.

    Example:
        >>> import torch
        >>> logits = torch.zeros(16, 4, requires_grad=True)
        >>> loss = mixture_energy_loss(torch.randn(4, 2, 16, 8), logits.softmax(-1), torch.randn(10, 16, 8))
        >>> loss.backward()
        >>> logits.grad.shape
        torch.Size([16, 4])
    """
    _check_reduction(reduction)
    return _reduce(-mixture_energy_score(samples, weights, targets, beta=beta), reduction)
