r"""Distillation of a multi-step head into a one-step head: the objective of the ``distill`` stage.

CALM's one-step energy head learns the joint distribution of the next ``K`` tokens from one
observed chunk per position; a flow-matching head learns it better but samples in many network
evaluations. Distillation trains a one-step head (the *student*, an ordinary :class:`CALM` with an
energy head, so it loads, samples and is scored like any CALM run) from a trained CALM whose head
can be sampled as often as needed (the *teacher*):

* ``loss="energy"``: the energy score of the student's ``N`` samples against ``M`` teacher
  samples per position (``DistillConfig.teacher_draws``). The energy score is strictly proper, so
  its minimiser is the teacher's conditional distribution; ``real_weight = w`` mixes the real
  targets (posterior draws of the observed chunk) into the target distribution,
  :math:`(1-w)\,\mathrm{ES}(Q, \text{teacher}) + w\,\mathrm{ES}(Q, \text{data})`.
* ``loss="coupled"``: the teacher's sampler is deterministic given its starting noise (the flow
  ODE, or DDIM with ``eta = 0``), a map :math:`T_h(x_0)` from :math:`x_0 \sim N(0, I)` to its
  samples. The student is fed the same noise (as it is with ``calm.head.noise="normal"``, or
  made uniform, :math:`u = \Phi(x_0) - 1/2`, for the paper's uniform noise) and regresses
  :math:`\lVert g_h(u) - T_h(x_0)\rVert^2` (mean over the latent axis): if it fits,
  its samples have exactly the teacher's distribution, with one network evaluation.
  ``energy_weight`` adds the energy loss above.

Axis key: ``b`` rows, ``C`` chunks, ``P = C - 1`` predicted chunks, ``h`` width, ``l`` latent
size, ``N`` student samples, ``M`` teacher draws.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from calm_models import flops
from calm_models._layers import check_tokens
from calm_models.config import DistillConfig
from calm_models.model import CALM

#: Modules of a CALM that map tokens to hidden states (copied from the teacher).
TRUNK = ("embedding", "compress", "backbone")


def uniform_from_normal(x0: torch.Tensor) -> torch.Tensor:
    r"""The probability integral transform :math:`u = \Phi(x_0) - 1/2`: ``N(0, 1)`` -> ``U[-1/2, 1/2]``, elementwise.

    Example:
        >>> uniform_from_normal(torch.tensor([0.0, 1.0, -30.0]))
        tensor([ 0.0000,  0.3413, -0.5000])
    """
    return 0.5 * torch.erf(x0 / math.sqrt(2.0))


class Distiller(nn.Module):
    """The ``distill`` objective: ``loss(tokens, mask)`` trains ``student`` on ``teacher``'s samples.

    The student and the teacher share the autoencoder (the student's must be the teacher's).
    At construction the trunk is copied from the teacher unless ``cfg.backbone == "scratch"``,
    and frozen with ``"frozen"``; the teacher is frozen and kept in eval mode. Only the student
    is saved by the training loop.

    Args:
        student: A CALM with a one-step head (``energy`` or ``energy_mlp``).
        teacher: A trained CALM on the same autoencoder.
        cfg: The loss and teacher settings.

    Raises:
        ValueError: A student head that is not one-step, another autoencoder, a trunk of another shape, or a
            ``coupled`` loss without a deterministic teacher or with ``noise_size`` != the latent size.

    Example:
        >>> from calm_models.autoencoder import Autoencoder
        >>> from calm_models.config import AutoencoderConfig, BackboneConfig, CALMConfig, HeadConfig
        >>> ae = Autoencoder(AutoencoderConfig(vocab_size=50, latent_size=8, hidden_size=16))
        >>> bb = BackboneConfig(hidden_size=32, num_layers=1, num_heads=2)
        >>> teacher = CALM(CALMConfig(backbone=bb, head=HeadConfig(type="flow", hidden_size=32, flow_steps=2)), ae)
        >>> student = CALM(CALMConfig(backbone=bb, head=HeadConfig(hidden_size=32, noise_size=8)), ae)
        >>> distiller = Distiller(student, teacher, DistillConfig(loss="coupled", energy_weight=0.5))
        >>> distiller.loss(torch.randint(0, 50, (2, 16)))["loss"].shape
        torch.Size([])
    """

    def __init__(self, student: CALM, teacher: CALM, cfg: DistillConfig) -> None:
        super().__init__()
        if student.head.cfg.type not in ("energy", "energy_mlp"):
            raise ValueError(f"the student's head must be a one-step head, got {student.head.cfg.type!r}")
        if student.autoencoder is not teacher.autoencoder:
            raise ValueError("the student must use the teacher's autoencoder (the same module)")
        if cfg.loss == "coupled":
            head = teacher.head.cfg
            if not (head.type == "flow" or (head.type == "diffusion" and head.diffusion_eta == 0)):
                raise ValueError(
                    "loss='coupled' needs a teacher whose sampler is deterministic given its noise (a flow head, or "
                    f"diffusion with diffusion_eta=0), got {teacher.head.cfg.type!r}"
                )
            if student.head.cfg.noise_size != teacher.autoencoder.latent_size:
                raise ValueError(
                    f"loss='coupled' needs calm.head.noise_size = the latent size {teacher.autoencoder.latent_size}, "
                    f"got {student.head.cfg.noise_size}"
                )
        self.cfg, self.student, self.teacher = cfg, student, teacher.requires_grad_(False).eval()
        if cfg.backbone != "scratch":
            for name in TRUNK:
                mine, theirs = getattr(student, name).state_dict(), getattr(teacher, name).state_dict()
                if {k: v.shape for k, v in mine.items()} != {k: v.shape for k, v in theirs.items()}:
                    raise ValueError(f"the student's {name} does not have the teacher's shape")
                getattr(student, name).load_state_dict(theirs)
                getattr(student, name).requires_grad_(cfg.backbone != "frozen")

    @property
    def shared_trunk(self) -> bool:
        """The student's hidden states are the teacher's (a frozen copy of its trunk)."""
        return self.cfg.backbone == "frozen"

    def train(self, mode: bool = True) -> Distiller:
        """Set the student's mode; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def loss(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The distillation loss averaged over the predicted chunks: ``{"loss", "energy"?, "coupled"?}`` scalars.

        ``tokens`` ``(b, L)`` holds ``C >= 2`` chunks; ``mask`` (bool ``(b, L)``) leaves every chunk
        holding padding out, as in :meth:`CALM.loss`.
        """
        student, teacher, cfg = self.student, self.teacher, self.cfg
        tokens = check_tokens(tokens, "tokens", vocab_size=student.vocab_size, multiple_of=student.chunk_size)
        if tokens.shape[1] < 2 * student.chunk_size:
            raise ValueError(f"tokens must hold at least 2 chunks, got length {tokens.shape[1]}")
        with torch.no_grad() if self.shared_trunk else nullcontext():
            hidden = student.hidden_states(tokens)[:, :-1]  # (b, P, h)
        with torch.no_grad():
            t_hidden = hidden.detach() if self.shared_trunk else teacher.hidden_states(tokens)[:, :-1]
        parts: dict[str, torch.Tensor] = {}
        energy_weight = 1.0 if cfg.loss == "energy" else cfg.energy_weight
        if energy_weight > 0:
            parts["energy"] = self._energy(tokens, hidden, t_hidden, generator)  # (b, P)
        if cfg.loss == "coupled":
            parts["coupled"] = self._coupled(hidden, t_hidden, generator)  # (b, P)
        per_chunk = parts.get("coupled", 0.0) + energy_weight * parts.get("energy", 0.0)
        if mask is None:
            weights = torch.ones_like(per_chunk)
        else:
            weights = mask.view(tokens.shape[0], -1, student.chunk_size).all(-1)[:, 1:].to(per_chunk.dtype)
        total = weights.sum().clamp_min(1)
        out = {"loss": (per_chunk * weights).sum() / total}
        return out | {k: ((v * weights).sum() / total).detach() for k, v in parts.items()}

    forward = loss

    def _energy(self, tokens, hidden, t_hidden, generator) -> torch.Tensor:
        """``(1 - w) ES(student, teacher draws) + w ES(student, real posterior draws)``, per position ``(b, P)``."""
        student, w = self.student, self.cfg.real_weight
        out = 0.0
        if w < 1:
            with torch.no_grad():  # (M, b, P, l)
                draws = self.teacher.head.sample(t_hidden, self.cfg.teacher_draws, generator, **self._steps())
            out = (1 - w) * student.head.loss(hidden, draws.float(), generator=generator)
        if w > 0:
            with torch.no_grad():  # (M', b, P, l)
                real = student.autoencoder.sample_posterior(tokens, student.config.num_targets, generator=generator)
            out = out + w * student.head.loss(hidden, real[:, :, 1:].float(), generator=generator)
        return out

    def _coupled(self, hidden, t_hidden, generator) -> torch.Tensor:
        """``mean_l (g_h(Phi(x0) - 1/2) - T_h(x0))^2`` over ``N`` noises per position, ``(b, P)``."""
        n, latent = self.student.head.cfg.num_samples, self.teacher.autoencoder.latent_size
        x0 = torch.randn((n, *hidden.shape[:-1], latent), generator=generator, device=hidden.device)  # (N, b, P, l)
        with torch.no_grad():
            target = self.teacher.head.sample(t_hidden, n, generator, noise=x0.to(t_hidden.dtype), **self._steps())
        u = x0 if self.student.head.cfg.noise == "normal" else uniform_from_normal(x0)  # the student's own noise law
        pred = self.student.head.sample(hidden, n, generator, noise=u.to(hidden.dtype))
        return (pred.float() - target.float()).pow(2).mean(-1).mean(0)

    def _steps(self) -> dict:
        return {"num_steps": self.cfg.teacher_steps} if self.teacher.head.cfg.type in ("flow", "diffusion") else {}

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Analytic ``train`` FLOPs per token of one distillation step (teacher included) and the student's
        ``inference`` FLOPs (:func:`calm_models.flops.calm_flops`).

        Training: the student's trunk (3x if trained, else a forward), the teacher's trunk unless shared,
        the teacher's samples (``M`` draws, or ``N`` coupled solves, at its sampler's steps), the student's
        head (3x its loss or its ``N`` coupled samples) and the encoder when real targets are used; per
        position over ``K``.
        """
        student, teacher, cfg = self.student, self.teacher, self.cfg
        k = student.chunk_size
        ae = flops.autoencoder_flops(student.autoencoder)

        def trunk(model: CALM) -> float:
            return flops.linear_flops(model.compress) + flops.backbone_flops(model.config.backbone, seq_len // k)

        total = trunk(student) * (1.0 if cfg.backbone == "frozen" else 3.0)
        total += 0.0 if self.shared_trunk else trunk(teacher)
        steps = self._steps().get("num_steps")
        sample_teacher = lambda n: flops.head_flops(teacher.head, n, num_steps=steps)  # noqa: E731
        student_loss = 3.0 * flops.head_flops(student.head, loss=True)
        energy_weight = 1.0 if cfg.loss == "energy" else cfg.energy_weight
        if energy_weight > 0 and cfg.real_weight < 1:
            total += sample_teacher(cfg.teacher_draws) + student_loss
        if energy_weight > 0 and cfg.real_weight > 0:
            total += student_loss + ae["encode"] * k
        if cfg.loss == "coupled":
            n = student.head.cfg.num_samples
            total += sample_teacher(n) + 3.0 * flops.head_flops(student.head, n)
        return {"train": total / k, "inference": student.flops_per_token(seq_len)["inference"]}
