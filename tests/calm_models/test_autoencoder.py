"""Tests of calm_models.autoencoder (and the RMSNorm / SwiGLU blocks of calm_models._layers)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from calm_models._layers import RMSNorm, SwiGLU
from calm_models.autoencoder import Autoencoder, AutoencoderConfig, reconstruction_accuracy, robustness_table

V, K, LAT, H = 64, 4, 16, 32


def _tiny(seed: int = 0, **overrides) -> Autoencoder:
    cfg = dict(vocab_size=V, chunk_size=K, latent_size=LAT, hidden_size=H)
    cfg.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Autoencoder(AutoencoderConfig(**cfg))


def _tokens(*shape: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Tiny models train faster on one thread, especially on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shared_ae() -> Autoencoder:
    """A tiny untrained AE for read-only tests (built once: hypothesis calls the test often)."""
    return _tiny().eval()


def _set_posterior(ae: Autoencoder, mean: torch.Tensor, log_std: torch.Tensor) -> None:
    """Make the encoder output a constant posterior (zero weight, chosen bias)."""
    with torch.no_grad():
        ae.encoder.to_latent.weight.zero_()
        ae.encoder.to_latent.bias.copy_(torch.cat([mean, log_std]))


# ---------------------------------------------------------------------------- building blocks
def test_rmsnorm_matches_formula_and_keeps_dtype():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(0))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    xb = x.bfloat16()
    yb = norm(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), expected, atol=0.05, rtol=0.02)


def test_swiglu_matches_formula():
    ffn = SwiGLU(5, 7)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    expected = (F.silu(x @ ffn.w1.weight.T) * (x @ ffn.w3.weight.T)) @ ffn.w2.weight.T
    torch.testing.assert_close(ffn(x), expected)
    assert ffn.w1.bias is None and SwiGLU(5, 7, bias=True).w2.bias is not None


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 0),
        ("chunk_size", 0),
        ("latent_size", -1),
        ("hidden_size", 2.5),
        ("intermediate_size", 0),
        ("num_token_layers", -1),
        ("num_chunk_layers", True),
        ("kl_weight", -1e-3),
        ("kl_clamp", math.inf),
        ("mask_prob", 1.0),
        ("latent_dropout", -0.1),
        ("init_std", 0.0),
        ("norm_eps", "1e-6"),
    ],
)
def test_config_validate_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must"):
        AutoencoderConfig(**{"vocab_size": V, field: value})


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(num_token_layers=0, num_chunk_layers=3), dict(chunk_size=2, intermediate_size=48, num_token_layers=2)],
)
def test_num_parameters_matches_module(overrides):
    ae = _tiny(**overrides)
    counted = sum(p.numel() for p in ae.parameters())
    assert ae.num_parameters() == counted
    assert ae.num_parameters(include_embedding=False) == counted - V * H


def test_paper_sized_config_has_75m_parameters():
    cfg = AutoencoderConfig(vocab_size=128_256)  # Llama-3 tokenizer, as in the paper
    assert cfg.ffn_size == 1280
    with torch.device("meta"):
        assert 74e6 < Autoencoder(cfg).num_parameters() < 77e6


# ---------------------------------------------------------------------------- shapes and errors
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_shapes_for_any_batch_shape(batch):
    ae = _tiny()
    tokens = _tokens(*batch, 12)
    mean, log_std = ae.encode(tokens)
    assert mean.shape == log_std.shape == (*batch, 3, LAT)
    logits = ae.decode(mean)
    assert logits.shape == (*batch, 12, V)
    assert ae.decode_tokens(mean).shape == (*batch, 12)
    assert ae.reconstruct(tokens).shape == tokens.shape
    assert ae.reconstruct(tokens).dtype == torch.int64
    g = torch.Generator().manual_seed(0)
    assert ae.sample_posterior(tokens, 5, generator=g).shape == (5, *batch, 3, LAT)
    out = ae.loss(tokens, generator=g)
    assert set(out) == {"loss", "ce", "kl", "kl_raw", "accuracy"}
    assert all(v.shape == () and v.dtype == torch.float32 for v in out.values())


@given(batch=st.lists(st.integers(1, 3), min_size=0, max_size=3), chunks=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_batch_and_chunk_independence(shared_ae, batch, chunks, seed):
    """Every chunk is encoded and decoded on its own, whatever the batch layout."""
    ae = shared_ae
    tokens = _tokens(*batch, chunks * K, seed=seed)
    mean, log_std = ae.encode(tokens)
    single_chunks = tokens.reshape(-1, 1, K)  # every chunk as its own batch row
    mean1, log_std1 = ae.encode(single_chunks)
    torch.testing.assert_close(mean, mean1.reshape(mean.shape))
    torch.testing.assert_close(log_std, log_std1.reshape(log_std.shape))
    logits = ae.decode(mean)
    logits1 = ae.decode(mean1)
    torch.testing.assert_close(logits, logits1.reshape(logits.shape))


def test_input_errors_name_the_argument():
    ae = _tiny()
    with pytest.raises(ValueError, match=r"tokens must have shape \(\*b, L\) with L a multiple of 4"):
        ae.encode(_tokens(2, 10))
    with pytest.raises(ValueError, match=r"got \(6,\)"):
        ae.loss(_tokens(6))
    with pytest.raises(ValueError, match=r"got \(5,\)"):
        ae.sample_posterior(_tokens(5), 2)
    with pytest.raises(TypeError, match="integer tensor"):
        ae.encode(torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"ids in \[0, 64\), got 64 at position 3"):
        ae.encode(torch.tensor([0, 1, 2, 64]))
    with pytest.raises(ValueError, match="got -1"):
        ae.loss(torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match=r"got \(\)"):
        ae.encode(torch.tensor(3))
    with pytest.raises(ValueError, match="latent_size=16"):
        ae.decode(torch.zeros(2, 3, 15))
    with pytest.raises(ValueError, match=r"\(\*b, C, latent_size"):
        ae.decode(torch.zeros(16))
    with pytest.raises(ValueError, match="float tensor"):
        ae.decode(torch.zeros(2, 1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="num_samples"):
        ae.sample_posterior(_tokens(8), 0)
    with pytest.raises(ValueError, match="noise_std"):
        ae.reconstruct(_tokens(8), noise_std=-0.1)
    with pytest.raises(ValueError, match="sigmas"):
        robustness_table(ae, [_tokens(8)], sigmas=(0.0, -1.0))
    with pytest.raises(ValueError, match="at least one token"):
        robustness_table(ae, [])
    with pytest.raises(ValueError, match="at least one chunk"):
        ae.loss(torch.zeros(0, 8, dtype=torch.long))


def test_int32_and_uint8_tokens_are_accepted():
    ae = _tiny()
    tokens = _tokens(2, 8)
    expected = ae.encode(tokens)[0]
    torch.testing.assert_close(ae.encode(tokens.int())[0], expected)
    torch.testing.assert_close(ae.encode(tokens.to(torch.uint8))[0], expected)


# ---------------------------------------------------------------------------- tied output layer
def test_output_layer_is_tied_to_embedding():
    ae = _tiny()
    # one V x H matrix in the parameters and the state dict (safetensors-friendly)
    vh = [n for n, p in ae.named_parameters() if p.shape == (V, H)]
    assert vh == ["embedding.weight"]
    assert [k for k, v in ae.state_dict().items() if v.shape == (V, H)] == ["embedding.weight"]
    # the decoder uses it: decode alone sends gradient into the embedding matrix
    z = torch.randn(2, 3, LAT, generator=torch.Generator().manual_seed(0))
    ae.decode(z).logsumexp(-1).sum().backward()
    assert ae.embedding.weight.grad is not None and ae.embedding.weight.grad.abs().sum() > 0
    # and logits are exactly hidden @ E^T
    with torch.no_grad():
        hidden = ae.decoder(z)  # (2, 3, K, H)
        torch.testing.assert_close(ae.decode(z), (hidden @ ae.embedding.weight.T).flatten(1, 2))


# ---------------------------------------------------------------------------- inference API
def test_eval_determinism_and_mode_independence():
    ae = _tiny()
    tokens = _tokens(3, 8)
    ae.train()
    mean_train, log_std_train = ae.encode(tokens)
    ae.eval()
    mean_a, log_std_a = ae.encode(tokens)
    mean_b, _ = ae.encode(tokens)
    assert torch.equal(mean_a, mean_b) and torch.equal(mean_a, mean_train)
    assert torch.equal(log_std_a, log_std_train)
    # reconstruct without noise = argmax decode(mean), deterministic
    assert torch.equal(ae.reconstruct(tokens), ae.decode(mean_a).argmax(-1))
    assert torch.equal(ae.decode_tokens(mean_a), ae.decode(mean_a).argmax(-1))
    # eval-mode loss is deterministic and forward is the loss
    out1, out2, out3 = ae.loss(tokens), ae.loss(tokens), ae(tokens)
    for key in out1:
        assert torch.equal(out1[key], out2[key]) and torch.equal(out1[key], out3[key])
    # train-mode forward is the train-mode loss too
    ae.train()
    a = ae(tokens, generator=torch.Generator().manual_seed(5))
    b = ae.loss(tokens, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["loss"], b["loss"])


def test_reconstruct_noise_uses_generator():
    ae = _tiny()
    tokens = _tokens(4, 16)
    mean, _ = ae.encode(tokens)
    g = torch.Generator().manual_seed(3)
    noisy = ae.reconstruct(tokens, noise_std=0.7, generator=g)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noisy, ae.decode(mean + 0.7 * noise).argmax(-1))
    acc = reconstruction_accuracy(ae, tokens, 0.7, generator=torch.Generator().manual_seed(3))
    assert acc.shape == () and acc == (noisy == tokens).float().mean()


def test_sample_posterior_moments_and_single_encoder_pass():
    ae = _tiny()
    mean_true = torch.linspace(-2.0, 2.0, LAT)
    log_std_true = torch.linspace(-2.0, 0.5, LAT)
    _set_posterior(ae, mean_true, log_std_true)
    calls = []
    handle = ae.encoder.register_forward_hook(lambda *args: calls.append(1))
    n = 4000
    tokens = _tokens(2, 8)
    samples = ae.sample_posterior(tokens, n, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert len(calls) == 1  # encoded once, noise expanded
    assert samples.shape == (n, 2, 2, LAT)
    std_true = log_std_true.exp()
    flat = samples.reshape(n, -1, LAT).double()  # (n, 4 chunks, l)
    z_mean = (flat.mean(0) - mean_true) / (std_true / math.sqrt(n))
    assert z_mean.abs().max() < 5
    ratio = flat.var(0) / std_true.square()
    assert (ratio - 1).abs().max() < 5 * math.sqrt(2 / (n - 1))
    # the draws are what the generator dictates
    again = ae.sample_posterior(tokens, n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples, again)


# ---------------------------------------------------------------------------- training objective
def test_kl_matches_torch_distributions():
    ae = _tiny(kl_clamp=0.0).eval()
    mean_true = torch.linspace(-1.5, 1.5, LAT)
    log_std_true = torch.linspace(-1.0, 1.0, LAT)
    _set_posterior(ae, mean_true, log_std_true)
    with torch.no_grad():  # make the posterior depend on the tokens as well
        ae.encoder.to_latent.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    tokens = _tokens(3, 12)
    mean, log_std = ae.encode(tokens)
    kl_ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, log_std.exp()),
        torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean)),
    )  # (3, 3, l)
    out = ae.loss(tokens)
    torch.testing.assert_close(out["kl"], kl_ref.sum(-1).mean())
    torch.testing.assert_close(out["kl_raw"], kl_ref.sum(-1).mean())


def test_kl_clamp_is_a_lower_clamp_per_dimension():
    ae = _tiny(kl_clamp=0.5).eval()
    # half of the dims near the prior (KL ~ 0.005 < 0.5), half far from it (KL ~ 2.5 > 0.5)
    half = LAT // 2
    mean_true = torch.cat([torch.full((half,), 0.1), torch.full((half,), 2.0)])
    log_std_true = torch.cat([torch.zeros(half), torch.full((half,), -0.5)])
    _set_posterior(ae, mean_true, log_std_true)
    tokens = _tokens(2, 8)
    out = ae.loss(tokens)
    kl_low = 0.5 * 0.1**2
    kl_high = 0.5 * (4.0 + math.exp(-1.0) - 1) + 0.5
    assert kl_low < 0.5 < kl_high
    torch.testing.assert_close(out["kl"], torch.tensor(half * (0.5 + kl_high)))
    torch.testing.assert_close(out["kl_raw"], torch.tensor(half * (kl_low + kl_high)))
    # when every dim is below the clamp, the KL is exactly l * kl_clamp
    ae.config.kl_clamp = 3.0
    assert ae.loss(tokens)["kl"].item() == LAT * 3.0


def test_eval_loss_formula():
    ae = _tiny(kl_weight=0.25).eval()
    tokens = _tokens(3, 8)
    mean, log_std = ae.encode(tokens)
    logits = ae.decode(mean)
    ce = F.cross_entropy(logits.reshape(-1, V), tokens.reshape(-1))
    kl_dim = 0.5 * (mean**2 + (2 * log_std).exp() - 1) - log_std
    kl = kl_dim.clamp(min=0.5).sum(-1).mean()
    out = ae.loss(tokens)
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["loss"], K * ce + 0.25 * kl)
    torch.testing.assert_close(out["accuracy"], (logits.argmax(-1) == tokens).float().mean())


def test_train_loss_formula_recomputed_with_the_same_generator():
    """Masking -> reparameterised sample -> latent dropout, drawn in this documented order."""
    p_mask, p_drop, w = 0.3, 0.2, 0.01
    ae = _tiny(mask_prob=p_mask, latent_dropout=p_drop, kl_weight=w, kl_clamp=0.5).train()
    tokens = _tokens(2, 3, 8)
    out = ae.loss(tokens, generator=torch.Generator().manual_seed(11))

    g = torch.Generator().manual_seed(11)
    flat = tokens.reshape(6, 8)
    keep_tok = torch.rand(6, 8, generator=g) >= p_mask
    emb = ae.embedding.weight[flat] * keep_tok[..., None]
    mean, log_std = ae.encoder(emb.reshape(6, 2, K, H))
    eps = torch.randn(6, 2, LAT, generator=g)
    z = mean + log_std.exp() * eps
    keep_lat = torch.rand(6, 2, LAT, generator=g) >= p_drop
    z = z * keep_lat / (1 - p_drop)
    logits = ae.decode(z)  # (6, 8, V)
    ce = F.cross_entropy(logits.reshape(-1, V), flat.reshape(-1))
    kl_ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, log_std.exp()), torch.distributions.Normal(0.0, 1.0)
    )
    kl = kl_ref.clamp(min=0.5).sum(-1).mean()
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["kl_raw"], kl_ref.sum(-1).mean())
    torch.testing.assert_close(out["loss"], K * ce + w * kl)
    torch.testing.assert_close(out["accuracy"], (logits.argmax(-1) == flat).float().mean())
    assert 0 < (~keep_tok).sum() and 0 < (~keep_lat).sum()  # the draws did something


def test_masking_rate_and_masked_embeddings_are_zero():
    p = 0.15
    ae = _tiny(mask_prob=p).train()
    seen = []
    ae.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    tokens = _tokens(64, 64, seed=3)
    ae.loss(tokens, generator=torch.Generator().manual_seed(0))
    emb_in = seen[-1].reshape(64, 64, H)  # (N, L, H) after masking
    masked = (emb_in == 0).all(-1)
    n = masked.numel()
    rate = masked.float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
    # unmasked positions carry exactly their token embedding
    torch.testing.assert_close(emb_in[~masked], ae.embedding.weight[tokens][~masked].detach())
    # nothing is masked in eval mode, nor by encode()
    ae.eval()
    ae.loss(tokens)
    assert not (seen[-1] == 0).all(-1).any()
    ae.train()
    ae.encode(tokens)
    assert not (seen[-1] == 0).all(-1).any()


def test_latent_dropout_rate_and_scaling():
    p = 0.15
    ae = _tiny(latent_dropout=p, mask_prob=0.0).train()
    _set_posterior(ae, torch.ones(LAT), torch.full((LAT,), -30.0))  # z = 1 exactly
    seen = []
    ae.decoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    ae.loss(_tokens(128, 64), generator=torch.Generator().manual_seed(0))
    z = seen[-1]  # (N, C, l)
    dropped = z == 0
    n = z.numel()
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(z[~dropped], torch.full_like(z[~dropped], 1 / (1 - p)))
    # eval mode: z is the posterior mean, no dropout, no noise
    ae.eval()
    ae.loss(_tokens(4, 8))
    torch.testing.assert_close(seen[-1], torch.ones_like(seen[-1]))


def test_gradient_reaches_every_parameter():
    ae = _tiny(num_token_layers=2, num_chunk_layers=2).train()
    out = ae.loss(_tokens(8, 16), generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    for name, param in ae.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
    assert not any(v.requires_grad for k, v in out.items() if k != "loss")


def test_bf16_autocast_loss_in_fp32():
    ae = _tiny().train()
    tokens = _tokens(4, 16)
    ref = ae.loss(tokens, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ae.loss(tokens, generator=torch.Generator().manual_seed(0))
        mean, _ = ae.encode(tokens)
        assert ae.decode(mean).dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in out.values())
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=0.02, atol=0.0)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in ae.parameters())
    # a module cast to bf16 follows its own dtype
    ae_bf16 = _tiny().to(torch.bfloat16)
    mean, log_std = ae_bf16.encode(tokens)
    assert mean.dtype == torch.bfloat16
    assert ae_bf16.decode(mean.float()).dtype == torch.bfloat16
    assert ae_bf16.loss(tokens)["loss"].dtype == torch.float32


# ---------------------------------------------------------------------------- training runs
# Golden loss curve: tiny AE (seed 0), 30 AdamW steps on a fixed batch. Computed once with
# torch 2.13 CPU; a change here means the model, its init or the objective changed.
GOLDEN_STEPS = (0, 10, 20, 29)
GOLDEN_LOSSES = (16.773397, 12.960052, 8.661224, 5.090747)


def test_golden_training_curve():
    ae = _tiny(seed=0).train()
    g = torch.Generator().manual_seed(123)
    data = torch.randint(0, V, (16, 16), generator=g)
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    with _single_thread():
        for _ in range(30):
            out = ae.loss(data, generator=g)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append(out["loss"].item())
    # at init the loss is about K * log V (near-uniform logits: their std is init_std * sqrt(H))
    assert losses[0] == pytest.approx(K * math.log(V), abs=0.25)
    assert losses[-1] < 0.4 * losses[0]
    got = tuple(losses[i] for i in GOLDEN_STEPS)
    assert got == pytest.approx(GOLDEN_LOSSES, abs=1e-4)


@pytest.fixture(scope="module")
def overfit_ae() -> tuple[Autoencoder, torch.Tensor]:
    """A tiny robust AE (default masking, dropout and KL) trained on 64 fixed sequences."""
    ae = _tiny(seed=0).train()
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, V, (64, 16), generator=g)
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    with _single_thread():
        for _ in range(200):
            out = ae.loss(data, generator=g)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
    return ae, data


def test_tiny_autoencoder_overfits_to_near_perfect_reconstruction(overfit_ae):
    ae, data = overfit_ae
    ae.eval()
    assert reconstruction_accuracy(ae, data).item() > 0.99
    # the same architecture before training is at chance level: the training did the work
    assert reconstruction_accuracy(_tiny(seed=0), data).item() < 0.1


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_robustness_table_on_trained_autoencoder(overfit_ae, mode):
    ae, data = overfit_ae
    ae.train(mode == "train")
    sigmas = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 3.0)
    batches = (b for b in data.split(16))  # a one-shot iterable
    table = robustness_table(ae, batches, sigmas=sigmas, generator=torch.Generator().manual_seed(0))
    assert ae.training == (mode == "train")  # mode restored
    assert list(table) == list(sigmas)
    acc = list(table.values())
    assert acc[0] == pytest.approx(reconstruction_accuracy(ae, data).item())
    assert acc[0] > 0.99
    # non-increasing up to Monte Carlo noise (1024 tokens per sigma)
    assert all(b <= a + 0.02 for a, b in zip(acc, acc[1:], strict=False))
    assert acc[-1] < acc[0] - 0.2  # large noise does destroy the chunk


@pytest.mark.gpu
def test_follows_cuda_device():
    ae = _tiny().cuda()
    tokens = _tokens(2, 8).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = ae.loss(tokens, generator=g)
    assert out["loss"].device.type == "cuda"
    assert ae.sample_posterior(tokens, 3, generator=g).device.type == "cuda"
    assert ae.reconstruct(tokens, 0.1, generator=g).device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(ae.loss(tokens, generator=g)["loss"])


def _train_on_half_the_vocabulary(random_token_prob: float, steps: int = 300) -> Autoencoder:
    """A tiny AE trained only on ids < V/2 (the other half never occurs in its corpus)."""
    ae = _tiny(seed=0, mask_prob=0.0, latent_dropout=0.0, random_token_prob=random_token_prob)
    ae.train()
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    with _single_thread():
        for _ in range(steps):
            data = torch.randint(0, V // 2, (32, 16), generator=g)
            out = ae.loss(data, generator=g)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
    return ae.eval()


def test_random_tokens_teach_ids_the_corpus_never_contains():
    unseen = torch.randint(V // 2, V, (64, 16), generator=torch.Generator().manual_seed(4))
    plain = _train_on_half_the_vocabulary(0.0)
    augmented = _train_on_half_the_vocabulary(0.3)
    # without the augmentation the unseen half of the embedding is never trained
    assert reconstruction_accuracy(plain, unseen).item() < 0.2
    assert reconstruction_accuracy(augmented, unseen).item() > 0.9
    seen = torch.randint(0, V // 2, (64, 16), generator=torch.Generator().manual_seed(5))
    assert reconstruction_accuracy(augmented, seen).item() > 0.9


def test_random_token_prob_is_validated_and_off_in_eval_mode():
    with pytest.raises(ValueError, match="random_token_prob"):
        AutoencoderConfig(vocab_size=V, random_token_prob=1.0)
    ae = _tiny(seed=0, random_token_prob=0.5).eval()
    data = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(6))
    plain = _tiny(seed=0).eval()
    assert torch.equal(ae.loss(data)["loss"], plain.loss(data)["loss"])
