"""Llama-style decoder backbone shared by CALM and the token baseline.

Pre-norm residual blocks ``x + attn(norm(x))``, ``x + ffn(norm(x))`` with rotary position
embeddings (RoPE) computed from explicit position ids (so left-padded batches work), a SwiGLU
feed-forward layer, grouped-query attention through
:func:`torch.nn.functional.scaled_dot_product_attention` (``enable_gqa``) and a preallocated
key/value cache for incremental decoding. The backbone maps input vectors to hidden states; the
caller owns the input embedding (token embeddings or CALM chunk embeddings) and the output head.

Axis key:
    b  batch rows
    t  query positions of this call
    s  key positions (cached + new), ``t_kv`` in the docs
    h  hidden size
    H  query heads;  G  key/value heads (``num_kv_heads``);  d  head size (h / H)
    f  feed-forward width
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calm_models._layers import RMSNorm, SwiGLU

__all__ = [
    "Backbone",
    "BackboneConfig",
    "KVCache",
    "apply_rotary",
    "backbone_flops",
    "backbone_flops_per_token",
    "causal_mask",
]


@dataclass
class BackboneConfig:
    """Configuration of :class:`Backbone`.

    Args:
        hidden_size: Model width ``h``.
        num_layers: Number of decoder blocks.
        num_heads: Number of query heads ``H``; ``hidden_size`` must be divisible by it.
        num_kv_heads: Number of key/value heads ``G`` (grouped-query attention); ``None`` means
            ``num_heads`` (plain multi-head attention). ``num_heads`` must be divisible by it.
        ffn_size: SwiGLU intermediate width ``f``; ``None`` means ``8/3 * hidden_size`` rounded
            up to a multiple of 64 (Llama's rule), see :attr:`resolved_ffn_size`.
        max_seq_len: Longest sequence one forward call may process and the default length of a
            cache from :meth:`Backbone.new_cache`.
        rope_theta: Base of the rotary frequencies ``theta^(-2i/d)``.
        norm_eps: Epsilon of every RMSNorm.
        init_std: Standard deviation of the normal initialisation of every linear layer; the
            output projections of attention and feed-forward use
            ``init_std / sqrt(2 * num_layers)`` (GPT-2).

    Example:
        >>> cfg = BackboneConfig(hidden_size=256, num_heads=4, num_kv_heads=2)
        >>> cfg.head_dim, cfg.resolved_kv_heads, cfg.resolved_ffn_size
        (64, 2, 704)
        >>> BackboneConfig(hidden_size=100, num_heads=3).validate()
        Traceback (most recent call last):
        ...
        ValueError: BackboneConfig: hidden_size (100) must be divisible by num_heads (3)
    """

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    ffn_size: int | None = None
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @property
    def resolved_kv_heads(self) -> int:
        """Number of key/value heads with the ``None`` default resolved."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def resolved_ffn_size(self) -> int:
        """Feed-forward width with the ``None`` default (8/3 * h, up to a multiple of 64)."""
        if self.ffn_size is not None:
            return self.ffn_size
        return 64 * math.ceil(8 * self.hidden_size / 3 / 64)

    @property
    def head_dim(self) -> int:
        """Per-head size ``d = hidden_size / num_heads``."""
        return self.hidden_size // self.num_heads

    def validate(self) -> BackboneConfig:
        """Check every field; return ``self`` so it can be chained.

        Returns:
            This config.

        Raises:
            ValueError: Naming the offending field when a size is not positive, when
                ``hidden_size`` is not divisible by ``num_heads``, when ``num_heads`` is not
                divisible by ``num_kv_heads``, when the head size is odd (RoPE rotates pairs) or
                when ``rope_theta``, ``norm_eps`` or ``init_std`` is not positive.
        """
        for name in ("hidden_size", "num_layers", "num_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BackboneConfig: {name} must be a positive int, got {value!r}")
        for name in ("num_kv_heads", "ffn_size"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(
                    f"BackboneConfig: {name} must be None or a positive int, got {value!r}"
                )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BackboneConfig: hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.num_heads % self.resolved_kv_heads:
            raise ValueError(
                f"BackboneConfig: num_heads ({self.num_heads}) must be divisible by "
                f"num_kv_heads ({self.resolved_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"BackboneConfig: hidden_size / num_heads = {self.head_dim} must be even for "
                "rotary embeddings"
            )
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"BackboneConfig: {name} must be a positive float, got {value!r}")
        return self


def backbone_flops_per_token(cfg: BackboneConfig, seq_len: int) -> float:
    r"""Analytic forward FLOPs per token of :class:`Backbone` (nanoGPT / PaLM accounting).

    Every multiply-add counts as 2 FLOPs. With ``N`` the number of weights in matrix
    multiplications (embeddings and norms excluded), per decoder layer

    .. math::
        N_\text{layer} = \underbrace{2h^2}_{q,\,o} + \underbrace{2 h G d}_{k,\,v}
                         + \underbrace{3 h f}_{\text{SwiGLU}},

    and the attention scores and the weighted sum of values cost ``2 * 2 * T * h`` per layer
    and token for a context of ``T = seq_len`` keys (the causal mask is not discounted, as in
    PaLM's appendix B and nanoGPT's ``estimate_mfu``):

    .. math:: \text{FLOPs/token} = 2 \cdot L \cdot N_\text{layer} + 4 \cdot L \cdot T \cdot h.

    Norms, RoPE, softmax and residual additions are ignored (lower order). Training costs about
    3x this (forward + backward).

    Args:
        cfg: Backbone configuration.
        seq_len: Context length ``T`` (number of keys attended to).

    Returns:
        Forward FLOPs per token as a float.

    Raises:
        ValueError: If ``seq_len < 1`` or the config is invalid.

    Example:
        >>> cfg = BackboneConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        ...                      ffn_size=128)
        >>> backbone_flops_per_token(cfg, seq_len=32)
        163840.0
    """
    cfg.validate()
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(
            f"backbone_flops_per_token: seq_len must be a positive int, got {seq_len!r}"
        )
    h, d, g, f = cfg.hidden_size, cfg.head_dim, cfg.resolved_kv_heads, cfg.resolved_ffn_size
    per_layer = 2 * h * h + 2 * h * g * d + 3 * h * f
    return float(2 * cfg.num_layers * per_layer + 4 * cfg.num_layers * seq_len * h)


#: Alias of :func:`backbone_flops_per_token`.
backbone_flops = backbone_flops_per_token


def causal_mask(
    q_len: int, kv_len: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean causal mask for ``q_len`` new queries appended after ``kv_len - q_len`` cached keys.

    Query ``i`` sits at key position ``kv_len - q_len + i`` and may attend keys ``0..`` that
    position (``True`` = attend), the convention of :meth:`Backbone.forward`.

    Args:
        q_len: Number of queries ``t``.
        kv_len: Number of keys ``s >= t`` (cached + new).
        device: Device of the result.

    Returns:
        Bool tensor of shape ``(t, s)``.

    Raises:
        ValueError: If ``q_len < 1`` or ``kv_len < q_len``.

    Example:
        >>> causal_mask(2, 3).int()
        tensor([[1, 1, 0],
                [1, 1, 1]], dtype=torch.int32)
    """
    if q_len < 1 or kv_len < q_len:
        raise ValueError(
            f"causal_mask: need 1 <= q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}"
        )
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    return torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]


def _rope_angles(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles, each ``(b, 1, t, d/2)`` in ``dtype`` (computed in fp32+)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=work) / head_dim
    inv_freq = theta ** (-exponent)  # (d/2,)
    angles = position_ids.to(work)[..., None] * inv_freq  # (b, t, d/2)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(
    x: torch.Tensor, position_ids: torch.Tensor, theta: float = 10000.0
) -> torch.Tensor:
    r"""Rotary position embedding (Su et al., 2021), "rotate half" layout.

    The head axis is split into halves ``(x1, x2)`` and pair ``i`` is rotated by the angle
    ``pos * theta^(-2i/d)``:

    .. math:: (x_1, x_2) \mapsto (x_1 \cos\phi - x_2 \sin\phi,\; x_2 \cos\phi + x_1 \sin\phi).

    Hence ``<R(m) q, R(n) k>`` depends on ``m - n`` only. Angles are computed in fp32 (fp64 for
    fp64 inputs), so large positions stay accurate under bf16.

    Args:
        x: Queries or keys of shape ``(b, heads, t, d)`` with even ``d``.
        position_ids: Integer positions of shape ``(b, t)`` or ``(1, t)``.
        theta: Frequency base.

    Returns:
        Rotated tensor of the shape and dtype of ``x``.

    Raises:
        ValueError: If ``x`` is not 4-D with an even last axis or the positions do not match.

    Example:
        >>> import torch
        >>> q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
        >>> def score(m, n):
        ...     return (apply_rotary(q, torch.tensor([[m]])) * apply_rotary(k, torch.tensor([[n]]))).sum()
        >>> bool(torch.isclose(score(7, 3), score(104, 100), atol=1e-5))
        True
    """
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(
            f"apply_rotary: x must be (b, heads, t, d) with even d, got {tuple(x.shape)}"
        )
    if position_ids.dim() != 2 or position_ids.shape[-1] != x.shape[2]:
        raise ValueError(
            f"apply_rotary: position_ids must be (b, t={x.shape[2]}), got {tuple(position_ids.shape)}"
        )
    cos, sin = _rope_angles(position_ids, x.shape[-1], theta, x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Preallocated key/value cache for incremental decoding with :class:`Backbone`.

    Per layer it holds ``k`` and ``v`` buffers of shape ``(batch, kv_heads, max_len, head_dim)``
    and one shared :attr:`length`: the number of valid positions (columns ``0..length-1``).
    A forward call of ``t`` positions writes its keys/values into columns
    ``length..length+t-1`` of every layer and then advances :attr:`length` by ``t``. The cache
    stores no mask: padding is expressed through ``attn_mask`` by the caller.

    It is meant for inference (use it under :func:`torch.no_grad`): writes are in place.

    Args:
        num_layers: Number of decoder layers.
        batch_size: Rows ``b``.
        num_kv_heads: Key/value heads ``G``.
        max_len: Capacity in positions.
        head_dim: Per-head size ``d``.
        device: Device of the buffers.
        dtype: Dtype of the buffers (default ``torch.get_default_dtype()``).

    Raises:
        ValueError: If a size is not positive.

    Example:
        >>> cache = KVCache(num_layers=2, batch_size=3, num_kv_heads=1, max_len=8, head_dim=4)
        >>> k, v = cache.update(0, torch.ones(3, 1, 5, 4), torch.ones(3, 1, 5, 4))
        >>> k.shape, cache.length
        (torch.Size([3, 1, 5, 4]), 0)
        >>> _ = cache.update(1, torch.ones(3, 1, 5, 4), torch.ones(3, 1, 5, 4))
        >>> cache.advance(5)
        >>> cache.crop(2).select(torch.tensor([2, 0])).length, cache.batch_size
        (2, 2)
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        sizes = dict(
            num_layers=num_layers,
            batch_size=batch_size,
            num_kv_heads=num_kv_heads,
            max_len=max_len,
            head_dim=head_dim,
        )
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return len(self.k)

    @property
    def batch_size(self) -> int:
        """Current number of rows."""
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        """Capacity in positions."""
        return self.k[0].shape[2]

    @property
    def device(self) -> torch.device:
        """Device of the buffers."""
        return self.k[0].device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the buffers."""
        return self.k[0].dtype

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``t`` new keys/values of one layer at columns ``length..length+t-1``.

        Does not advance :attr:`length` (all layers of one forward call write at the same
        offset; :class:`Backbone` calls :meth:`advance` once afterwards).

        Args:
            layer: Layer index.
            k: New keys ``(b, G, t, d)``.
            v: New values ``(b, G, t, d)``.

        Returns:
            ``(keys, values)``, views of shape ``(b, G, length + t, d)`` in the cache dtype.

        Raises:
            ValueError: If the shapes do not match the cache or the cache would overflow.
        """
        buf_k, buf_v = self.k[layer], self.v[layer]
        b, g, _, d = buf_k.shape
        if k.shape != v.shape or k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (b, g, d):
            raise ValueError(
                f"KVCache.update: k and v must be ({b}, {g}, t, {d}), got {tuple(k.shape)} and "
                f"{tuple(v.shape)}"
            )
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache.update: writing {k.shape[2]} positions at length {self.length} exceeds "
                f"max_len {self.max_len}"
            )
        buf_k[:, :, self.length : end] = k
        buf_v[:, :, self.length : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as valid (after every layer has been updated).

        Args:
            n: Number of positions written by the last forward call.

        Raises:
            ValueError: If ``n < 0`` or the new length exceeds :attr:`max_len`.
        """
        if n < 0 or self.length + n > self.max_len:
            raise ValueError(
                f"KVCache.advance: n must be in [0, {self.max_len - self.length}], got {n}"
            )
        self.length += n

    def select(self, rows: torch.Tensor) -> KVCache:
        """Keep (and reorder or repeat) batch rows in place: ``buf = buf.index_select(0, rows)``.

        Use it to drop finished rows during generation or to reorder beams.

        Args:
            rows: 1-D integer tensor of row indices into the current batch.

        Returns:
            This cache (with ``batch_size == len(rows)``).

        Raises:
            TypeError: If ``rows`` is not an integer tensor.
            ValueError: If ``rows`` is not 1-D and non-empty.
        """
        if not isinstance(rows, torch.Tensor) or rows.dtype not in (torch.int64, torch.int32):
            raise TypeError("KVCache.select: rows must be an int64/int32 tensor")
        if rows.dim() != 1 or rows.numel() == 0:
            raise ValueError(
                f"KVCache.select: rows must be 1-D and non-empty, got {tuple(rows.shape)}"
            )
        rows = rows.to(self.device)
        self.k = [buf.index_select(0, rows) for buf in self.k]
        self.v = [buf.index_select(0, rows) for buf in self.v]
        return self

    def crop(self, length: int) -> KVCache:
        """Forget every position from ``length`` on (the buffers are kept, later writes overwrite).

        Args:
            length: New length, ``0 <= length <= self.length``.

        Returns:
            This cache.

        Raises:
            ValueError: If ``length`` is out of range.
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.crop: length must be in [0, {self.length}], got {length}")
        self.length = length
        return self

    def reset(self) -> KVCache:
        """Empty the cache (``length = 0``). Returns this cache."""
        self.length = 0
        return self


class _Attention(nn.Module):
    """Grouped-query self-attention with RoPE (no biases)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.resolved_kv_heads
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (b, t, h)
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # each (b, 1, t, d/2)
        mask: torch.Tensor | None,  # (b|1, 1|H, t, s) bool
        is_causal: bool,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, t, self.num_heads, d).transpose(1, 2)  # (b, H, t, d)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, d).transpose(1, 2)  # (b, G, t, d)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, d).transpose(1, 2)  # (b, G, t, d)
        q, k = _rotate(q, *cos_sin), _rotate(k, *cos_sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (b, G, s, d)
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (b, H, t, d)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * d))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE "rotate half" with precomputed cos/sin ``(b, 1, t, d/2)``."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class _Block(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = _Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.hidden_size, cfg.resolved_ffn_size)

    def forward(self, x, cos_sin, mask, is_causal, cache, layer):
        x = x + self.attn(self.attn_norm(x), cos_sin, mask, is_causal, cache, layer)
        return x + self.ffn(self.ffn_norm(x))


