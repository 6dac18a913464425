"""Generative heads for next-vector prediction: energy, flow-matching and diffusion heads.

A head turns a backbone hidden state into a distribution over the next latent vector, with the
interface of MAR's diffusion-loss module: ``loss(hidden, targets)`` is the per-position training
loss and ``sample(hidden, num_samples)`` draws vectors. All but :class:`MLPEnergyHead` share one
network: residual MLP blocks whose layer norms are modulated (shift, scale, gate) by the
conditioning vector, zero-initialised (MAR's head, DiT's adaLN-Zero).

Axis key: ``...`` leading axes of ``hidden``; ``n`` samples per position; ``M`` target draws;
``k`` target draws used by the regression losses; ``h`` hidden size; ``w`` head width;
``l`` latent size; ``z`` noise size.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from calm_models._layers import check_int
from calm_models.config import HeadConfig
from likelihood_free.energy import energy_loss, mixture_energy_loss

_TIME_FEATURES = 256  # size of the sinusoidal time features (DiT, MAR)


def _init_linears(module: nn.Module, init_weight) -> None:
    """``init_weight`` on the weight and zeros on the bias of every ``nn.Linear`` in ``module``, in order."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            init_weight(m.weight)
            nn.init.zeros_(m.bias)


class _AdaLNBlock(nn.Module):
    """``x + gate * MLP(LN(x) * (1 + scale) + shift)`` with ``(shift, scale, gate) = Linear(y)``."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(y).chunk(3, dim=-1)  # (1|n, ..., w) each
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class _AdaLNMLP(nn.Module):
    """Input projection, adaLN blocks, modulated zero-initialised output: ``x (n, ..., in)`` -> ``(n, ..., out)``.

    The activated conditioning ``y (1|n, ..., w)`` with a size-1 sample axis is broadcast over the samples.
    """

    def __init__(self, in_size: int, width: int, out_size: int, num_blocks: int, eps: float) -> None:
        super().__init__()
        self.input_proj = nn.Linear(in_size, width)
        self.blocks = nn.ModuleList(_AdaLNBlock(width, eps) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.final_modulation = nn.Linear(width, 2 * width)
        self.output = nn.Linear(width, out_size)
        _init_linears(self, nn.init.xavier_uniform_)
        for m in [*(b.modulation for b in self.blocks), self.final_modulation, self.output]:
            nn.init.zeros_(m.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)  # (n, ..., w)
        for block in self.blocks:
            x = block(x, y)
        shift, scale = self.final_modulation(y).chunk(2, dim=-1)
        return self.output(self.final_norm(x) * (1 + scale) + shift)


def _check_inputs(head: nn.Module, hidden: object, targets: object = None) -> None:
    name = type(head).__name__
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.shape[-1:] != (head.cond_size,):
        got = f"{hidden.dtype} {tuple(hidden.shape)}" if isinstance(hidden, torch.Tensor) else hidden
        raise ValueError(f"{name}: hidden must be a float tensor (..., {head.cond_size}), got {got}")
    if targets is None:
        return
    expected = (*hidden.shape[:-1], head.latent_size)
    ok = isinstance(targets, torch.Tensor) and targets.is_floating_point() and targets.device == hidden.device
    if not ok or targets.dim() != hidden.dim() + 1 or targets.shape[0] < 1 or tuple(targets.shape[1:]) != expected:
        got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(
            f"{name}: targets must be a float tensor (M, {', '.join(map(str, expected))}) on {hidden.device}, got {got}"
        )


def _start_noise(head: nn.Module, hidden, num_samples, size: int, noise, generator) -> torch.Tensor:
    """The checked ``noise`` ``(n, ..., size)`` given to ``sample``, else the head's own draw."""
    _check_inputs(head, hidden)
    shape = (check_int(num_samples, "num_samples", 1), *hidden.shape[:-1], size)
    if noise is None:
        return head._noise(shape, hidden, generator)
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or tuple(noise.shape) != shape:
        got = f"{noise.dtype} {tuple(noise.shape)}" if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"{type(head).__name__}: noise must be a float tensor {shape}, got {got}")
    if noise.device != hidden.device:
        raise ValueError(f"{type(head).__name__}: noise is on {noise.device} but hidden on {hidden.device}")
    return noise


