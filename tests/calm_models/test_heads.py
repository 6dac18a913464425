"""Tests of calm_models.heads: shapes, initialisation, randomness, FLOPs, and training on
synthetic conditional distributions with known conditional mean and variance.

Axis key: ``n`` samples, ``m`` target draws, ``b`` positions, ``h`` condition size,
``l`` latent size.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from calm_models.config import HEAD_TYPES
from calm_models.flops import head_flops
from calm_models.heads import DiffusionHead, EnergyHead, FlowHead, HeadConfig, MLPEnergyHead, build_head

COND, LATENT = 8, 2  # synthetic task: condition c ~ N(0, I_8), target y in R^2
TINY = dict(hidden_size=16, num_blocks=2, noise_size=8, flow_steps=3, diffusion_steps=5)


def _tiny(head_type: str, **overrides) -> HeadConfig:
    return HeadConfig(type=head_type, **{**TINY, **overrides})


def _perturb(head: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every zero-initialised weight small random values so the head is not at its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return head


# ------------------------------------------------------------------------------------------
# Config and construction
# ------------------------------------------------------------------------------------------


def test_default_config_is_valid_and_builds_every_type():
    HeadConfig()
    classes = {"energy": EnergyHead, "energy_mlp": MLPEnergyHead, "flow": FlowHead, "diffusion": DiffusionHead}
    assert set(HEAD_TYPES) == set(classes)
    for head_type, cls in classes.items():
        assert type(build_head(_tiny(head_type), COND, LATENT)) is cls


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"type": "gan"}, r"type must be one of \('energy', 'energy_mlp', 'flow', 'diffusion'\)"),
        ({"flow_solver": "rk4"}, r"flow_solver must be one of \('euler', 'midpoint'\)"),
        ({"flow_time_dist": "beta"}, "flow_time_dist must be one of"),
        ({"num_samples": 1}, "num_samples must be an int >= 2"),
        ({"hidden_size": 0}, "hidden_size must be an int >= 1"),
        ({"hidden_size": 32.0}, "hidden_size must be an int"),
        ({"num_blocks": True}, "num_blocks must be an int"),
        ({"flow_steps": 0}, "flow_steps must be an int >= 1"),
        ({"diffusion_steps": 20, "diffusion_train_steps": 10}, "diffusion_steps must be <="),
        ({"beta": 2.0}, r"beta must be in \(0, 2\)"),
        ({"beta": 0.0}, "beta must be in"),
        ({"beta": "1"}, "beta must be in"),
        ({"diffusion_eta": 1.5}, r"diffusion_eta must be in \[0, 1\]"),
        ({"max_target_draws": 0}, "max_target_draws must be an int >= 1"),
        ({"norm_eps": 0.0}, "norm_eps must be in"),
    ],
)
def test_invalid_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        HeadConfig(**overrides)


# ------------------------------------------------------------------------------------------
# Shapes, dtypes, input checks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("batch", [(), (3,), (2, 5)])
def test_shapes(head_type, batch):
    head = _perturb(build_head(_tiny(head_type), COND, LATENT))
    hidden = torch.randn(*batch, COND)
    assert head.sample(hidden, 4).shape == (4, *batch, LATENT)
    assert head.sample(hidden, 1).shape == (1, *batch, LATENT)
    for m in (1, 6):
        loss = head.loss(hidden, torch.randn(m, *batch, LATENT))
        assert loss.shape == batch and loss.dtype == torch.float32
        assert torch.isfinite(loss).all()
    assert torch.equal(
        head(hidden, torch.ones(2, *batch, LATENT), generator=torch.Generator().manual_seed(0)),
        head.loss(hidden, torch.ones(2, *batch, LATENT), generator=torch.Generator().manual_seed(0)),
    )


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_dtypes_follow_the_input(head_type):
    head = _perturb(build_head(_tiny(head_type), COND, LATENT))
    head64 = head.double()
    hidden = torch.randn(3, COND, dtype=torch.float64)
    assert head64.sample(hidden, 2).dtype == torch.float64
    assert head64.loss(hidden, torch.randn(2, 3, LATENT, dtype=torch.float64)).dtype == torch.float64
    head16 = head.to(torch.bfloat16)
    hidden16 = hidden.to(torch.bfloat16)
    samples = head16.sample(hidden16, 2)
    assert samples.dtype == torch.bfloat16 and torch.isfinite(samples).all()
    loss = head16.loss(hidden16, torch.randn(2, 3, LATENT, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_bad_inputs_raise(head_type):
    head = build_head(_tiny(head_type), COND, LATENT)
    hidden = torch.randn(4, COND)
    with pytest.raises(ValueError, match=r"hidden must be a float tensor \(\.\.\., 8\)"):
        head.sample(torch.randn(4, COND + 1), 2)
    with pytest.raises(ValueError, match="hidden must be a float tensor"):
        head.sample(torch.ones(4, COND, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        head.sample(hidden, 0)
    with pytest.raises(ValueError, match=r"targets must be a float tensor \(M, 4, 2\)"):
        head.loss(hidden, torch.randn(4, LATENT))  # missing the draw axis
    with pytest.raises(ValueError, match="targets must be"):
        head.loss(hidden, torch.randn(1, 4, LATENT + 1))
    with pytest.raises(ValueError, match="targets must be"):
        head.loss(hidden, torch.randn(0, 4, LATENT))
    with pytest.raises(ValueError, match="on cpu"):
        head.loss(hidden, torch.empty(1, 4, LATENT, device="meta"))


@pytest.mark.parametrize("head_type", ["flow", "diffusion"])
def test_num_steps_override(head_type):
    head = _perturb(build_head(_tiny(head_type), COND, LATENT))
    other = build_head(_tiny(head_type, flow_steps=5, diffusion_steps=5), COND, LATENT)
    other.load_state_dict(head.state_dict())
    hidden = torch.randn(3, COND)
    s1 = head.sample(hidden, 2, torch.Generator().manual_seed(0), num_steps=5)
    s2 = other.sample(hidden, 2, torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2)
    assert head_flops(head, 2, num_steps=5) == head_flops(other, 2)
    assert head.num_evaluations(5) == other.num_evaluations()
    with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
        head.sample(hidden, 2, num_steps=0)
    with pytest.raises(ValueError, match="num_steps must be an int"):
        head.sample(hidden, 2, num_steps=2.0)
    if head_type == "diffusion":
        with pytest.raises(ValueError, match="num_steps must be <= diffusion_train_steps = 1000"):
            head.sample(hidden, 2, num_steps=1001)


# ------------------------------------------------------------------------------------------
# Initialisation and randomness
# ------------------------------------------------------------------------------------------


def test_energy_head_output_is_zero_at_init():
    head = build_head(_tiny("energy"), COND, LATENT)
    samples = head.sample(torch.randn(2, 3, COND), 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples, torch.zeros(5, 2, 3, LATENT))


def test_flow_head_at_init_returns_its_initial_noise():
    # Zero velocity at init: both solvers must leave x(0) ~ N(0, I) unchanged.
    for solver in ("euler", "midpoint"):
        head = build_head(_tiny("flow", flow_solver=solver), COND, LATENT)
        samples = head.sample(torch.randn(3, COND), 4, generator=torch.Generator().manual_seed(7))
        noise = torch.randn(4, 3, LATENT, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(samples, noise)


def test_diffusion_head_at_init_ddim_chain_telescopes():
    # eps_hat = 0 at init; with eta = 0 each DDIM step multiplies x by sqrt(ab_s / ab_t), so the
    # result is the initial noise divided by sqrt(ab) at the first sampled timestep.
    cfg = _tiny("diffusion", diffusion_eta=0.0, diffusion_steps=4, diffusion_train_steps=100)
    head = build_head(cfg, COND, LATENT)
    samples = head.sample(torch.randn(3, COND), 2, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 3, LATENT, generator=torch.Generator().manual_seed(1))
    t_first = 75  # leading spacing: timesteps 75, 50, 25, 0
    s = (torch.arange(101, dtype=torch.float64) / 100 + 0.008) / 1.008 * math.pi / 2
    f = torch.cos(s) ** 2
    ab_first = (f[t_first + 1] / f[0]).item()  # no beta clipping this far from T
    torch.testing.assert_close(samples, noise / math.sqrt(ab_first), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_generator_reproducibility(head_type):
    head = _perturb(build_head(_tiny(head_type), COND, LATENT))
    hidden, targets = torch.randn(2, 3, COND), torch.randn(3, 2, 3, LATENT)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return head.sample(hidden, 6, generator=g), head.loss(hidden, targets, generator=g)

    (s1, l1), (s2, l2), (s3, l3) = draw(0), draw(0), draw(1)
    assert torch.equal(s1, s2) and torch.equal(l1, l2)
    assert not torch.allclose(s1, s3) and not torch.allclose(l1, l3)
    assert not torch.allclose(s1[0], s1[1])  # the samples of one position differ


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_leading_axes_are_independent_positions(head_type):
    # Same generator seed -> same noise in memory order, so (2, 3, h) and (6, h) must agree.
    head = _perturb(build_head(_tiny(head_type), COND, LATENT))
    hidden, targets = torch.randn(2, 3, COND), torch.randn(2, 2, 3, LATENT)
    s_nested = head.sample(hidden, 4, generator=torch.Generator().manual_seed(3))
    s_flat = head.sample(hidden.reshape(6, COND), 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(s_nested.reshape(4, 6, LATENT), s_flat)
    l_nested = head.loss(hidden, targets, generator=torch.Generator().manual_seed(4))
    l_flat = head.loss(
        hidden.reshape(6, COND), targets.reshape(2, 6, LATENT), generator=torch.Generator().manual_seed(4)
    )
    torch.testing.assert_close(l_nested.reshape(6), l_flat)


def test_flow_and_diffusion_loss_use_at_most_max_target_draws():
    for head_type in ("flow", "diffusion"):
        head = _perturb(build_head(_tiny(head_type, max_target_draws=2), COND, LATENT))
        hidden, targets = torch.randn(5, COND), torch.randn(4, 5, LATENT)
        spoiled = targets.clone()
        spoiled[2:] = 1e6  # draws beyond max_target_draws must be ignored
        l1 = head.loss(hidden, targets, generator=torch.Generator().manual_seed(0))
        l2 = head.loss(hidden, spoiled, generator=torch.Generator().manual_seed(0))
        assert torch.equal(l1, l2)


# ------------------------------------------------------------------------------------------
# Samplers and losses with the exact (oracle) network for Gaussian targets
# ------------------------------------------------------------------------------------------
# For x1 ~ N(mu, s^2) per coordinate the minimisers of the flow and diffusion losses are known in
# closed form. Plugging them in place of the network isolates the ODE solver / DDIM chain (and the
# time conventions shared by loss and sampler) from training.

_MU = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-0.3, 0.7]])  # (b, l) target means
_STD = torch.tensor([[0.1, 0.1], [0.3, 0.3], [1.0, 1.0]])  # (b, l) target stds


def _flow_oracle(x, t, cond):
    """E[x1 - x0 | x_t] for x_t = (1 - t) x0 + t x1, x0 ~ N(0, 1), x1 ~ N(mu, s^2)."""
    t = t.unsqueeze(-1) if t.ndim else t
    var = (1 - t) ** 2 + t**2 * _STD**2
    return _MU + (t * _STD**2 - (1 - t)) / var * (x - t * _MU)


def _diffusion_oracle(head):
    def eps(x, time, cond):
        """E[eps | x_t] for x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, x0 ~ N(mu, s^2)."""
        ab = head.alphas_cumprod[(time * head.cfg.diffusion_train_steps).round().long()]
        ab = ab.unsqueeze(-1) if ab.ndim else ab
        return (1 - ab).sqrt() / (ab * _STD**2 + 1 - ab) * (x - ab.sqrt() * _MU)

    return eps


def _oracle_sample(head, n=4096, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    x = head.sample(torch.zeros(3, COND), n, generator=g, **kwargs)  # (n, b, l)
    return x, (x.mean(0) - _MU) / (_STD / math.sqrt(n)), x.std(0) / _STD  # samples, z-scores, ratio


def test_flow_sampler_with_exact_velocity():
    # 4096 samples: std-ratio standard error 1/sqrt(2n) = 0.011; tolerances are ~4.5 SE.
    head = build_head(HeadConfig(type="flow", **{k: TINY[k] for k in ("hidden_size", "num_blocks")}), COND, LATENT)
    head._net_out = _flow_oracle
    _, z, ratio = _oracle_sample(head)  # default: 8 midpoint steps
    assert z.abs().max() < 4.5, z
    assert (ratio - 1).abs().max() < 0.05, ratio  # discretisation bias < 3% (at s = 0.1)
    # The midpoint rule is second order: with the same 8 steps Euler is clearly worse at s = 0.1,
    # where the flow is stiffest near t = 1 (Euler contracts too much there).
    euler = build_head(HeadConfig(type="flow", flow_solver="euler", hidden_size=16), COND, LATENT)
    euler._net_out = _flow_oracle
    _, _, ratio_euler = _oracle_sample(euler)
    assert ratio_euler[0].mean() < 0.8 < 0.95 < ratio[0].mean(), (ratio_euler, ratio)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_diffusion_sampler_with_exact_epsilon(eta):
    cfg = HeadConfig(type="diffusion", hidden_size=16, num_blocks=1, diffusion_eta=eta)
    head = build_head(cfg, COND, LATENT)
    head._net_out = _diffusion_oracle(head)
    results = {steps: _oracle_sample(head, seed=steps, num_steps=steps) for steps in (50, 1000)}
    _, z, ratio = results[1000]  # all 1000 training timesteps: small discretisation bias
    assert z.abs().max() < 4.5, z
    assert (ratio - 1).abs().max() < 0.05, ratio
    # 50 strided steps under-disperse narrow targets (documented); more steps must reduce it.
    ratio50 = results[50][2]
    assert ratio50[0].mean() < ratio[0].mean() - 0.05, (ratio50, ratio)


def _gauss_expect(fn, points=4001):
    """E[fn(U)] for U ~ N(0, 1) by the trapezoid rule on [-8, 8]; fn maps (p,) to (p, ...)."""
    u = torch.linspace(-8, 8, points, dtype=torch.float64)
    density = torch.exp(-(u**2) / 2) / math.sqrt(2 * math.pi)
    values = fn(u)
    return torch.trapezoid(values * density.reshape(-1, *[1] * (values.ndim - 1)), u, dim=0)


@pytest.mark.parametrize("time_dist", ["uniform", "logit_normal"])
def test_flow_loss_with_exact_velocity_is_unbiased(time_dist):
    # With the oracle the expected loss is E_t[Var(x1 - x0 | x_t)] (mean over coordinates).
    head = build_head(HeadConfig(type="flow", hidden_size=16, flow_time_dist=time_dist), COND, LATENT)
    head._net_out = _flow_oracle
    b, m = 20000, 4
    loss = head.loss(
        torch.zeros(b, 3, COND),
        _MU + _STD * torch.randn(m, b, 3, LATENT, generator=torch.Generator().manual_seed(0)),
        generator=torch.Generator().manual_seed(1),
    )
    s2 = _STD[:, 0].double() ** 2  # (3,)

    def cond_var(t):  # (points,) -> (points, 3)
        t = t.unsqueeze(-1)
        return 1 + s2 - (t * s2 - (1 - t)) ** 2 / ((1 - t) ** 2 + t**2 * s2)

    if time_dist == "uniform":
        t = torch.linspace(0, 1, 4001, dtype=torch.float64)
        exact = torch.trapezoid(cond_var(t), t, dim=0)
    else:
        exact = _gauss_expect(lambda u: cond_var(torch.sigmoid(u)))
    mean, se = loss.mean(0), loss.std(0) / math.sqrt(b)
    assert ((mean - exact) / se).abs().max() < 4.5, (mean, exact, se)


def test_diffusion_loss_with_exact_epsilon_is_unbiased():
    # With the oracle the expected loss is mean_t Var(eps | x_t) = mean_t ab s^2 / (ab s^2 + 1 - ab)
    # (mean over the T training timesteps).
    head = build_head(HeadConfig(type="diffusion", hidden_size=16), COND, LATENT)
    head._net_out = _diffusion_oracle(head)
    b, m = 20000, 4
    targets = _MU + _STD * torch.randn(m, b, 3, LATENT, generator=torch.Generator().manual_seed(0))
    loss = head.loss(torch.zeros(b, 3, COND), targets, generator=torch.Generator().manual_seed(1))
    ab = head.alphas_cumprod.double().unsqueeze(-1)  # (T, 1)
    s2 = _STD[:, 0].double() ** 2
    exact = (ab * s2 / (ab * s2 + 1 - ab)).mean(0)  # (3,)
    mean, se = loss.mean(0), loss.std(0) / math.sqrt(b)
    assert ((mean - exact) / se).abs().max() < 4.5, (mean, exact, se)


# ------------------------------------------------------------------------------------------
# FLOPs accounting
# ------------------------------------------------------------------------------------------


def test_flops_and_parameters_by_hand():
    head = build_head(HeadConfig(hidden_size=8, num_blocks=1, noise_size=4), cond_size=8, latent_size=2)
    shared = 2 * (8 * 8 + 8 * 24 + 8 * 16)  # cond projection + block and final modulations
    per_sample = 2 * (4 * 8 + 2 * 8 * 8 + 8 * 2)  # noise projection + block MLP + output layer
    assert head_flops(head, 1) == shared + per_sample
    assert head_flops(head, 8) / 8 == (shared + 8 * per_sample) / 8
    assert sum(p.numel() for p in head.parameters()) == 634
    flow = build_head(HeadConfig(type="flow", flow_steps=5, flow_solver="midpoint"), 16, 4)
    euler = build_head(HeadConfig(type="flow", flow_steps=5, flow_solver="euler"), 16, 4)
    cond = 2 * 16 * 256
    assert head_flops(flow, 3) - cond == 2 * (head_flops(euler, 3) - cond)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_flops_match_torch_flop_counter(head_type):
    head = _perturb(build_head(_tiny(head_type), COND, LATENT))
    b, n = 10, 3
    hidden = torch.randn(b, COND)
    with FlopCounterMode(display=False) as counter:
        head.sample(hidden, n)
    time_embed = 0.0  # flow/diffusion: the time embedding runs once per evaluation per batch
    if head_type not in ("energy", "energy_mlp"):
        time_embed = head.num_evaluations() * 2 * (256 * 16 + 16 * 16)
    assert counter.get_total_flops() == b * head_flops(head, n) + time_embed


# ------------------------------------------------------------------------------------------
# Training behaviour
# ------------------------------------------------------------------------------------------


def _synthetic_task(seed: int = 0):
    """y = A c + s(c) * xi, c ~ N(0, I_8), xi ~ N(0, I_2), s(c) = 0.3 + 0.2 tanh(c_0)."""
    a = torch.randn(LATENT, COND, generator=torch.Generator().manual_seed(seed)) / math.sqrt(COND)

    def draw(b: int, m: int, g: torch.Generator):
        c = torch.randn(b, COND, generator=g)
        mean = c @ a.T  # (b, l)
        std = (0.3 + 0.2 * torch.tanh(c[:, :1])).expand(b, LATENT)  # (b, l)
        return c, mean + std * torch.randn(m, b, LATENT, generator=g), mean, std

    return draw


def _train(head, draw, steps, *, lr=3e-3, batch=256, m=1, seed=0):
    """Adam with linear decay to 0; returns the per-step training losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    losses = []
    for _ in range(steps):
        c, y = draw(batch, m, g)[:2]
        loss = head.loss(c, y, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _held_out_loss(head, draw, seed=123, b=4096):
    g = torch.Generator().manual_seed(seed)
    c, y = draw(b, 1, g)[:2]
    with torch.no_grad():
        loss = head.loss(c, y, generator=g)
    return loss.mean().item(), loss.std().item() / math.sqrt(b)


# Per-head training settings for the conditional task (width 64, 2 blocks, 3-15 s CPU each);
# the reference's MLP head learns more slowly than ours and gets 600 steps.
_TRAIN = {"energy": dict(m=1), "energy_mlp": dict(m=8, steps=600), "flow": dict(m=4), "diffusion": dict(m=4)}


@functools.cache
def _trained(head_type: str):
    """A head trained on the synthetic task (cached: shared by several tests)."""
    torch.manual_seed(0)
    cfg = HeadConfig(type=head_type, hidden_size=64, num_blocks=2, noise_size=16)
    head = build_head(cfg, COND, LATENT)
    draw = _synthetic_task()
    before = _held_out_loss(head, draw)[0]
    settings = {"steps": 300, **_TRAIN[head_type]}
    _train(head, draw, settings.pop("steps"), **settings)
    return head, draw, before


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_trained_head_loss_decreases(head_type):
    head, draw, before = _trained(head_type)
    after, _ = _held_out_loss(head, draw)
    assert after < 0.6 * before, (before, after)


def _moment_errors(head, draw, conditions=32, samples=256, seed=99):
    g = torch.Generator().manual_seed(seed)
    c, _, mean, std = draw(conditions, 1, g)  # held-out conditions, s(c) in [0.1, 0.5]
    x = head.sample(c, samples, generator=g)  # (n, b, l)
    mean_err = ((x.mean(0) - mean) / std).pow(2).mean().sqrt()  # RMS, in units of the true std
    ratio = x.std(0) / std  # per condition and coordinate
    return mean_err.item(), ratio.mean().item(), (ratio - 1).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_trained_head_matches_conditional_mean_and_std(head_type):
    # Monte Carlo parts alone (256 samples): mean error ~1/sqrt(256) = 0.06 std, std ratio ~0.045.
    head, draw, _ = _trained(head_type)
    mean_err, ratio_mean, ratio_rms_dev = _moment_errors(head, draw)
    assert mean_err < 0.25, mean_err
    assert 0.85 < ratio_mean < 1.15, ratio_mean
    assert ratio_rms_dev < 0.25, ratio_rms_dev


def test_trained_energy_head_reaches_the_exact_optimum():
    # The expected energy loss is minimised at the true conditional law, where it equals
    # E||Y - Y'|| = sqrt(pi) * E[s(c)] = 0.3 sqrt(pi) for isotropic 2-D Gaussians; the
    # held-out estimate is unbiased, so it cannot lie much below this value.
    head, draw, _ = _trained("energy")
    loss, se = _held_out_loss(head, draw, seed=7, b=8192)
    optimum = 0.3 * math.sqrt(math.pi)
    assert optimum - 5 * se < loss < optimum + 0.03, (loss, se, optimum)


def test_energy_head_leaves_the_collapsed_init():
    head = build_head(_tiny("energy", hidden_size=32), COND, LATENT)
    g = torch.Generator().manual_seed(0)
    c, y = torch.randn(64, COND, generator=g), torch.randn(1, 64, LATENT, generator=g)
    loss = head.loss(c, y, generator=g).mean()
    loss.backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert head.net.output.weight.grad.abs().sum() > 0  # reaches the zero-initialised layer
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(5):
        opt.step()
        opt.zero_grad()
        head.loss(c, y, generator=g).mean().backward()
    samples = head.sample(c, 8, generator=g)
    assert samples.std(0).mean() > 1e-3  # samples of one position no longer coincide


def test_energy_head_learns_a_deterministic_map():
    # CALM issue 5 "done when": the energy loss decreases when the next vector is a
    # deterministic function of the condition (the optimum is 0 and samples collapse onto it).
    a = torch.randn(4, COND, generator=torch.Generator().manual_seed(5)) / math.sqrt(COND)

    def draw(b, m, g):
        c = torch.randn(b, COND, generator=g)
        return c, torch.tanh(c @ a.T).expand(m, b, 4)

    torch.manual_seed(0)
    head = build_head(HeadConfig(hidden_size=32, num_blocks=2, noise_size=16), COND, 4)
    before, _ = _held_out_loss(head, draw)
    _train(head, draw, 300, lr=1e-2, batch=128)
    after, _ = _held_out_loss(head, draw)
    assert after < 0.05 * before, (before, after)  # measured: 2.53 -> 0.035
    g = torch.Generator().manual_seed(1)
    c, y = draw(64, 1, g)
    samples = head.sample(c, 16, generator=g)
    assert (samples.mean(0) - y[0]).norm(dim=-1).mean() < 0.08  # measured 0.026
    assert samples.std(0).mean() < 0.05  # measured 0.019


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        dict(type="energy"),
        dict(type="flow", flow_time_dist="uniform"),
        dict(type="flow"),
        dict(type="diffusion", diffusion_eta=0.0),
        # Ancestral sampling with 50 steps is biased (see DiffusionHead); use 250.
        dict(type="diffusion", diffusion_eta=1.0, diffusion_steps=250),
    ],
)
def test_longer_training_tighter_tolerances(overrides):
    # 1500 steps at width 128, then 48 x 512 samples (1 to 3 min of CPU each): tighter
    # tolerances than the fast tests (MC errors: mean 0.044 std, std ratio 0.031 per value).
    torch.manual_seed(1)
    cfg = HeadConfig(hidden_size=128, num_blocks=3, noise_size=16, **overrides)
    head = build_head(cfg, COND, LATENT)
    draw = _synthetic_task(seed=1)
    _train(head, draw, 1500, m=1 if overrides["type"] == "energy" else 4, seed=1)
    mean_err, ratio_mean, ratio_rms_dev = _moment_errors(head, draw, conditions=48, samples=512)
    assert mean_err < 0.15, mean_err
    assert 0.92 < ratio_mean < 1.08, ratio_mean
    assert ratio_rms_dev < 0.15, ratio_rms_dev