class Backbone(nn.Module):
    """Llama-style decoder: ``num_layers`` pre-norm blocks and a final RMSNorm.

    Maps input vectors ``(b, t, h)`` to hidden states ``(b, t, h)``; embeddings and output heads
    belong to the caller. Initialisation: every linear weight ~ ``N(0, init_std^2)``, the
    attention output projection and the SwiGLU down projection ``w2`` ~
    ``N(0, (init_std / sqrt(2 * num_layers))^2)``; norm weights are 1.

    Args:
        cfg: Configuration (validated here).

    Raises:
        ValueError: If the configuration is invalid.

    Example:
        >>> import torch
        >>> model = Backbone(BackboneConfig(hidden_size=32, num_layers=2, num_heads=4))
        >>> x = torch.randn(2, 5, 32)
        >>> full = model(x)
        >>> cache = model.new_cache(batch_size=2, max_len=8)
        >>> with torch.no_grad():
        ...     first = model(x[:, :3], cache=cache)
        ...     rest = model(x[:, 3:], cache=cache)
        >>> full.shape, cache.length
        (torch.Size([2, 5, 32]), 5)
        >>> torch.allclose(torch.cat([first, rest], dim=1), full, atol=1e-5)
        True
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.layers = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialise all weights as described in the class docstring."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith("attn.o_proj") or name.endswith("ffn.w2")
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """Allocate an empty :class:`KVCache` for this model.

        Args:
            batch_size: Rows ``b``.
            max_len: Capacity in positions (default ``cfg.max_seq_len``).
            device: Buffer device (default: the parameters' device).
            dtype: Buffer dtype (default: the parameters' dtype).

        Returns:
            A cache with ``length == 0``.

        Raises:
            ValueError: If a size is not positive.
        """
        param = self.norm.weight
        return KVCache(
            self.cfg.num_layers,
            batch_size,
            self.cfg.resolved_kv_heads,
            self.cfg.max_seq_len if max_len is None else max_len,
            self.cfg.head_dim,
            device=param.device if device is None else device,
            dtype=param.dtype if dtype is None else dtype,
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Run the decoder.

        Masking rules (``True`` = may attend):

        * ``attn_mask is None`` and no cache: causal (SDPA's ``is_causal`` fast path).
        * ``attn_mask is None`` with a cache: every query attends all cached keys and, causally,
          the new ones (:func:`causal_mask`).
        * ``attn_mask`` given: used as is (it replaces the causal default, so combine causality
          and padding yourself, e.g. ``causal_mask(t, s) & key_valid[:, None, None, :]``). Make
          sure every query row attends at least one key.

        Args:
            x: Inputs ``(b, t, h)``.
            position_ids: Integer positions ``(b, t)`` or ``(1, t)`` for RoPE; default
                ``cache.length + arange(t)`` (``arange(t)`` without a cache). Pass them per row
                for left-padded batches.
            attn_mask: Bool mask broadcastable to ``(b, H, t, s)`` where
                ``s = cache.length + t`` with a cache and ``s = t`` without.
            cache: Optional :class:`KVCache`; the new keys/values are written at
                ``cache.length`` and the length advances by ``t``.

        Returns:
            Hidden states ``(b, t, h)`` after the final RMSNorm.

        Raises:
            ValueError: On a wrong shape of ``x``, ``position_ids`` or ``attn_mask``, a batch
                size different from the cache's, or ``t > max_seq_len``.
            TypeError: If ``attn_mask`` is not bool or ``position_ids`` is not an integer tensor.
        """
        cfg = self.cfg
        if x.dim() != 3 or x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"Backbone: x must be (b, t, {cfg.hidden_size}), got {tuple(x.shape)}")
        b, t, _ = x.shape
        if t < 1 or t > cfg.max_seq_len:
            raise ValueError(
                f"Backbone: sequence length must be in [1, {cfg.max_seq_len}], got {t}"
            )
        past = 0
        if cache is not None:
            if cache.batch_size != b:
                raise ValueError(f"Backbone: cache has {cache.batch_size} rows but x has {b}")
            past = cache.length
        s = past + t
        if position_ids is None:
            position_ids = torch.arange(past, s, device=x.device)[None, :]  # (1, t)
        else:
            if position_ids.is_floating_point() or position_ids.is_complex():
                raise TypeError("Backbone: position_ids must be an integer tensor")
            if (
                position_ids.dim() != 2
                or position_ids.shape[1] != t
                or position_ids.shape[0] not in (1, b)
            ):
                raise ValueError(
                    f"Backbone: position_ids must be ({b} or 1, {t}), got {tuple(position_ids.shape)}"
                )
        is_causal = False
        mask = attn_mask
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(
                    f"Backbone: attn_mask must be bool (True = attend), got {mask.dtype}"
                )
            if (
                mask.dim() != 4
                or mask.shape[-1] != s
                or mask.shape[-2] not in (1, t)
                or mask.shape[0] not in (1, b)
                or mask.shape[1] not in (1, cfg.num_heads)
            ):
                raise ValueError(
                    f"Backbone: attn_mask must be broadcastable to ({b}, {cfg.num_heads}, {t}, {s}), "
                    f"got {tuple(mask.shape)}"
                )
        elif past == 0:
            is_causal = t > 1
        elif t > 1:
            mask = causal_mask(t, s, device=x.device)[None, None]  # (1, 1, t, s)
        cos_sin = _rope_angles(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos_sin, mask, is_causal, cache, i)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)
