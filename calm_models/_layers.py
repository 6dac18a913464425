"""Building blocks shared by the modules: RMSNorm, SwiGLU, input checks and atomic file writes.

Axis key: ``*`` any leading axes, ``d`` model width, ``f`` feed-forward width.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    r"""Root-mean-square layer norm over the last axis: :math:`x / \sqrt{\mathrm{mean}(x^2) + \epsilon} \odot w`.

    Computed in fp32 (fp64 stays fp64) and cast back, so it is safe under bf16 autocast.

    Example:
        >>> RMSNorm(4)(torch.tensor([[2.0, -2.0, 2.0, -2.0]])).detach().round()
        tensor([[ 1., -1.,  1., -1.]])
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(*, d)`` -> ``(*, d)`` in the dtype of ``x``."""
        work = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(work), self.weight.shape, self.weight.to(work), self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    """Gated feed-forward layer ``w2(silu(w1 x) * w3 x)`` (Shazeer, 2020), ``d -> f -> d``.

    Example:
        >>> SwiGLU(8, 20)(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(*, d)`` -> ``(*, d)``."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def check_int(value: object, name: str, minimum: int) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``, else a ``ValueError`` naming it.

    Example:
        >>> check_int(0, "max_new_tokens", 1)
        Traceback (most recent call last):
        ...
        ValueError: max_new_tokens must be an int >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def is_int_tensor(value: object) -> bool:
    """Whether ``value`` is a tensor of an integer dtype (not bool)."""
    return isinstance(value, torch.Tensor) and not (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    )


def check_tokens(
    tokens: object, name: str = "tokens", *, vocab_size: int | None = None, ndim: int | None = 2, multiple_of: int = 1
) -> torch.Tensor:
    """Token ids of any integer dtype as an int64 tensor, or a ``TypeError``/``ValueError`` naming ``name``.

    ``ndim`` is the required number of axes (``None``: at least one) and ``multiple_of`` divides
    the last axis (the chunk size ``K``). On the CPU the ids are checked against ``[0, vocab_size)``
    (``None``: not checked) and the first bad one is named; on an accelerator that would force a
    synchronisation, so it is left to the embedding lookup.

    Example:
        >>> check_tokens(torch.tensor([[1, 7]]), vocab_size=5)
        Traceback (most recent call last):
        ...
        ValueError: tokens must hold ids in [0, 5), got 7 at position (0, 1)
    """
    if not is_int_tensor(tokens):
        got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise TypeError(f"{name} must be an integer tensor of token ids, got {got}")
    if (ndim is not None and tokens.dim() != ndim) or tokens.dim() < 1 or tokens.shape[-1] % multiple_of:
        axes = "(b, L)" if ndim == 2 else "(*b, L)"
        extra = f" with L a multiple of {multiple_of}" if multiple_of > 1 else ""
        raise ValueError(f"{name} must have shape {axes}{extra}, got {tuple(tokens.shape)}")
    if vocab_size is not None and tokens.device.type == "cpu" and tokens.numel():
        bad = ((tokens < 0) | (tokens >= vocab_size)).nonzero()
        if len(bad):
            where = tuple(bad[0].tolist())
            raise ValueError(
                f"{name} must hold ids in [0, {vocab_size}), got {int(tokens[where])} at position "
                f"{where if len(where) > 1 else where[0]}"
            )
    return tokens.long()


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and greedy accuracy of ``logits (*, V)`` at ``targets (*)`` over the ``True`` of ``mask``."""
    weight = torch.ones(targets.shape, device=targets.device) if mask is None else mask.reshape(targets.shape).float()
    count = weight.sum().clamp_min(1)
    ce = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")
    hits = (logits.detach().argmax(-1) == targets).float()
    return (ce * weight.flatten()).sum() / count, (hits * weight).sum() / count


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, or a function writing to the open binary file) to ``path`` atomically.

    Readers see the old or the new content, never a part: the content goes to a temporary file
    in the same directory (created with its parents), is flushed to disk and renamed over
    ``path`` (``os.replace`` is atomic). Returns ``path``.

    Example:
        >>> import tempfile
        >>> p = atomic_write(Path(tempfile.mkdtemp()) / "a" / "x.txt", b"hello")
        >>> p.read_text()
        'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data) if isinstance(data, bytes) else data(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def to_json(obj: object, **kwargs) -> str:
    """``json.dumps`` with every non-finite float written as ``null`` (valid JSON, unlike ``NaN``).

    Example:
        >>> to_json({"brier_lm_se": float("nan"), "count": 3})
        '{"brier_lm_se": null, "count": 3}'
    """
    import json
    import math

    def clean(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(obj), allow_nan=False, **kwargs)
