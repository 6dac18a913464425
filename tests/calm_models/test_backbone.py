"""Tests of calm_models.backbone: shapes, causality, KV cache, padding, GQA, RoPE, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from calm_models.backbone import Backbone, BackboneConfig, KVCache, apply_rotary, causal_mask
from calm_models.flops import backbone_flops


def _model(seed: int = 0, **overrides) -> Backbone:
    kw = dict(hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64, init_std=0.1)
    kw.update(overrides)
    torch.manual_seed(seed)
    return Backbone(BackboneConfig(**kw)).double()


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- config
def test_config_defaults_and_resolution():
    cfg = BackboneConfig()
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.max_seq_len) == (256, 4, 4, 2048)
    assert cfg.resolved_kv_heads == 4 and cfg.head_dim == 64
    assert cfg.resolved_ffn_size == 704  # ceil(8/3 * 256 / 64) * 64
    assert BackboneConfig(hidden_size=384, num_heads=6).resolved_ffn_size == 1024
    assert BackboneConfig(ffn_size=100).resolved_ffn_size == 100


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(hidden_size=100, num_heads=3), "hidden_size"),
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(num_layers=0), "num_layers"),
        (dict(ffn_size=0), "ffn_size"),
        (dict(hidden_size=12, num_heads=4), "even"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(init_std=0.0), "init_std"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BackboneConfig(**kwargs)


# ----------------------------------------------------------------------------- forward
def test_shapes_and_dtype():
    model = _model()
    out = model(_x(3, 7, 32))
    assert out.shape == (3, 7, 32) and out.dtype == torch.float64
    assert torch.isfinite(out).all()
    model32 = Backbone(BackboneConfig(hidden_size=32, num_layers=1, num_heads=2))
    assert model32(torch.randn(2, 5, 32)).dtype == torch.float32


def test_final_norm_is_applied():
    model = _model()
    out = model(_x(2, 6, 32) * 10)
    rms = out.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-5, rtol=0)


def test_causal_future_does_not_change_past():
    model = _model()
    x = _x(2, 9, 32)
    y = x.clone()
    y[:, 5] += 1.0
    out_x, out_y = model(x), model(y)
    torch.testing.assert_close(out_x[:, :5], out_y[:, :5], atol=1e-12, rtol=0)
    assert (out_x[:, 5:] - out_y[:, 5:]).abs().amax(dim=(0, 2)).min() > 1e-4


def test_explicit_causal_mask_equals_default():
    model = _model()
    x = _x(2, 6, 32)
    torch.testing.assert_close(model(x, attn_mask=causal_mask(6, 6)[None, None]), model(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_cached_incremental_equals_full(kv_heads):
    model = _model(num_kv_heads=kv_heads)
    x = _x(3, 10, 32)
    full = model(x)
    cache = model.new_cache(3, 12)
    assert cache.k[0].dtype == torch.float64 and cache.length == 0
    parts, start = [], 0
    with torch.no_grad():
        for size in (3, 1, 2, 4):
            parts.append(model(x[:, start : start + size], cache=cache))
            start += size
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def _padded_mask(valid: torch.Tensor) -> torch.Tensor:
    t = valid.shape[1]
    eye = torch.eye(t, dtype=torch.bool)
    return (causal_mask(t, t) & (valid[:, None, :] | eye))[:, None]


def test_left_padded_batch_equals_rows_alone():
    model = _model(num_kv_heads=2)
    lengths = [4, 8, 6]
    width = max(lengths)
    rows = [_x(1, n, 32, seed=10 + i) for i, n in enumerate(lengths)]
    x = torch.cat([F.pad(r, (0, 0, width - r.shape[1], 0), value=7.0) for r in rows])  # (3, 8, h)
    valid = torch.arange(width)[None, :] >= torch.tensor([width - n for n in lengths])[:, None]
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    out = model(x, position_ids=pos, attn_mask=_padded_mask(valid))
    for i, row in enumerate(rows):
        alone = model(row)[0]
        torch.testing.assert_close(out[i, width - lengths[i] :], alone, atol=1e-5, rtol=0)
    # continue each row with the cache: one new vector per row attends only real keys
    cache = model.new_cache(3, width + 1)
    with torch.no_grad():
        model(x, position_ids=pos, attn_mask=_padded_mask(valid), cache=cache)
        new = _x(3, 1, 32, seed=99)
        key_valid = torch.cat([valid, torch.ones(3, 1, dtype=torch.bool)], 1)
        step = model(new, position_ids=pos[:, -1:] + 1, attn_mask=key_valid[:, None, None], cache=cache)
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, new[i : i + 1]], 1))[0, -1]
        torch.testing.assert_close(step[i, 0], alone, atol=1e-5, rtol=0)


def _naive_forward(model: Backbone, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: explicit rotation, kv-head repetition, softmax attention."""
    cfg = model.cfg
    b, t, _ = x.shape
    nh, nkv, d = cfg.num_heads, cfg.resolved_kv_heads, cfg.head_dim
    half = d // 2
    freq = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * freq  # (t, d/2)

    def rot(z):  # rotate pair (i, i + d/2) by ang[:, i]
        out = torch.empty_like(z)
        for i in range(half):
            c, s = ang[:, i].cos(), ang[:, i].sin()
            out[..., i] = z[..., i] * c - z[..., i + half] * s
            out[..., i + half] = z[..., i] * s + z[..., i + half] * c
        return out

    def rms(z, w):
        return z / z.pow(2).mean(-1, keepdim=True).add(cfg.norm_eps).sqrt() * w

    future = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    for blk in model.layers:
        a = blk.attn
        hdn = rms(x, blk.attn_norm.weight)
        q = rot((hdn @ a.q_proj.weight.T).view(b, t, nh, d).transpose(1, 2))
        k = rot((hdn @ a.k_proj.weight.T).view(b, t, nkv, d).transpose(1, 2))
        v = (hdn @ a.v_proj.weight.T).view(b, t, nkv, d).transpose(1, 2)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        att = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, float("-inf"))
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, nh * d)
        x = x + o @ a.o_proj.weight.T
        hdn = rms(x, blk.ffn_norm.weight)
        f = blk.ffn
        x = x + (F.silu(hdn @ f.w1.weight.T) * (hdn @ f.w3.weight.T)) @ f.w2.weight.T
    return rms(x, model.norm.weight)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gqa_matches_explicit_repeat_reference(kv_heads):
    model = _model(num_kv_heads=kv_heads)
    x = _x(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _naive_forward(model, x), atol=1e-5, rtol=0)
    if kv_heads < 4:
        assert model.layers[0].attn.k_proj.weight.shape == (kv_heads * 8, 32)


