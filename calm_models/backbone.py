"""Llama-style decoder shared by CALM and the token baseline, with a key/value cache.

Rotary position embeddings come from explicit position ids, so left-padded batches work; attention
is grouped-query, through :func:`torch.nn.functional.scaled_dot_product_attention`. The caller owns
the input embedding and the output head.

Masking rules of :meth:`Backbone.forward` (``True`` = may attend): no mask and no cache is
causal; no mask with a cache lets the new queries attend every cached key and, causally, the new
ones; a given mask is used as is (combine causality and padding yourself, e.g. with
:func:`padded_causal_mask`, and let every query attend at least one key).

Axis key: ``b`` rows, ``t`` queries of this call, ``s`` keys (cached + new), ``h`` width,
``H`` query heads, ``G`` key/value heads, ``d`` head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from calm_models._layers import RMSNorm, SwiGLU, is_int_tensor
from calm_models.config import BackboneConfig


def causal_mask(q_len: int, kv_len: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """``(t, s)`` bool mask for ``t`` new queries after ``s - t`` cached keys (query ``i`` sits at ``s - t + i``).

    Example:
        >>> causal_mask(2, 3).int()
        tensor([[1, 1, 0],
                [1, 1, 1]], dtype=torch.int32)
    """
    if q_len < 1 or kv_len < q_len:
        raise ValueError(f"need 1 <= q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}")
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    return torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]


def padded_causal_mask(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """Causal mask that hides padded keys: ``key_valid (b, s)`` -> ``(b, 1, t, s)``.

    The ``t = q_len`` queries are the last ``t`` of the ``s`` positions. A query at a padded
    position attends only to itself, so no attention row is empty.

    Example:
        >>> padded_causal_mask(torch.tensor([[False, True, True]]), 3)[0, 0].int()
        tensor([[1, 0, 0],
                [0, 1, 0],
                [0, 1, 1]], dtype=torch.int32)
    """
    s = key_valid.shape[1]
    causal = causal_mask(q_len, s, device=key_valid.device)  # (t, s)
    own = torch.eye(s, dtype=torch.bool, device=key_valid.device)[s - q_len :]  # (t, s)
    return ((causal & key_valid[:, None, :]) | own)[:, None]


def _rope(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of the rotary angles, each ``(b, 1, t, d/2)`` (computed in fp32 at least)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=work) / head_dim
    inv_freq = 1.0 / theta**exponent  # (d/2,), as Hugging Face's Llama computes it
    angles = position_ids.to(work)[..., None] * inv_freq  # (b, t, d/2)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rotary(x: torch.Tensor, position_ids: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    r"""Rotary position embedding of queries or keys ``(b, heads, t, d)`` at ``position_ids (b|1, t)``.

    Pair ``i`` of the two halves is rotated by ``pos * theta^(-2i/d)``, so
    ``<R(m) q, R(n) k>`` depends on ``m - n`` only.

    Example:
        >>> q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
        >>> def score(m, n):
        ...     return (apply_rotary(q, torch.tensor([[m]])) * apply_rotary(k, torch.tensor([[n]]))).sum()
        >>> bool(torch.isclose(score(7, 3), score(104, 100), atol=1e-5))
        True
    """
    return _rotate(x, *_rope(position_ids, x.shape[-1], theta, x.dtype))


class KVCache:
    """Preallocated keys and values for incremental decoding, ``(b, G, max_len, d)`` per layer.

    A forward call of ``t`` positions writes at columns ``length .. length + t - 1`` of every
    layer, then :class:`Backbone` advances :attr:`length`. Meant for inference: writes are in place.

    Example:
        >>> cache = KVCache(num_layers=2, batch_size=3, num_kv_heads=1, max_len=8, head_dim=4)
        >>> k, v = cache.update(0, torch.ones(3, 1, 5, 4), torch.ones(3, 1, 5, 4))
        >>> k.shape, cache.length
        (torch.Size([3, 1, 5, 4]), 0)
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
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        if num_layers < 1 or min(shape) < 1:
            raise ValueError(
                f"KVCache: num_layers and (batch_size, num_kv_heads, max_len, head_dim) "
                f"must be positive, got {num_layers} and {shape}"
            )
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0

    @property
    def batch_size(self) -> int:
        """Current number of rows."""
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        """Capacity in positions."""
        return self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``t`` new keys/values ``(b, G, t, d)`` of one layer; return all ``(b, G, length + t, d)``."""
        b, g, _, d = self.k[layer].shape
        if k.shape != v.shape or k.dim() != 4 or (*k.shape[:2], k.shape[3]) != (b, g, d):
            raise ValueError(
                f"KVCache.update: k and v must be ({b}, {g}, t, {d}), got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache: writing {k.shape[2]} positions at length {self.length} exceeds max_len {self.max_len}"
            )
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as valid (after every layer was updated)."""
        if n < 0 or self.length + n > self.max_len:
            raise ValueError(f"KVCache.advance: n must be in [0, {self.max_len - self.length}], got {n}")
        self.length += n

    def select(self, rows: torch.Tensor) -> KVCache:
        """Keep, reorder or repeat rows in place (``index_select`` along the batch); returns self."""
        if not is_int_tensor(rows) or rows.dim() != 1 or rows.numel() == 0:
            raise ValueError(f"KVCache.select: rows must be a non-empty 1-D integer tensor, got {rows!r}")
        rows = rows.to(self.k[0].device)
        self.k = [buf.index_select(0, rows) for buf in self.k]
        self.v = [buf.index_select(0, rows) for buf in self.v]
        return self

    def crop(self, length: int) -> KVCache:
        """Forget every position from ``length`` on (later writes overwrite them); returns self."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.crop: length must be in [0, {self.length}], got {length}")
        self.length = length
        return self


class _Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.resolved_kv_heads, d
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(self, x, cos_sin, mask, is_causal, cache, layer):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (b, H, t, d)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (b, G, t, d)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, *cos_sin), _rotate(k, *cos_sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (b, G, s, d)
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (b, t, h)


class Block(nn.Module):
    """One pre-norm decoder layer, ``x + attn(norm(x))`` then ``x + SwiGLU(norm(x))``: the unit FSDP shards."""

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
    """Llama-style decoder: ``num_layers`` pre-norm blocks and a final RMSNorm, ``(b, t, h) -> (b, t, h)``.

    Linear weights are ``N(0, init_std^2)``; the attention output and SwiGLU down projections
    ``N(0, (init_std / sqrt(2 * num_layers))^2)`` (GPT-2).

    Example:
        >>> model = Backbone(BackboneConfig(hidden_size=32, num_layers=2, num_heads=4))
        >>> x = torch.randn(2, 5, 32)
        >>> cache = model.new_cache(batch_size=2, max_len=8)
        >>> with torch.no_grad():
        ...     parts = torch.cat([model(x[:, :3], cache=cache), model(x[:, 3:], cache=cache)], 1)
        >>> torch.allclose(parts, model(x), atol=1e-5), cache.length
        (True, 5)
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("attn.o_proj", "ffn.w2"))
                nn.init.normal_(module.weight, std=out_std if is_out else cfg.init_std)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty :class:`KVCache` on the parameters' device and dtype (``max_len``: ``cfg.max_seq_len``)."""
        cfg, p = self.cfg, self.norm.weight
        shape = (batch_size, cfg.resolved_kv_heads, max_len or cfg.max_seq_len, cfg.head_dim)
        return KVCache(cfg.num_layers, *shape, device=p.device, dtype=p.dtype)

    def forward(
        self,
        x: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Hidden states ``(b, t, h)`` of inputs ``x (b, t, h)`` (see the module's masking rules).

        Args:
            position_ids: Integer positions ``(b|1, t)``; default ``cache.length + arange(t)``.
            attn_mask: Bool mask broadcastable to ``(b, H, t, s)``.
            cache: Optional :class:`KVCache`; it receives the new keys and advances by ``t``.

        Raises:
            ValueError: On a wrong shape, a cache of another batch size, or ``t > max_seq_len``.
        """
        cfg = self.cfg
        if x.dim() != 3 or x.shape[-1] != cfg.hidden_size or not 1 <= x.shape[1] <= cfg.max_seq_len:
            raise ValueError(
                f"Backbone: x must be (b, t, {cfg.hidden_size}) with 1 <= t <= max_seq_len="
                f"{cfg.max_seq_len}, got {tuple(x.shape)}"
            )
        b, t, _ = x.shape
        past = 0 if cache is None else cache.length
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"Backbone: the cache has {cache.batch_size} rows but x has {b}")
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=x.device)[None]  # (1, t)
        elif position_ids.is_floating_point() or tuple(position_ids.shape) not in ((1, t), (b, t)):
            raise ValueError(
                f"Backbone: position_ids must be integers of shape ({b} or 1, {t}), "
                f"got {position_ids.dtype} {tuple(position_ids.shape)}"
            )
        if attn_mask is not None and (
            attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[-1] != past + t
        ):
            raise ValueError(
                f"Backbone: attn_mask must be bool, broadcastable to (b, H, {t}, "
                f"{past + t}), got {attn_mask.dtype} {tuple(attn_mask.shape)}"
            )
        is_causal = attn_mask is None and past == 0 and t > 1
        if attn_mask is None and past > 0 and t > 1:
            attn_mask = causal_mask(t, past + t, device=x.device)[None, None]  # (1, 1, t, s)
        cos_sin = _rope(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos_sin, attn_mask, is_causal, cache, i)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)