class EnergyHead(nn.Module):
    r"""CALM's energy head: one forward pass from (hidden state, uniform noise) to a latent vector.

    A sample is ``x = g(eps; c)``, ``eps ~ U[-1/2, 1/2]^z`` (or ``N(0, I)`` with ``cfg.noise="normal"``),
    through the adaLN blocks modulated by ``c = Linear(hidden)``; the output layer is zero-initialised
    (every sample is 0 at init). Training minimises the negated unbiased energy score
    (:func:`~likelihood_free.energy_loss`) of ``N = cfg.num_samples`` samples against the ``M`` targets,
    :math:`\frac{2}{NM}\sum_{i,k}\lVert x_i-y_k\rVert^\beta - \frac{1}{N(N-1)}\sum_{i\neq j}\lVert x_i-x_j\rVert^\beta`.

    With ``J = cfg.num_components > 1`` the head is a mixture of ``J`` generators: component ``j``
    adds a learned offset ``e_j`` to the noise, and its weight ``pi_j = softmax(Linear(hidden))_j``.
    A sample first draws ``j ~ pi``; the loss draws ``N / J`` samples of every component and scores
    the mixture exactly (:func:`~likelihood_free.mixture_energy_loss`), so the weights get exact
    gradients. A continuous map of connected noise cannot put its mass on separated modes without
    mass in between; discrete components can, which is what a distribution over token chunks needs.

    Example:
        >>> head = EnergyHead(HeadConfig(hidden_size=32, num_blocks=2), cond_size=16, latent_size=4)
        >>> hidden = torch.randn(2, 3, 16)
        >>> head.sample(hidden, num_samples=5).shape
        torch.Size([5, 2, 3, 4])
        >>> head.loss(hidden, torch.randn(2, 2, 3, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, cfg: HeadConfig, cond_size: int, latent_size: int) -> None:
        super().__init__()
        self.cfg, self.cond_size, self.latent_size = cfg, cond_size, latent_size
        self.cond_proj = nn.Linear(cond_size, cfg.hidden_size)
        self.net = _AdaLNMLP(cfg.noise_size, cfg.hidden_size, latent_size, cfg.num_blocks, cfg.norm_eps)
        _init_linears(self.cond_proj, nn.init.xavier_uniform_)
        if cfg.num_components > 1:  # offsets start apart (unit normal), weights start uniform
            self.components = nn.Embedding(cfg.num_components, cfg.noise_size)
            self.mixture = nn.Linear(cond_size, cfg.num_components)
            _init_linears(self.mixture, nn.init.zeros_)

    def sample(
        self,
        hidden: torch.Tensor,
        num_samples: int,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``num_samples`` draws per position, ``(..., h)`` -> ``(n, ..., l)`` (differentiable).

        ``noise`` ``(n, ..., z)`` replaces the draws of ``cfg.noise`` (the distill stage pairs it
        with a teacher's noise); a mixture still draws its components.
        """
        eps = _start_noise(self, hidden, num_samples, self.cfg.noise_size, noise, generator).to(hidden.dtype)
        if self.cfg.num_components > 1:  # component of each draw: j ~ pi, (B, n) -> (n, ...)
            weights = self.mixture(hidden).float().softmax(-1).reshape(-1, self.cfg.num_components)
            j = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
            eps = eps + self.components(j.T.reshape(eps.shape[:-1])).to(eps.dtype)
        return self._generate(eps, hidden).to(hidden.dtype)  # (n, ..., l)

    def _noise(self, shape: tuple[int, ...], hidden: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The generator's input noise: ``U[-1/2, 1/2]`` (``cfg.noise="uniform"``, the paper's) or ``N(0, 1)``."""
        if self.cfg.noise == "normal":
            return torch.randn(shape, generator=generator, device=hidden.device, dtype=hidden.dtype)
        return torch.rand(shape, generator=generator, device=hidden.device, dtype=hidden.dtype) - 0.5

    def _generate(self, eps: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(eps, F.silu(self.cond_proj(hidden)).unsqueeze(0))  # condition (1, ..., w): shared

    def loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-position energy loss ``(...)`` (fp32) against targets ``(M, ..., l)``."""
        _check_inputs(self, hidden, targets)
        j = self.cfg.num_components
        if j == 1:
            samples = self.sample(hidden, self.cfg.num_samples, generator=generator)  # (N, ..., l)
            return energy_loss(samples, targets, beta=self.cfg.beta, reduction="none")
        shape = (j, self.cfg.num_samples // j, *hidden.shape[:-1], self.cfg.noise_size)
        eps = self._noise(shape, hidden, generator)
        eps = eps + self.components.weight.view(j, 1, *[1] * (hidden.dim() - 1), -1).to(eps.dtype)
        samples = self._generate(eps.flatten(0, 1), hidden).unflatten(0, shape[:2])  # (J, N / J, ..., l)
        weights = self.mixture(hidden).float().softmax(-1)  # (..., J)
        return mixture_energy_loss(samples, weights, targets, beta=self.cfg.beta, reduction="none")

    forward = loss


class _MLPBlock(nn.Module):
    """The reference's block: ``x + down(silu(g) * u)``, ``[g, u] = MLP([LN(x), c])``."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=eps)
        self.linears = nn.Sequential(
            nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2 * width)
        )
        self.down_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gate, up = self.linears(torch.cat([self.in_ln(x), c], dim=-1)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class MLPEnergyHead(EnergyHead):
    r"""The energy head of the authors' released models (``HeadConfig.type = "energy_mlp"``).

    A sample is the reference's "MLP generator": ``x = LN(Linear(eps))`` for noise
    ``eps ~ U[-1/2, 1/2]^z``, the condition ``c = LN(Linear(hidden))``, ``num_blocks`` blocks
    ``x + down(silu(g) * u)`` with ``[g, u] = L3(silu(L2(silu(L1([LN(x), c])))))`` and a final
    ``L(silu(L(LN(x))))`` whose last layer starts at zero (affine norms, biases everywhere).
    Parameter names follow the reference (``noise_embd``, ``mlp_blocks.{i}.linears``...), so its
    weights load unchanged.

    Example:
        >>> cfg = HeadConfig(type="energy_mlp", hidden_size=16, num_blocks=2, noise_size=8)
        >>> MLPEnergyHead(cfg, cond_size=16, latent_size=4).sample(torch.randn(3, 16), 5).shape
        torch.Size([5, 3, 4])
    """

    def __init__(self, cfg: HeadConfig, cond_size: int, latent_size: int) -> None:
        nn.Module.__init__(self)
        self.cfg, self.cond_size, self.latent_size = cfg, cond_size, latent_size
        w, eps = cfg.hidden_size, cfg.norm_eps
        self.noise_embd, self.norm_noise = nn.Linear(cfg.noise_size, w), nn.LayerNorm(w, eps=eps)
        self.hidden_embd, self.norm_hidden = nn.Linear(cond_size, w), nn.LayerNorm(w, eps=eps)
        self.mlp_blocks = nn.ModuleList(_MLPBlock(w, eps) for _ in range(cfg.num_blocks))
        final = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, latent_size))
        self.final_layer = nn.Sequential(OrderedDict(in_ln=nn.LayerNorm(w, eps=eps), linears=final))
        _init_linears(self, lambda weight: nn.init.normal_(weight, std=0.02))
        nn.init.zeros_(self.final_layer.linears[-1].weight)

    def _generate(self, eps: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm_noise(self.noise_embd(eps))  # (n, ..., w)
        c = self.norm_hidden(self.hidden_embd(hidden)).expand_as(x)  # (n, ..., w), shared
        for block in self.mlp_blocks:
            x = block(x, c)
        return self.final_layer(x)


class NoiseToDataHead(nn.Module):
    """Shared scaffolding of the flow and diffusion heads (not used directly).

    A network ``f(x, t; hidden)`` with conditioning ``silu(Linear(hidden) + TimeEmbedding(t))``
    (sinusoidal features of ``1000 t`` and a two-layer MLP, as DiT). Training: for each of the
    first ``k = min(M, max_target_draws)`` target draws ``x1``, draw noise ``x0 ~ N(0, I)`` and a
    time, corrupt ``x1`` (:meth:`_corrupt`) and regress ``f`` on the subclass's target (mean
    squared error over the latent axis and the draws). Sampling starts from ``N(0, I)`` and
    applies :meth:`_step` along :meth:`_schedule`. Arithmetic of the state is in fp32 at least.
    """

    def __init__(self, cfg: HeadConfig, cond_size: int, latent_size: int) -> None:
        super().__init__()
        self.cfg, self.cond_size, self.latent_size = cfg, cond_size, latent_size
        w = cfg.hidden_size
        self.cond_proj = nn.Linear(cond_size, w)
        self.time_embed = nn.Sequential(nn.Linear(_TIME_FEATURES, w), nn.SiLU(), nn.Linear(w, w))
        self.net = _AdaLNMLP(latent_size, w, latent_size, cfg.num_blocks, cfg.norm_eps)
        _init_linears(self.cond_proj, nn.init.xavier_uniform_)
        _init_linears(self.time_embed, lambda weight: nn.init.normal_(weight, std=0.02))

    def _net_out(self, x: torch.Tensor, time: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``f(x (n, ..., l), time (broadcastable), cond (1, ..., w))`` in the state's dtype."""
        half = _TIME_FEATURES // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=cond.device) / half)
        args = (1000.0 * time.float()).unsqueeze(-1) * freqs  # (..., f/2)
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(cond.dtype)
        y = F.silu(cond + self.time_embed(features))
        return self.net(x.to(cond.dtype), y).to(x.dtype)

    def _noise(self, shape: tuple[int, ...], hidden: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=hidden.device, dtype=hidden.dtype)

    def loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-position regression loss ``(...)`` on the first ``max_target_draws`` targets."""
        _check_inputs(self, hidden, targets)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        x1 = targets[: self.cfg.max_target_draws].to(acc)  # (k, ..., l)
        x0 = self._noise(x1.shape, hidden, generator).to(acc)
        x_t, time, target = self._corrupt(x1, x0, generator)
        pred = self._net_out(x_t, time, self.cond_proj(hidden).unsqueeze(0))
        return (pred - target).pow(2).mean(dim=-1).mean(dim=0)

    forward = loss

    @torch.no_grad()
    def sample(
        self,
        hidden: torch.Tensor,
        num_samples: int,
        generator: torch.Generator | None = None,
        *,
        num_steps: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``num_samples`` draws per position, ``(..., h)`` -> ``(n, ..., l)`` (no gradient).

        ``num_steps`` overrides the configured number of sampler steps; ``noise`` ``(n, ..., l)``
        replaces the standard normal start (with a deterministic sampler, flow or DDIM with
        ``eta = 0``, the sample is then a function of it).
        """
        x = _start_noise(self, hidden, num_samples, self.latent_size, noise, generator)
        x = x.to(torch.promote_types(hidden.dtype, torch.float32))
        cond = self.cond_proj(hidden).unsqueeze(0)  # (1, ..., w), reused at every step
        times = self._schedule(self._steps(num_steps))

        def net(state: torch.Tensor, time: float) -> torch.Tensor:
            return self._net_out(state, torch.full((), time, device=state.device), cond)

        for t, s in zip(times[:-1], times[1:], strict=True):
            x = self._step(x, t, s, net, generator)
        return x.to(hidden.dtype)

    def num_evaluations(self, num_steps: int | None = None) -> int:
        """Network evaluations of one :meth:`sample` call."""
        return self._steps(num_steps)