# ----------------------------------------------------------------------------- RoPE
@given(shift=st.integers(0, 5000), m=st.integers(0, 50), n=st.integers(0, 50))
def test_rope_scores_depend_only_on_relative_position(shift, m, n):
    g = torch.Generator().manual_seed(m * 100 + n)
    q = torch.randn(1, 2, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 1, 16, generator=g, dtype=torch.float64)

    def score(pq, pk):
        rq = apply_rotary(q, torch.tensor([[pq]]))
        rk = apply_rotary(k, torch.tensor([[pk]]))
        return (rq * rk).sum(-1)

    torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=1e-9, rtol=0)
    # rotations preserve the norm
    torch.testing.assert_close(apply_rotary(q, torch.tensor([[m + shift]])).norm(), q.norm(), atol=1e-12, rtol=0)


def test_backbone_invariant_to_shifting_positions_but_not_to_reordering():
    model = _model()
    x = _x(2, 6, 32)
    base = model(x, position_ids=torch.arange(6)[None].expand(2, 6))
    shifted = model(x, position_ids=torch.arange(6)[None].expand(2, 6) + 37)
    torch.testing.assert_close(base, shifted, atol=1e-5, rtol=0)
    stretched = model(x, position_ids=2 * torch.arange(6)[None].expand(2, 6))
    assert (base[:, 1:] - stretched[:, 1:]).abs().max() > 1e-3  # positions do matter


