"""Small building blocks shared by the CALM modules: RMSNorm and a SwiGLU feed-forward layer.

Axis key: ``*`` any leading axes, ``d`` model width, ``f`` feed-forward (intermediate) width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "SwiGLU"]


class RMSNorm(nn.Module):
    r"""Root-mean-square layer norm over the last axis (Zhang & Sennrich, 2019).

    .. math:: y = \frac{x}{\sqrt{\operatorname{mean}(x^2) + \epsilon}} \odot w

    The statistics and the scaling are computed in fp32 and the result is cast back to the
    input's dtype, so the layer is safe under bf16/fp16 autocast.

    Args:
        dim: Size ``d`` of the last axis.
        eps: Added to the mean square before the square root.

    Raises:
        ValueError: If ``dim < 1`` or ``eps <= 0``.

    Example:
        >>> import torch
        >>> norm = RMSNorm(4)
        >>> norm(torch.tensor([[2.0, -2.0, 2.0, -2.0]])).detach()
        tensor([[ 1.0000, -1.0000,  1.0000, -1.0000]])
        >>> norm(torch.zeros(3, 4, dtype=torch.bfloat16)).dtype
        torch.bfloat16
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"RMSNorm: dim must be >= 1, got {dim}")
        if not eps > 0:
            raise ValueError(f"RMSNorm: eps must be > 0, got {eps}")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x``.

        Args:
            x: Input of shape ``(*, d)``.

        Returns:
            Tensor of shape ``(*, d)`` and the dtype of ``x``.

        Raises:
            ValueError: If the last axis of ``x`` is not ``dim``.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"RMSNorm: expected x with last axis {self.dim}, got shape {tuple(x.shape)}"
            )
        work = torch.promote_types(x.dtype, torch.float32)  # fp32 at least; fp64 stays fp64
        y = F.rms_norm(x.to(work), (self.dim,), self.weight.to(work), self.eps)  # fused kernel
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class SwiGLU(nn.Module):
    r"""Gated feed-forward layer ``w2(silu(w1 x) * w3 x)`` (Shazeer, 2020).

    ``w1`` and ``w3`` map ``d -> f``; ``w2`` maps ``f -> d``. No normalisation and no residual
    connection: callers wrap it as ``x + SwiGLU(norm(x))``.

    Args:
        dim: Input and output width ``d``.
        hidden_dim: Intermediate width ``f``.
        bias: Whether the three linear maps have a bias.

    Raises:
        ValueError: If ``dim < 1`` or ``hidden_dim < 1``.

    Example:
        >>> import torch
        >>> ffn = SwiGLU(8, 20)
        >>> ffn(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
        >>> sum(p.numel() for p in ffn.parameters())
        480
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        if dim < 1 or hidden_dim < 1:
            raise ValueError(
                f"SwiGLU: dim and hidden_dim must be >= 1, got dim={dim}, hidden_dim={hidden_dim}"
            )
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated feed-forward map.

        Args:
            x: Input of shape ``(*, d)``.

        Returns:
            Tensor of shape ``(*, d)``.
        """
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
