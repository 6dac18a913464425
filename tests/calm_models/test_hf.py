"""BrierLM of Hugging Face causal LMs (issue 16.4): the same estimates as our token model for the
same weights, unbiased against brute-force enumeration, and the ``evaluate --hf`` command."""

from __future__ import annotations

import itertools

import pytest
import torch

from calm_models import evaluate
from calm_models.baseline import TokenLM
from calm_models.config import BackboneConfig, TokenLMConfig
from calm_models.hf import HFLanguageModel

transformers = pytest.importorskip("transformers", reason="--hf needs transformers")


def _llama(vocab: int = 40):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norms away from 1 as well
    return model


def _as_token_lm(llama) -> TokenLM:
    cfg = llama.config
    ours = TokenLM(
        TokenLMConfig(
            cfg.vocab_size,
            BackboneConfig(
                hidden_size=cfg.hidden_size,
                num_layers=cfg.num_hidden_layers,
                num_heads=cfg.num_attention_heads,
                num_kv_heads=cfg.num_key_value_heads,
                ffn_size=cfg.intermediate_size,
                max_seq_len=cfg.max_position_embeddings,
                norm_eps=cfg.rms_norm_eps,
                rope_theta=cfg.rope_theta,
            ),
            tie_embeddings=False,
        )
    ).eval()
    names = {
        "model.embed_tokens": "embed",
        "model.norm": "backbone.norm",
        "lm_head": "lm_head",
        "model.layers": "backbone.layers",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn": "attn",
        "mlp.gate_proj": "ffn.w1",
        "mlp.up_proj": "ffn.w3",
        "mlp.down_proj": "ffn.w2",
    }
    state = {}
    for key, value in llama.state_dict().items():
        for old, new in names.items():
            key = key.replace(old, new)
        state[key] = value
    ours.load_state_dict(state)
    return ours


def test_same_estimates_as_our_token_model_for_the_same_weights():
    llama = _llama()
    ours, theirs = _as_token_lm(llama), HFLanguageModel(llama, rollout_rows=5)
    tokens = torch.randint(40, (3, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([1, 8, 16, 20])
    a = ours.brier_estimates(tokens, positions, generator=torch.Generator().manual_seed(2))
    b = theirs.brier_estimates(tokens, positions, generator=torch.Generator().manual_seed(2))
    assert (a - b).abs().max() < 1e-5
    assert torch.allclose(ours.loss(tokens)["loss"], theirs.loss(tokens)["loss"], atol=1e-5)
    prompts = [tokens[0, :5], tokens[1, :9]]
    greedy = [m.generate(prompts, 6, temperature=0.0).tokens for m in (ours, theirs)]
    assert all(torch.equal(x, y) for x, y in zip(*greedy, strict=True))


def test_estimates_are_unbiased_against_enumeration():
    """Monte Carlo mean over replicated rows == the enumerated Brier-1..4 of a tiny GPT-2 (5 SE)."""
    torch.manual_seed(3)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=5, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    ).eval()
    with torch.no_grad():
        gpt2.transformer.wte.weight.mul_(20)  # a peaked model: the check is not trivial
    model = HFLanguageModel(gpt2, rollout_rows=4096)
    seq = torch.tensor([1, 3, 0, 4, 2, 2, 1])
    conts = torch.tensor(list(itertools.product(range(5), repeat=4)))  # (625, 4)
    exact = []
    with torch.no_grad():
        for s in (1, 3):
            inputs = torch.cat([seq[:s].expand(len(conts), -1), conts], 1)
            logp = gpt2(inputs).logits.log_softmax(-1)[:, s - 1 : s + 3]
            prob = logp.gather(-1, conts[..., None]).squeeze(-1).cumsum(-1).exp()  # (625, 4)
            target = (conts == seq[s : s + 4]).all(-1)
            exact.append(2 * prob[target][0] - (prob * prob[:, -1:]).sum(0))
    exact = torch.stack(exact)  # (2, 4)
    assert exact[:, 0].abs().max() > 0.2  # far from uniform (here: confidently wrong)
    est = model.brier_estimates(
        seq.expand(3000, -1).contiguous(), torch.tensor([1, 3]), generator=torch.Generator().manual_seed(4)
    )  # (3000, 2, 4)
    mean, se = est.mean(0), est.std(0) / 3000**0.5
    assert ((mean - exact).abs() <= 5 * se + 1e-6).all(), (mean, exact, se)


def test_evaluate_command_scores_a_model_folder(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(39)} | {"<|end_of_text|>": 39}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    _llama().save_pretrained(tmp_path / "llama")
    tok.save(str(tmp_path / "llama" / "tokenizer.json"))
    data = tmp_path / "text.txt"
    data.write_text(" ".join(f"w{i % 39}" for i in range(300)))
    argv = ["--hf", str(tmp_path / "llama"), "--data", str(data), "--block-len", "64", "--device", "cpu"]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert "| BrierLM |" in out and (tmp_path / "llama" / "brier_lm.json").is_file()
    assert evaluate.main(["--hf", str(tmp_path / "llama")]) == 2
    assert "--hf needs --data" in capsys.readouterr().err
    assert evaluate.main(["--hf", str(tmp_path / "nope"), "--data", str(data)]) == 2
    assert "no config.json" in capsys.readouterr().err
