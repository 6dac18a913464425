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
        >>> RMSNorm(4)(torch.tensor([[2.0, -2.0, 2.0, -2.0]])).detach()
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


def check_tokens(
    tokens: object, name: str = "tokens", *, vocab_size: int | None = None, ndim: int | None = 2, multiple_of: int = 1
) -> torch.Tensor:
    """Token ids as an int64 tensor, or a clear error naming ``name``.

    Any integer dtype is accepted. On the CPU the ids are checked against ``vocab_size`` and
    the first out-of-range id is named; on an accelerator the check would force a
    synchronisation, so it is left to the embedding lookup.

    Args:
        tokens: Candidate token ids.
        name: Argument name used in the messages.
        vocab_size: Valid ids are ``[0, vocab_size)``; ``None`` skips the check.
        ndim: Required number of axes (``None``: at least one).
        multiple_of: The last axis must be a multiple of this (the chunk size ``K``).

    Returns:
        ``tokens`` as an int64 tensor.

    Raises:
        TypeError: Not an integer tensor.
        ValueError: Wrong shape or an id out of range.

    Example:
        >>> check_tokens(torch.tensor([[1, 7]]), vocab_size=5)
        Traceback (most recent call last):
        ...
        ValueError: tokens must hold ids in [0, 5), got 7 at position (0, 1)
    """
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.is_floating_point()
        or tokens.is_complex()
        or tokens.dtype == torch.bool
    ):
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


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write a file so that readers see the old or the new content, never a part.

    The content goes to a temporary file in the same directory, is flushed to disk, and the
    temporary file is renamed over ``path`` (``os.replace`` is atomic).

    Args:
        path: Destination; its parent directories are created.
        data: The bytes, or a function that writes them to the open binary file.

    Returns:
        ``path``.

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
