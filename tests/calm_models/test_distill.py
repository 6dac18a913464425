"""The distill stage: a one-step head trained on a teacher's samples (objective, resume, bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scipy import stats

from calm_models.autoencoder import Autoencoder
from calm_models.config import AutoencoderConfig, BackboneConfig, CALMConfig, DistillConfig, HeadConfig
from calm_models.distill import TRUNK, Distiller, uniform_from_normal
from calm_models.model import CALM
from calm_models.train import main
from tests.calm_models._runs import tiny_args

BB = BackboneConfig(hidden_size=32, num_layers=1, num_heads=2, max_seq_len=16)


def _models(student_head: HeadConfig | None = None, teacher_type: str = "flow", **teacher_head) -> tuple[CALM, CALM]:
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(vocab_size=50, latent_size=8, hidden_size=16))
    head = HeadConfig(type=teacher_type, hidden_size=32, flow_steps=2, diffusion_steps=4, **teacher_head)
    teacher = CALM(CALMConfig(backbone=BB, head=head, num_targets=4), ae)
    for p in teacher.head.parameters():  # a teacher whose head is not the identity map at init
        torch.nn.init.normal_(p, std=0.1)
    student = CALM(CALMConfig(backbone=BB, head=student_head or HeadConfig(hidden_size=32), num_targets=4), ae)
    return student, teacher


def test_uniform_from_normal_is_uniform():
    u = uniform_from_normal(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    assert u.min() >= -0.5 and u.max() <= 0.5
    assert stats.kstest(u.numpy() + 0.5, "uniform").pvalue > 1e-3


def test_frozen_trunk_is_the_teachers_and_only_the_head_learns():
    student, teacher = _models()
    distiller = Distiller(student, teacher, DistillConfig(loss="energy"))
    for name in TRUNK:
        for (k, a), b in zip(
            getattr(student, name).state_dict().items(), getattr(teacher, name).state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), f"{name}.{k}"
    distiller.loss(torch.randint(0, 50, (2, 16)))["loss"].backward()
    assert all(p.grad is None for name in TRUNK for p in getattr(student, name).parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.head.parameters())


def test_scratch_trunk_is_not_copied_and_learns():
    student, teacher = _models()
    distiller = Distiller(student, teacher, DistillConfig(loss="energy", backbone="scratch", real_weight=0.5))
    assert not torch.equal(student.embedding.weight, teacher.embedding.weight)
    distiller.loss(torch.randint(0, 50, (2, 16)))["loss"].backward()
    assert student.embedding.weight.grad is not None and teacher.embedding.weight.grad is None


def test_real_weight_one_is_the_calm_loss():
    """With only the real targets the distiller's loss is CALM's own energy loss (same draws, same value)."""
    student, teacher = _models()
    distiller = Distiller(student, teacher, DistillConfig(loss="energy", real_weight=1.0))
    tokens, mask = torch.randint(0, 50, (3, 16)), torch.ones(3, 16, dtype=torch.bool)
    mask[0, :6] = False
    ours = distiller.loss(tokens, mask, generator=torch.Generator().manual_seed(3))["loss"]
    calm = student.loss(tokens, mask, generator=torch.Generator().manual_seed(3))["loss"]
    torch.testing.assert_close(ours, calm)


def test_energy_loss_against_teacher_draws_is_the_energy_score():
    """``real_weight=0``: the student's energy loss against the teacher's draws of the same generator stream."""
    from likelihood_free.energy import energy_loss

    student, teacher = _models()
    cfg = DistillConfig(loss="energy", teacher_draws=5)
    distiller = Distiller(student, teacher, cfg)
    tokens = torch.randint(0, 50, (2, 16))
    ours = distiller.loss(tokens, generator=torch.Generator().manual_seed(1))["loss"]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        hidden = student.hidden_states(tokens)[:, :-1]
        draws = teacher.head.sample(hidden, 5, gen)
        samples = student.head.sample(hidden, student.head.cfg.num_samples, gen)
    expected = energy_loss(samples, draws, beta=student.head.cfg.beta, reduction="none").mean()
    torch.testing.assert_close(ours, expected)


def test_coupled_student_that_copies_the_teacher_has_zero_loss():
    """A student whose head *is* the teacher's map of the same noise scores 0: the pairing of noises is right."""
    student, teacher = _models(HeadConfig(hidden_size=32, noise_size=8))

    class Copy(torch.nn.Module):  # g(u) = T(Phi^-1(u + 1/2)), the teacher's flow map
        cfg = student.head.cfg

        def sample(self, hidden, n, generator=None, *, noise):
            x0 = torch.special.ndtri(noise.double() + 0.5).float()
            return teacher.head.sample(hidden, n, noise=x0)

    student.head = Copy()
    distiller = Distiller(student, teacher, DistillConfig(loss="coupled"))
    out = distiller.loss(torch.randint(0, 50, (2, 16)), generator=torch.Generator().manual_seed(0))
    assert float(out["coupled"]) < 1e-8
    # and a student that ignores the pairing does not
    student2, teacher2 = _models(HeadConfig(hidden_size=32, noise_size=8))
    loss = Distiller(student2, teacher2, DistillConfig(loss="coupled")).loss(torch.randint(0, 50, (2, 16)))
    assert float(loss["coupled"]) > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher_type": "diffusion"}, "deterministic"),  # DDPM with eta = 1 is not a map of its noise
        ({"student_head": HeadConfig(hidden_size=32)}, "noise_size"),  # 64 != latent 8
    ],
)
def test_coupled_needs_a_deterministic_teacher_and_latent_sized_noise(kwargs, match):
    student_head = kwargs.get("student_head", HeadConfig(hidden_size=32, noise_size=8))
    student, teacher = _models(student_head, kwargs.get("teacher_type", "flow"))
    with pytest.raises(ValueError, match=match):
        Distiller(student, teacher, DistillConfig(loss="coupled"))


