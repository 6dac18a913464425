"""Optimisers and learning-rate schedules from :class:`~calm_models.config.OptimConfig` and
:class:`~calm_models.config.ScheduleConfig`."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from calm_models.config import OptimConfig, ScheduleConfig

#: Short names of :func:`build_optimizer`; any other optimiser is given by its dotted class path.
BUILTIN_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimiser class of ``name``: ``adamw``, ``adam``, ``sgd``, or a dotted class path such as
    ``torch.optim.RAdam`` or ``torch_optimizer.Lamb`` (imported here; torchtune's convention).

    Raises:
        ValueError: An unknown short name, a path that does not import, or a class that is not an optimiser.

    Example:
        >>> optimizer_class("adamw").__name__, optimizer_class("torch.optim.RAdam").__name__
        ('AdamW', 'RAdam')
    """
    if name.lower() in BUILTIN_OPTIMIZERS:
        return BUILTIN_OPTIMIZERS[name.lower()]
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        raise ValueError(
            f"unknown optimizer {name!r}; use {', '.join(BUILTIN_OPTIMIZERS)} or a dotted class path such as "
            "torch.optim.RAdam or torch_optimizer.Lamb"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"optimizer {name!r} cannot be imported: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optimizer {name!r} is not a torch.optim.Optimizer subclass")
    return cls


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into ``decay`` (matrices, ``ndim >= 2``) and ``no_decay`` groups (biases, norm
    gains and every parameter of an ``nn.Embedding``, even when tied to an output layer); empty ones dropped.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        >>> [(g["name"], [tuple(p.shape) for p in g["params"]]) for g in decay_param_groups(m, 0.1)]
        [('decay', [(3, 3)]), ('no_decay', [(5, 3), (3,), (3,), (3,)])]
    """
    embedding_modules = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    embeddings = {id(p) for m in embedding_modules for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for p in model.parameters():  # tied parameters appear once
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [("decay", decay, float(weight_decay)), ("no_decay", no_decay, 0.0)]
    return [{"name": name, "params": params, "weight_decay": wd} for name, params, wd in groups if params]


def build_optimizer(params_or_model: nn.Module | Iterable[Any], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser ``cfg.name`` over a module (decay groups) or parameters / parameter groups.

    ``lr``, ``betas``, ``eps``, ``weight_decay`` and ``momentum`` are passed when the
    constructor takes them, then ``cfg.extra``.

    Raises:
        ValueError: An unknown name or a class path that does not import (:func:`optimizer_class`), an
            ``extra`` argument the constructor does not take, or no trainable parameter.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2, 2))
        >>> type(build_optimizer([p], OptimConfig(name="sgd", lr=0.1))).__name__
        'SGD'
    """
    cls = optimizer_class(cfg.name)
    signature = inspect.signature(cls.__init__)
    accepts = set(signature.parameters)
    if not isinstance(params_or_model, nn.Module):
        groups: list[Any] = list(params_or_model)
    elif "weight_decay" in accepts:
        groups = decay_param_groups(params_or_model, cfg.weight_decay)
    else:
        groups = [p for p in params_or_model.parameters() if p.requires_grad]
    if not groups:
        raise ValueError("params_or_model has no trainable parameter to optimise")
    optional = {"betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay, "momentum": cfg.momentum}
    kwargs = {"lr": cfg.lr, **{k: v for k, v in optional.items() if k in accepts}}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    for k in cfg.extra:
        if k not in accepts and not takes_any:
            valid = ", ".join(n for n in signature.parameters if n not in ("self", "params"))
            raise ValueError(f"optim.extra: {cls.__name__} takes no argument {k!r}; valid arguments: {valid}")
    return cls(groups, **kwargs, **cfg.extra)


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int | None) -> float:
    r"""Learning-rate multiplier at optimiser step ``s = step`` (0-based; ``W`` warm-up steps, ``T`` steps in all,
    ``r = min_lr_ratio``):

    .. math::
        f(s) = \frac{s + 1}{W}\ (s < W), \qquad p = \mathrm{clip}\Big(\frac{s - W}{\max(1, T - W)}, 0, 1\Big),\qquad
        f_\text{constant} = 1,\ f_\text{linear} = 1 - (1 - r) p,\
        f_\text{cosine} = r + (1 - r) \tfrac12 (1 + \cos \pi p).

    Example:
        >>> cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
        >>> [round(lr_factor(s, cfg, 110), 4) for s in (0, 9, 10, 60, 110, 500)]
        [0.1, 1.0, 1.0, 0.55, 0.1, 0.1]
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    if not total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int for a {cfg.kind} schedule, got {total_steps}")
    progress = min(max((step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps), 0.0), 1.0)
    r = cfg.min_lr_ratio
    if cfg.kind == "linear":
        return 1.0 - (1.0 - r) * progress
    return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int | None
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor`; call ``step()`` after every optimiser step.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = build_scheduler(opt, ScheduleConfig(kind="linear", warmup_steps=0, min_lr_ratio=0.0), 4)
        >>> lrs = []
        >>> for _ in range(5):
        ...     lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
        >>> lrs
        [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    lr_factor(cfg.warmup_steps, cfg, total_steps)  # checks total_steps now
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