class FlowHead(NoiseToDataHead):
    r"""Conditional flow matching on the linear path (rectified flow).

    Training: ``x_t = (1 - t) x0 + t x1`` with ``t`` uniform or logit-normal; the network
    regresses the velocity ``x1 - x0``. Sampling integrates ``dx/dt = v(x, t)`` from ``t = 0``
    to 1 in ``cfg.flow_steps`` uniform Euler or midpoint steps.

    Example:
        >>> head = FlowHead(HeadConfig(type="flow", hidden_size=32, flow_steps=4), 16, 4)
        >>> head.sample(torch.randn(7, 16), num_samples=3).shape, head.num_evaluations()
        (torch.Size([3, 7, 4]), 8)
    """

    def _corrupt(self, x1, x0, generator):
        uniform = self.cfg.flow_time_dist == "uniform"
        draw = torch.rand if uniform else torch.randn
        u = draw(x1.shape[:-1], generator=generator, device=x1.device, dtype=x1.dtype)
        t = u if uniform else torch.sigmoid(u)  # (k, ...)
        return (1 - t[..., None]) * x0 + t[..., None] * x1, t, x1 - x0

    def _steps(self, num_steps: int | None) -> int:
        return self.cfg.flow_steps if num_steps is None else check_int(num_steps, "num_steps", 1)

    def num_evaluations(self, num_steps: int | None = None) -> int:
        return super().num_evaluations(num_steps) * (2 if self.cfg.flow_solver == "midpoint" else 1)

    def _schedule(self, steps: int) -> list[float]:
        return [i / steps for i in range(steps + 1)]

    def _step(self, x, t, s, velocity, generator):
        if self.cfg.flow_solver == "euler":
            return x + (s - t) * velocity(x, t)
        mid = x + 0.5 * (s - t) * velocity(x, t)
        return x + (s - t) * velocity(mid, 0.5 * (t + s))