def test_ddim_teacher_with_eta_zero_is_accepted_for_coupled():
    student, teacher = _models(HeadConfig(hidden_size=32, noise_size=8), "diffusion", diffusion_eta=0.0)
    Distiller(student, teacher, DistillConfig(loss="coupled", teacher_steps=2)).loss(torch.randint(0, 50, (1, 8)))


def test_flops_count_the_teacher():
    student, teacher = _models()
    few = Distiller(student, teacher, DistillConfig(loss="energy", teacher_draws=4)).flops_per_token(16)
    many = Distiller(student, teacher, DistillConfig(loss="energy", teacher_draws=8)).flops_per_token(16)
    assert (
        many["train"] > few["train"]
        and many["inference"] == few["inference"] == student.flops_per_token(16)["inference"]
    )


# -- the stage, end to end -------------------------------------------------------------------------


def _teacher_run(tmp_path: Path) -> Path:
    assert main(tiny_args(tmp_path, "ae", "autoencoder", **{"run.steps": 3})) == 0
    calm = {"run.steps": 3, "autoencoder_path": tmp_path / "ae", "calm.head.type": "flow", "calm.head.flow_steps": 2}
    assert main(tiny_args(tmp_path, "teacher", "calm", **calm)) == 0
    return tmp_path / "teacher"


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def test_distill_stage_resumes_exactly_and_loads_as_calm(tmp_path, capsys):
    teacher = _teacher_run(tmp_path)
    common = {"teacher_path": teacher, "calm.head.noise_size": 8}  # the coupled loss: noise of the latent size
    assert main(tiny_args(tmp_path, "straight", "distill", **common, **{"run.steps": 8})) == 0
    assert main(tiny_args(tmp_path, "split", "distill", **common, **{"run.steps": 4})) == 0
    assert main([*tiny_args(tmp_path, "split", "distill", **common, **{"run.steps": 8}), "--resume"]) == 0
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    t = _weights(teacher)
    assert all(torch.equal(a[k], t[k]) for k in a if k.split(".")[0] in (*TRUNK, "autoencoder"))
    from calm_models.runs import load_run

    run = load_run(tmp_path / "straight")
    assert type(run.model).__name__ == "CALM" and run.model.head.cfg.type == "energy"
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["split"] == "valid" and "brier_lm" in rows[-1]
    # resuming with another teacher is refused, naming the field
    other = {"run.steps": 2, "run.seed": 1, "autoencoder_path": tmp_path / "ae", "calm.head.type": "flow"}
    assert main(tiny_args(tmp_path, "teacher2", "calm", **other)) == 0
    again = tiny_args(tmp_path, "split", "distill", **{**common, "teacher_path": tmp_path / "teacher2"})
    assert main([*again, "--resume"]) == 2
    assert "teacher_path" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({}, ["teacher_path", "needs"]),  # no teacher
        ({"teacher_path": "{tmp}/nowhere"}, ["teacher_path", "nowhere"]),  # a missing run
        ({"teacher_path": "{tmp}/ae"}, ["teacher_path", "autoencoder"]),  # not a CALM
        ({"teacher_path": "{tmp}/teacher", "autoencoder_path": "{tmp}/ae2"}, ["another autoencoder"]),
        ({"teacher_path": "{tmp}/teacher", "calm.head.type": "flow"}, ["calm.head.type"]),
        ({"teacher_path": "{tmp}/teacher"}, ["noise_size"]),  # the preset's 128 against this latent size 8
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, words):
    _teacher_run(tmp_path)
    assert main(tiny_args(tmp_path, "ae2", "autoencoder", **{"run.steps": 1, "run.seed": 1})) == 0
    capsys.readouterr()
    extra = {k: str(v).format(tmp=tmp_path) for k, v in extra.items()}
    assert main(tiny_args(tmp_path, "student", "distill", **{"run.steps": 2, **extra})) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert all(w in err for w in words), err


def test_coupled_pairs_a_normal_noise_student_with_the_teachers_own_noise():
    """``calm.head.noise="normal"``: the student gets the teacher's ``x0`` itself (no probability transform)."""
    student, teacher = _models(HeadConfig(hidden_size=32, noise_size=8, noise="normal"))

    class Copy(torch.nn.Module):  # g(x0) = T(x0)
        cfg = student.head.cfg

        def sample(self, hidden, n, generator=None, *, noise):
            return teacher.head.sample(hidden, n, noise=noise)

    student.head = Copy()
    out = Distiller(student, teacher, DistillConfig(loss="coupled")).loss(torch.randint(0, 50, (2, 16)))
    assert float(out["coupled"]) < 1e-10


def test_energy_head_normal_noise_is_standard_normal():
    from calm_models.heads import EnergyHead

    head = EnergyHead(HeadConfig(hidden_size=16, noise_size=4, noise="normal"), cond_size=8, latent_size=4)
    eps = head._noise((5000, 4), torch.zeros(1, 8), torch.Generator().manual_seed(0)).flatten()
    assert stats.kstest(eps.numpy(), "norm").pvalue > 1e-3
    uniform = EnergyHead(HeadConfig(hidden_size=16, noise_size=4), cond_size=8, latent_size=4)
    assert uniform._noise((100, 4), torch.zeros(1, 8), None).abs().max() <= 0.5