# ------------------------------------------------------------------------------------------
# Mixture energy head
# ------------------------------------------------------------------------------------------


def test_mixture_head_config_is_checked():
    with pytest.raises(ValueError, match=r"num_samples \(8\) must be a multiple of num_components \(3\)"):
        HeadConfig(num_components=3)
    with pytest.raises(ValueError, match=r"num_samples \(8\) must be a multiple of num_components \(8\), >= 2 each"):
        HeadConfig(num_components=8)
    with pytest.raises(ValueError, match="num_components=2 needs type 'energy'"):
        HeadConfig(type="flow", num_components=2)


def test_mixture_head_samples_loss_and_gradients():
    head = _perturb(build_head(_tiny("energy", num_components=4, num_samples=8), COND, LATENT))
    hidden, targets = torch.randn(5, 3, COND), torch.randn(6, 5, 3, LATENT)
    a = head.sample(hidden, 7, generator=torch.Generator().manual_seed(1))
    assert a.shape == (7, 5, 3, LATENT)
    assert torch.equal(a, head.sample(hidden, 7, generator=torch.Generator().manual_seed(1)))
    loss = head.loss(hidden, targets, generator=torch.Generator().manual_seed(2))
    assert loss.shape == (5, 3) and bool(torch.isfinite(loss).all())
    loss.mean().backward()
    assert head.mixture.weight.grad.abs().sum() > 0 and head.components.weight.grad.abs().sum() > 0
    plain = build_head(_tiny("energy"), COND, LATENT)
    assert not hasattr(plain, "mixture")  # J = 1 keeps the parameter names of earlier checkpoints


