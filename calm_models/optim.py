"""Optimisers and learning-rate schedules built from small dataclass configs.

``build_optimizer`` makes AdamW (default), Adam, SGD, or any optimiser of the optional
`torch-optimizer <https://github.com/jettify/pytorch-optimizer>`_ package by name (``"lamb"``,
``"adafactor"``, ``"radam"`` ...; install with ``pip install torch-optimizer`` or the project's
``[optim]`` extra).  Given a module, parameters are split into two groups:

* **decay**: parameters with ``ndim >= 2`` (the weight matrices of linear/conv layers), and
* **no decay**: biases, normalisation weights (``ndim < 2``) and every parameter owned by an
  ``nn.Embedding``/``nn.EmbeddingBag`` -- even when it is tied to an output projection.

``build_scheduler`` returns a :class:`torch.optim.lr_scheduler.LambdaLR` whose factor at
optimiser step ``s`` (0-based; ``W`` warm-up steps, ``T`` total steps, ``r`` = ``min_lr_ratio``)
is

.. math::

    f(s) = \\frac{s + 1}{W} \\quad (s < W), \\qquad
    p = \\mathrm{clip}\\Big(\\frac{s - W}{\\max(1, T - W)}, 0, 1\\Big),

    f_\\text{constant} = 1, \\quad
    f_\\text{linear} = 1 - (1 - r)\\,p, \\quad
    f_\\text{cosine} = r + (1 - r)\\,\\tfrac12\\big(1 + \\cos(\\pi p)\\big).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    >>> opt = build_optimizer(model, OptimConfig(lr=1e-3))
    >>> [(g["name"], len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
    [('decay', 1, 0.1), ('no_decay', 2, 0.0)]
    >>> sched = build_scheduler(opt, ScheduleConfig(kind="cosine", warmup_steps=2), total_steps=10)
    >>> round(opt.param_groups[0]["lr"], 6)
    0.0005
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "OptimConfig",
    "ScheduleConfig",
    "available_optimizers",
    "build_optimizer",
    "build_scheduler",
    "decay_param_groups",
    "lr_factor",
]

_BUILTIN_OPTIMIZERS = ("adamw", "adam", "sgd")
# Optimisers of torch-optimizer 0.3 (used only to give a precise hint when it is not installed).
_TORCH_OPTIMIZER_NAMES = frozenset(
    "a2gradexp a2gradinc a2graduni accsgd adabelief adabound adafactor adahessian adamod adamp "
    "aggmo apollo diffgrad lamb lars madgrad novograd pid qhadam qhm radam ranger rangerqh "
    "rangerva sgdp sgdw shampoo swats yogi".split()
)
_SCHEDULE_KINDS = ("constant", "cosine", "linear")
_INSTALL_HINT = "pip install torch-optimizer (or the project's [optim] extra)"


@dataclass
class OptimConfig:
    """Optimiser settings.

    Attributes:
        name: ``"adamw"`` (default), ``"adam"``, ``"sgd"``, or the lower-case class name of any
            ``torch-optimizer`` optimiser (``"lamb"``, ``"adafactor"``, ``"radam"``, ...).
        lr: Peak learning rate (reached after the warm-up).
        betas: Adam-style ``(beta1, beta2)``; passed to optimisers that take ``betas``.
        weight_decay: Decoupled weight decay of the "decay" parameter group (>= 2-D weights
            that are not embeddings); the other group gets 0.
        eps: Denominator epsilon; passed to optimisers that take ``eps``.
        grad_clip: Maximum global gradient norm for clipping by the training loop; ``0``
            disables clipping.
        momentum: Momentum of SGD (and of other optimisers taking ``momentum``).
        extra: Further keyword arguments for the optimiser constructor (e.g.
            ``{"relative_step": False}`` for Adafactor).
    """

    name: str = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    grad_clip: float = 1.0
    momentum: float = 0.9
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> list[str]:
        """Return the list of problems with these settings (empty when valid).

        Returns:
            Human-readable problems naming the field, e.g. ``"lr must be > 0, got -1.0"``.

        Example:
            >>> OptimConfig(lr=-1.0, betas=(0.9, 1.5)).validate()
            ['lr must be > 0, got -1.0', 'betas must lie in [0, 1), got (0.9, 1.5)']
        """
        problems = []
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"betas must lie in [0, 1), got {tuple(self.betas)}")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.eps > 0:
            problems.append(f"eps must be > 0, got {self.eps}")
        if not self.grad_clip >= 0:
            problems.append(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if not self.momentum >= 0:
            problems.append(f"momentum must be >= 0, got {self.momentum}")
        try:
            _optimizer_class(self.name)
        except (ValueError, ImportError) as exc:
            problems.append(str(exc))
        return problems


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up, then constant, cosine or linear decay.

    Attributes:
        kind: ``"constant"`` (default, as in the CALM paper), ``"cosine"`` or ``"linear"``.
        warmup_steps: Number of linear warm-up steps (0 for none).
        min_lr_ratio: Final learning rate as a fraction of the peak for the decaying kinds.
    """

    kind: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1

    def validate(self) -> list[str]:
        """Return the list of problems with these settings (empty when valid).

        Returns:
            Human-readable problems naming the field.

        Example:
            >>> ScheduleConfig(warmup_steps=-1).validate()
            ['warmup_steps must be >= 0, got -1']
        """
        problems = []
        if self.kind not in _SCHEDULE_KINDS:
            problems.append(f"kind must be one of {', '.join(_SCHEDULE_KINDS)}, got {self.kind!r}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        return problems


# ----------------------------------------------------------------------------------------------
# Optimisers
# ----------------------------------------------------------------------------------------------


def _torch_optimizer_registry() -> dict[str, type[torch.optim.Optimizer]]:
    """Lower-case name -> optimiser class of the ``torch-optimizer`` package (ImportError if absent)."""
    module = importlib.import_module("torch_optimizer")
    registry = {}
    for name, obj in vars(module).items():
        if (
            isinstance(obj, type)
            and issubclass(obj, torch.optim.Optimizer)
            and obj is not torch.optim.Optimizer
            and next(iter(list(inspect.signature(obj.__init__).parameters)[1:2]), "") == "params"
        ):  # Lookahead wraps another optimiser instead of taking params: left out
            registry[name.lower()] = obj
    return registry


def available_optimizers() -> list[str]:
    """Names accepted by :func:`build_optimizer` in this environment.

    Returns:
        ``["adamw", "adam", "sgd"]`` followed by the ``torch-optimizer`` names when that
        package is installed.

    Example:
        >>> available_optimizers()[:3]
        ['adamw', 'adam', 'sgd']
    """
    names = list(_BUILTIN_OPTIMIZERS)
    try:
        names += sorted(_torch_optimizer_registry())
    except ImportError:
        pass
    return names


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    key = name.lower()
    builtin = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    if key in builtin:
        return builtin[key]
    try:
        registry = _torch_optimizer_registry()
    except ImportError:
        if key in _TORCH_OPTIMIZER_NAMES:
            raise ImportError(
                f"optimizer {name!r} comes from the torch-optimizer package, which is not "
                f"installed: {_INSTALL_HINT}"
            ) from None
        raise ValueError(
            f"unknown optimizer {name!r}; valid names: {', '.join(_BUILTIN_OPTIMIZERS)} "
            f"(others need the torch-optimizer package: {_INSTALL_HINT})"
        ) from None
    if key not in registry:
        raise ValueError(
            f"unknown optimizer {name!r}; valid names: "
            f"{', '.join(list(_BUILTIN_OPTIMIZERS) + sorted(registry))}"
        )
    return registry[key]


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into weight-decay and no-decay groups.

    Decay: parameters with ``ndim >= 2`` not owned by an ``nn.Embedding``/``nn.EmbeddingBag``.
    No decay: everything else (biases, norm gains, embeddings -- a weight tied between an
    embedding and an output layer counts as an embedding).  Shared parameters appear once.
    Empty groups are dropped.

    Args:
        model: The (possibly wrapped) module.
        weight_decay: Weight decay of the decay group.

    Returns:
        Parameter groups ``[{"name": "decay", "params": [...], "weight_decay": wd},
        {"name": "no_decay", "params": [...], "weight_decay": 0.0}]``.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        >>> [(g["name"], [tuple(p.shape) for p in g["params"]]) for g in decay_param_groups(m, 0.1)]
        [('decay', [(3, 3)]), ('no_decay', [(3,), (3,), (3,)])]
    """
    embedding_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        for p in module.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for p in model.parameters():  # de-duplicated (tied weights appear once)
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and id(p) not in embedding_ids:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": float(weight_decay)},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    params_or_model: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    cfg: OptimConfig,
) -> torch.optim.Optimizer:
    """Build the optimiser named by ``cfg.name``.

    Given a module, parameters are split by :func:`decay_param_groups`; an iterable of
    parameters or of parameter-group dicts is used as is (groups without ``weight_decay`` get
    ``cfg.weight_decay``).  ``lr``, ``betas``, ``eps``, ``weight_decay`` and ``momentum`` are
    passed to the constructor when it accepts them, plus ``cfg.extra``.

    Args:
        params_or_model: A module (pass the unwrapped or DDP/compiled module: parameters are
            the same), or parameters / parameter groups.
        cfg: Optimiser settings.

    Returns:
        The optimiser.

    Raises:
        ValueError: Unknown optimiser name (the message lists the valid ones), an ``extra``
            keyword the constructor does not take, or no trainable parameter.
        ImportError: A ``torch-optimizer`` name while that package is not installed (one line
            telling how to install it).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2, 2))
        >>> type(build_optimizer([p], OptimConfig(name="sgd", lr=0.1))).__name__
        'SGD'
        >>> build_optimizer([p], OptimConfig(name="adamx"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown optimizer 'adamx'; valid names: adamw, adam, sgd...
    """
    cls = _optimizer_class(cfg.name)
    signature = inspect.signature(cls.__init__)
    accepts = set(signature.parameters)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    if isinstance(params_or_model, nn.Module):
        if "weight_decay" in accepts:
            groups: list[Any] = decay_param_groups(params_or_model, cfg.weight_decay)
        else:
            groups = [p for p in params_or_model.parameters() if p.requires_grad]
    else:
        groups = list(params_or_model)
        if groups and isinstance(groups[0], dict) and "weight_decay" in accepts:
            groups = [{"weight_decay": cfg.weight_decay, **g} for g in groups]
    if not groups:
        raise ValueError("params_or_model has no trainable parameter to optimise")
    kwargs: dict[str, Any] = {"lr": cfg.lr}
    optional = {
        "betas": tuple(cfg.betas),
        "eps": cfg.eps,
        "weight_decay": cfg.weight_decay,
        "momentum": cfg.momentum,
    }
    kwargs.update({k: v for k, v in optional.items() if k in accepts})
    for k in cfg.extra:
        if k not in accepts and not var_kw:
            valid = ", ".join(n for n in signature.parameters if n not in ("self", "params"))
            raise ValueError(
                f"optim.extra: {cls.__name__} takes no argument {k!r}; valid arguments: {valid}"
            )
    kwargs.update(cfg.extra)
    return cls(groups, **kwargs)


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int | None) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based); see the module docstring.

    Args:
        step: Number of optimiser steps already taken (the factor applies to the next step).
        cfg: Schedule settings.
        total_steps: Total number of optimiser steps ``T`` (needed by the decaying kinds).

    Returns:
        The factor ``f(step)`` in ``[0, 1]``.

    Raises:
        ValueError: Unknown ``cfg.kind`` (lists the valid ones) or missing/invalid
            ``total_steps`` for a decaying schedule.

    Example:
        >>> cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
        >>> [round(lr_factor(s, cfg, 110), 4) for s in (0, 9, 10, 60, 110, 500)]
        [0.1, 1.0, 1.0, 0.55, 0.1, 0.1]
    """
    if cfg.kind not in _SCHEDULE_KINDS:
        raise ValueError(
            f"schedule kind must be one of {', '.join(_SCHEDULE_KINDS)}, got {cfg.kind!r}"
        )
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    if total_steps is None or total_steps < 1:
        raise ValueError(
            f"total_steps must be a positive int for a {cfg.kind} schedule, got {total_steps}"
        )
    progress = min(max((step - warmup) / max(1, total_steps - warmup), 0.0), 1.0)
    ratio = cfg.min_lr_ratio
    if cfg.kind == "linear":
        return 1.0 - (1.0 - ratio) * progress
    return ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int | None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Wrap ``optimizer`` in a ``LambdaLR`` following :func:`lr_factor`.

    Call ``scheduler.step()`` once after every ``optimizer.step()``.  The factor function is a
    plain closure, so ``scheduler.state_dict()`` stores only the step counter and base
    learning rates: on resume the schedule follows the current ``cfg``/``total_steps``.

    Args:
        optimizer: The optimiser whose ``lr`` values become the peak learning rates.
        cfg: Schedule settings.
        total_steps: Total number of optimiser steps (may be ``None`` for ``"constant"``).

    Returns:
        The scheduler; the optimiser's learning rates are already set for step 0.

    Raises:
        ValueError: As :func:`lr_factor` (checked eagerly).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([p], lr=1.0)
        >>> sched = build_scheduler(opt, ScheduleConfig(kind="linear", warmup_steps=0, min_lr_ratio=0.0), 4)
        >>> lrs = []
        >>> for _ in range(5):
        ...     lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
        >>> lrs
        [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    lr_factor(cfg.warmup_steps, cfg, total_steps)  # validates kind and total_steps now

    def factor(step: int) -> float:
        return lr_factor(step, cfg, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