class DiffusionHead(NoiseToDataHead):
    r"""Epsilon-prediction DDPM with the cosine schedule (Nichol & Dhariwal, 2021), DDIM sampling.

    Training: ``t ~ U{0..T-1}``, :math:`x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1-\bar\alpha_t}\epsilon`,
    regress :math:`\epsilon`. Sampling: ``S = cfg.diffusion_steps`` timesteps ``t_i = i T / S``
    ("leading" spacing), from ``N(0, I)``; each step to the next timestep ``s`` is

    .. math::
        \hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon}{\sqrt{\bar\alpha_t}},\quad
        x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma^2}\,\hat\epsilon
        + \sigma z,\quad
        \sigma = \eta\sqrt{\tfrac{1-\bar\alpha_s}{1-\bar\alpha_t}(1-\tfrac{\bar\alpha_t}{\bar\alpha_s})}.

    Example:
        >>> head = DiffusionHead(HeadConfig(type="diffusion", hidden_size=32, diffusion_steps=10), 16, 4)
        >>> head.sample(torch.randn(2, 5, 16), num_samples=3).shape
        torch.Size([3, 2, 5, 4])
    """

    def __init__(self, cfg: HeadConfig, cond_size: int, latent_size: int) -> None:
        super().__init__(cfg, cond_size, latent_size)
        steps = torch.arange(cfg.diffusion_train_steps + 1, dtype=torch.float64)
        f = torch.cos((steps / cfg.diffusion_train_steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # (T,) float64
        self._alphas_cumprod = alphas_cumprod.tolist()  # Python floats: no device sync in sampling
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def _corrupt(self, x1, x0, generator):
        num_train = self.cfg.diffusion_train_steps
        t = torch.randint(num_train, x1.shape[:-1], generator=generator, device=x1.device)
        ab = self.alphas_cumprod[t].to(x1.dtype).unsqueeze(-1)  # (k, ..., 1)
        return ab.sqrt() * x1 + (1 - ab).sqrt() * x0, t.to(x1.dtype) / num_train, x0

    def _steps(self, num_steps: int | None) -> int:
        steps = self.cfg.diffusion_steps if num_steps is None else check_int(num_steps, "num_steps", 1)
        limit = self.cfg.diffusion_train_steps
        if steps > limit:
            raise ValueError(f"num_steps must be <= diffusion_train_steps = {limit}, got {steps}")
        return steps

    def _schedule(self, steps: int) -> list[float]:
        num_train = self.cfg.diffusion_train_steps
        return [i * num_train // steps / num_train for i in reversed(range(steps))] + [-1.0]

    def _step(self, x, t, s, epsilon, generator):
        num_train = self.cfg.diffusion_train_steps
        ab_t = self._alphas_cumprod[round(t * num_train)]
        ab_s = 1.0 if s < 0 else self._alphas_cumprod[round(s * num_train)]
        eps_hat = epsilon(x, t)
        x0_hat = (x - math.sqrt(1 - ab_t) * eps_hat) / math.sqrt(ab_t)
        sigma = self.cfg.diffusion_eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        x = math.sqrt(ab_s) * x0_hat + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps_hat
        if sigma > 0:
            z = torch.randn(x.shape, generator=generator, device=x.device)
            x = x + sigma * z.to(x.dtype)
        return x


_HEADS = {"energy": EnergyHead, "energy_mlp": MLPEnergyHead, "flow": FlowHead, "diffusion": DiffusionHead}


def build_head(cfg: HeadConfig, cond_size: int, latent_size: int) -> nn.Module:
    """The head selected by ``cfg.type``, conditioned on ``cond_size`` and predicting ``latent_size``.

    Example:
        >>> type(build_head(HeadConfig(type="diffusion", hidden_size=32), 16, 8)).__name__
        'DiffusionHead'
    """
    return _HEADS[cfg.type](cfg, cond_size, latent_size)