# ----------------------------------------------------------------------------- cache
def test_kvcache_select_rows():
    model = _model()
    x, nxt = _x(3, 5, 32), _x(3, 2, 32, seed=5)
    full = model(torch.cat([x, nxt], 1))
    cache = model.new_cache(3, 8)
    with torch.no_grad():
        model(x, cache=cache)
        rows = torch.tensor([2, 0, 2])
        assert cache.select(rows) is cache and cache.batch_size == 3 and cache.length == 5
        out = model(nxt[rows], cache=cache)
    torch.testing.assert_close(out, full[rows, 5:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rows"):
        cache.select(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="rows"):
        cache.select(torch.tensor([], dtype=torch.long))


def test_kvcache_crop_then_overwrite():
    model = _model()
    x = _x(2, 6, 32)
    cache = model.new_cache(2, 6)
    with torch.no_grad():
        model(x, cache=cache)
        cache.crop(3)
        assert cache.length == 3
        other = _x(2, 3, 32, seed=8)
        out = model(other, cache=cache)
    ref = model(torch.cat([x[:, :3], other], 1))[:, 3:]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="length"):
        cache.crop(7)
    assert cache.crop(0).length == 0


def test_kvcache_errors():
    with pytest.raises(ValueError, match="positive"):
        KVCache(1, 1, 1, 0, 4)
    model = _model()
    cache = model.new_cache(2, 4)
    with pytest.raises(ValueError, match="rows"):
        model(_x(3, 2, 32), cache=cache)
    with torch.no_grad():
        model(_x(2, 3, 32), cache=cache)
        with pytest.raises(ValueError, match="max_len"):
            model(_x(2, 2, 32), cache=cache)
    assert cache.length == 3  # a failed call does not advance the cache
    with pytest.raises(ValueError, match="t, 8"):
        cache.update(0, torch.zeros(2, 4, 1, 4), torch.zeros(2, 4, 1, 4))


# ----------------------------------------------------------------------------- input errors
def test_forward_input_errors():
    model = _model()
    with pytest.raises(ValueError, match="x must be"):
        model(_x(2, 3, 31))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_x(1, 65, 32))
    with pytest.raises(ValueError, match="bool"):
        model(_x(1, 3, 32), attn_mask=torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="attn_mask"):
        model(_x(1, 3, 32), attn_mask=torch.ones(1, 1, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="position_ids"):
        model(_x(1, 3, 32), position_ids=torch.arange(4)[None])
    with pytest.raises(ValueError, match="position_ids"):
        model(_x(1, 3, 32), position_ids=torch.zeros(1, 3))


# ----------------------------------------------------------------------------- init & FLOPs
def test_initialisation_scales():
    torch.manual_seed(0)
    model = Backbone(BackboneConfig(hidden_size=256, num_layers=8, num_heads=4, init_std=0.02))
    attn, ffn = model.layers[3].attn, model.layers[3].ffn
    out_std = 0.02 / math.sqrt(16)
    for w, std in [
        (attn.q_proj.weight, 0.02),
        (ffn.w1.weight, 0.02),
        (attn.o_proj.weight, out_std),
        (ffn.w2.weight, out_std),
    ]:
        # the sample std of >= 65536 normals is within 2% of the truth with overwhelming odds
        assert abs(w.std().item() / std - 1) < 0.02
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_flops_formula_hand_count():
    cfg = BackboneConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=128)
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v, o, SwiGLU
    expected = 2 * 2 * per_layer + 2 * 2 * 2 * 32 * 64  # matmuls + attention at T = 32
    assert backbone_flops(cfg, 32) == expected == 163840
    # the matmul count equals the model's actual linear weights
    model = Backbone(cfg)
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert backbone_flops(cfg, 1) == 2 * n_linear + 4 * 2 * 64