def test_mixture_head_flops_match_torch_flop_counter():
    head = _perturb(build_head(_tiny("energy", num_components=4), COND, LATENT))
    with FlopCounterMode(display=False) as counter:
        head.sample(torch.randn(10, COND), 3)
    assert counter.get_total_flops() == 10 * head_flops(head, 3)


def test_mixture_head_learns_separated_modes_and_their_weights():
    """Two conditions, each a two-mode law in R^8 with unequal weights: the mixture head puts its
    samples on the modes with the right weights (a plain head, J = 1, misses the weights by more
    than 0.05 at this budget)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    means = 3 * torch.randn(2, 2, 8, generator=g)  # (condition, mode, d)
    weights = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    conds = torch.randn(2, COND, generator=g)
    head = build_head(HeadConfig(hidden_size=64, num_blocks=2, noise_size=16, num_components=4), COND, 8)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(300):
        s = torch.randint(2, (128,), generator=g)
        k = torch.multinomial(weights[s], 1, generator=g).squeeze(1)
        y = means[s, k] + 0.2 * torch.randn(4, 128, 8, generator=g)
        loss = head.loss(conds[s], y, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = head.sample(conds, 2000, generator=g)  # (n, 2, 8)
    dist = (x[:, :, None] - means[None]).norm(dim=-1)  # (n, condition, mode)
    on_mode = dist.min(-1).values < 3 * 0.2 * math.sqrt(8)
    share = (dist.argmin(-1) == 0).float().mean(0)  # (condition,)
    assert on_mode.float().mean() > 0.95, on_mode.float().mean()
    torch.testing.assert_close(share, weights[:, 0], atol=0.05, rtol=0)
