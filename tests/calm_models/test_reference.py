"""Parity with the authors' reference implementation (issues 16 and 23).

Tiny reference models are built with the reference code (MIT, in ``../shared/reference/calm``,
importable by tests only), saved with ``save_pretrained``, converted by
:func:`calm_models.convert.convert`, and must give the same outputs to 1e-5 in fp32: posterior
mean and log-std, decoder logits, backbone hidden states (also cached), energy head samples for
the same noise, and the energy loss for the same samples and targets. Two pairs are checked:
random weights, and a pair *trained* for a few dozen steps by the reference modules' own losses
(as its HF-Trainer scripts do, frozen autoencoder in training mode included). For the trained
pair the project's BrierLM evaluator must also reproduce the reference's own Brier estimates:
exactly for the same head noise, and within standard errors for the reference's own sampling.
The converted run then works with the evaluate, generate and robustness commands.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from calm_models import evaluate, generate, robustness
from calm_models.convert import ConversionError, convert
from calm_models.convert import main as convert_main
from calm_models.evaluate import evaluate_brier_lm
from calm_models.runs import load_run
from likelihood_free.energy import energy_loss

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "calm"
if not (REFERENCE / "models").is_dir():
    pytest.skip(f"the reference implementation is not at {REFERENCE}", allow_module_level=True)
transformers = pytest.importorskip("transformers", reason="the parity tests need transformers")
if transformers.__version__ != "4.43.0":
    pytest.skip(
        f"the reference code needs transformers 4.43.0, found {transformers.__version__}", allow_module_level=True
    )
sys.path.insert(0, str(REFERENCE))
from models.configuration_autoencoder import AutoencoderConfig as RefAEConfig  # noqa: E402
from models.configuration_calm import CALMConfig as RefCALMConfig  # noqa: E402
from models.modeling_autoencoder import Autoencoder as RefAutoencoder  # noqa: E402
from models.modeling_energy import EnergyTransformer  # noqa: E402

V, K, L = 96, 4, 32


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (norm weights near 1): the reference init hides mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if ("norm" in name or "ln" in name) and p.dim() == 1 else 0.2 * noise)


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(V - 1)} | {"<|end_of_text|>": V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))


def _calm_config(ae_dir, **extra) -> RefCALMConfig:
    """The tiny reference CALM of these tests (GQA, 2 layers, 2 MLP blocks) on the autoencoder saved in ``ae_dir``."""
    sizes = dict(vocab_size=V, hidden_size=32, intermediate_size=64, latent_size=16, patch_size=K, noise_size=8)
    layers = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_mlp_layers=2)
    return RefCALMConfig(ae_path=str(ae_dir), **sizes, **layers, **extra)


def _converted(ae, calm, tmp, tokens: torch.Tensor) -> dict:
    """Save ``calm`` in the authors' format (``ae`` is saved in ``tmp / "ae"``), add tokenizers, convert both folders
    with the command, and return the fixture: both reference modules in eval mode, held-out ``tokens``, both runs."""
    calm.save_pretrained(tmp / "calm", safe_serialization=False)
    for folder in (tmp / "ae", tmp / "calm"):
        _tokenizer(folder)
    ae.eval()
    calm.eval()
    assert convert_main([str(tmp / "calm"), str(tmp / "run")]) == 0
    assert convert_main([str(tmp / "ae"), str(tmp / "ae-run")]) == 0
    return {
        "ae": ae,
        "calm": calm,
        "tmp": tmp,
        "tokens": tokens,
        "run": load_run(tmp / "run"),
        "ae_run": load_run(tmp / "ae-run"),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """A tiny reference autoencoder and CALM (GQA, rope_theta 5e5), saved and converted."""
    tmp = tmp_path_factory.mktemp("reference")
    torch.manual_seed(0)
    ae = RefAutoencoder(
        RefAEConfig(vocab_size=V, hidden_size=32, intermediate_size=64, latent_size=16, patch_size=K, rms_norm_eps=1e-5)
    )
    _perturb(ae, 1)
    ae.save_pretrained(tmp / "ae", safe_serialization=False)
    calm = EnergyTransformer(_calm_config(tmp / "ae", rope_theta=500000.0, rms_norm_eps=1e-5))
    _perturb(calm.transformer, 2)
    _perturb(calm.embed_proj, 3)
    _perturb(calm.mlp_generator, 4)
    return _converted(ae, calm, tmp, torch.randint(V, (3, L), generator=torch.Generator().manual_seed(5)))


def _language(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, L)`` blocks of a toy language tiny models learn in a few dozen steps: ``10 + (s + i) mod 6``."""
    start = torch.randint(6, (n, 1), generator=generator)
    return 10 + (start + torch.arange(L)) % 6


def _fit(model: torch.nn.Module, steps: int, lr: float, generator: torch.Generator, warmup: int = 0) -> None:
    """AdamW on the reference module's own loss, in training mode as under its HF Trainer (linear warm-up)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, warmup)))
    for _ in range(steps):
        tokens = _language(32, generator)
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny reference autoencoder (40 steps) and CALM on it (80 steps), trained, saved and converted."""
    tmp = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(100)
    ae = RefAutoencoder(RefAEConfig(vocab_size=V, hidden_size=32, intermediate_size=64, latent_size=16, patch_size=K))
    _fit(ae, 40, 1e-2, g)
    ae.save_pretrained(tmp / "ae", safe_serialization=False)
    # pad = EOS, as the benchmark's wrapped tokenizers
    calm = EnergyTransformer(_calm_config(tmp / "ae", pad_token_id=V - 1, eos_token_id=V - 1))
    _fit(calm, 80, 1e-2, g, warmup=10)
    return _converted(ae, calm, tmp, _language(64, g))  # held-out blocks of the language it learnt


@pytest.fixture(params=["reference", "trained"])
def pair(request) -> dict:
    """Each reference pair in turn: random weights, then trained weights."""
    return request.getfixturevalue(request.param)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@torch.no_grad()
def test_autoencoder_parity(pair):
    ref, tokens = pair["ae"], pair["tokens"]
    for ours in (pair["run"].model.autoencoder, pair["ae_run"].model):
        mean, log_std = ours.encode(tokens)
        ref_mean, ref_log_std = ref.encoder(tokens).chunk(2, dim=-1)
        assert _max_diff(mean, ref_mean) < 1e-5 and _max_diff(log_std, ref_log_std) < 1e-5
        z = torch.randn(3, L // K, 16, generator=torch.Generator().manual_seed(6))
        assert _max_diff(ours.decode(z), ref.decoder(z)) < 1e-5


@torch.no_grad()
def test_backbone_hidden_states_parity_with_and_without_cache(pair):
    ref, model, tokens = pair["calm"], pair["run"].model, pair["tokens"]
    b, c = tokens.shape[0], L // K
    embeds = ref.embed_proj(ref.transformer.embed_tokens(tokens).reshape(b, c, -1))
    expected = ref.transformer(inputs_embeds=embeds)[0]
    assert _max_diff(model.hidden_states(tokens), expected) < 1e-5
    cache = model.backbone.new_cache(b, c)
    parts = [model.hidden_states(tokens[:, :12], cache=cache), model.hidden_states(tokens[:, 12:], cache=cache)]
    assert _max_diff(torch.cat(parts, dim=1), expected) < 1e-5


@torch.no_grad()
def test_energy_head_samples_and_loss_parity(pair):
    ref, model, tokens = pair["calm"], pair["run"].model, pair["tokens"]
    hidden = model.hidden_states(tokens).reshape(-1, 32)  # (P, h)
    n = 8
    torch.manual_seed(7)
    expected = ref.mlp_generator.sample(hidden.unsqueeze(0).repeat(n, 1, 1))  # (N, P, l)
    ours = model.head.sample(hidden, n, generator=torch.Generator().manual_seed(7))
    assert _max_diff(ours, expected) < 1e-5
    mean, log_std = model.autoencoder.encode(tokens)
    mean, log_std = mean.reshape(-1, 16), log_std.reshape(-1, 16)
    torch.manual_seed(8)
    score = ref.energy_score(expected, mean, log_std)  # draws eps ~ N(0, I), (100, P, l)
    torch.manual_seed(8)
    targets = mean + torch.randn((100, *mean.shape)) * log_std.exp()
    loss = energy_loss(ours, targets, reduction="none")
    torch.testing.assert_close(loss.double(), -score.double(), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def _reference_brier(ref, tokens: torch.Tensor, seed: int) -> torch.Tensor:
    """The reference's own Brier-1..4 estimates (its ``eval_brier``) from two head samples per chunk boundary, with
    the head noise of ``torch.manual_seed(seed)`` drawn for every chunk as the project's evaluator draws it."""
    b, c = tokens.shape[0], L // K
    hidden = ref.transformer(inputs_embeds=ref.embed_proj(ref.transformer.embed_tokens(tokens).reshape(b, c, -1)))[0]
    torch.manual_seed(seed)
    latents = ref.mlp_generator.sample(hidden.unsqueeze(0).repeat(2, 1, 1, 1))  # (2, b, C, l): noise (2, b, C, z)
    out = ref.eval_brier(latents[:, :, :-1].reshape(2, b * (c - 1), -1), tokens[:, K:], None, None)
    return torch.stack([out.brier1, out.brier2, out.brier3, out.brier4]).double()


def test_trained_pair_learnt_something(trained):
    """The trained pair is not a random one: it decodes the held-out chunks and predicts them above chance."""
    assert float((trained["ae_run"].model.reconstruct(trained["tokens"]) == trained["tokens"]).float().mean()) > 0.95
    assert float(_reference_brier(trained["calm"], trained["tokens"], seed=0)[0]) > 0.3


def test_trained_pair_brier_equals_the_references_for_the_same_samples(trained):
    """Our evaluator at every chunk boundary (stride K) reproduces the reference's own Brier-n for the same noise."""
    tokens = trained["tokens"]
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        ours = evaluate_brier_lm(trained["run"].model, [tokens], stride=K, generator=gen)
        expected = _reference_brier(trained["calm"], tokens, seed)
        assert ours.count == tokens.shape[0] * (L // K - 1)
        torch.testing.assert_close(torch.tensor(ours.brier, dtype=torch.float64), expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_trained_pair_brier_lm_within_standard_errors_of_the_references_forward(trained):
    """The reference's forward pass in eval mode (its loss and Brier estimates, its own sampling) agrees with our
    evaluator's independent estimate within four standard errors of the difference, for each Brier-n."""
    tokens = trained["tokens"]
    torch.manual_seed(3)
    out = trained["calm"](input_ids=tokens, labels=tokens)
    theirs = torch.stack([out.brier1, out.brier2, out.brier3, out.brier4]).double()
    ours = evaluate_brier_lm(trained["run"].model, [tokens], stride=K, generator=torch.Generator().manual_seed(4))
    se = torch.tensor(ours.brier_se, dtype=torch.float64)
    assert torch.all((torch.tensor(ours.brier, dtype=torch.float64) - theirs).abs() <= 4 * math.sqrt(2) * se)
    assert ours.brier_lm > 30


def test_converted_runs_work_with_the_commands(reference, capsys):
    run = str(reference["tmp"] / "run")
    data = reference["tmp"] / "text.txt"
    g = torch.Generator().manual_seed(9)
    data.write_text(" ".join(f"w{int(i)}" for i in torch.randint(V - 1, (400,), generator=g)))
    assert evaluate.main([run, "--data", str(data), "--block-len", "64", "--device", "cpu"]) == 0
    assert "| BrierLM |" in capsys.readouterr().out
    assert (
        generate.main(
            [
                run,
                "--prompt",
                "w1 w2 w3",
                "--max-new-tokens",
                "8",
                "--temperature",
                "0.5",
                "--sampler",
                "batch",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("w1 w2 w3")
    for path in (run, str(reference["tmp"] / "ae-run")):
        assert robustness.main([path, "--data", str(data), "--device", "cpu"]) == 0
        assert "| 0.3 |" in capsys.readouterr().out
    config = json.loads((reference["tmp"] / "run" / "checkpoints" / "step_000000" / "meta.json").read_text())
    assert config["step"] == 0


def test_what_cannot_be_mapped_is_refused(reference, tmp_path):
    src = reference["tmp"] / "calm"
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"type": "linear", "factor": 2.0}}))
    (bad / "pytorch_model.bin").symlink_to(src / "pytorch_model.bin")
    (bad / "tokenizer.json").symlink_to(src / "tokenizer.json")
    with pytest.raises(ConversionError, match="rope_scaling"):
        convert(bad, tmp_path / "out")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["transformer.layers.0.extra.weight"] = torch.zeros(2)
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "pytorch_model.bin").unlink()
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="unknown"):
        convert(bad, tmp_path / "out")
    del state["transformer.layers.0.extra.weight"]
    state = {k: v for k, v in state.items() if not k.startswith("ae_model.")}
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="--autoencoder"):
        convert(bad, tmp_path / "out")
    convert(bad, tmp_path / "out", autoencoder=reference["tmp"] / "ae")  # given explicitly
    with pytest.raises(ConversionError, match="not empty"):
        convert(bad, tmp_path / "out", autoencoder=reference["tmp"] / "ae")
