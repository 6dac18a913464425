"""BrierLM (and generation) for any local Hugging Face causal language model.

:class:`HFLanguageModel` puts a ``transformers`` causal LM (Llama, GPT-2, Qwen, ...) behind the
:class:`~calm_models.protocol.LanguageModel` protocol, so that ``evaluate --hf`` (:doc:`/released`) scores it as it
scores the token baseline. ``transformers`` is optional (``pip install transformers``); nothing is downloaded.

Axis key: ``b`` rows, ``L`` tokens, ``P`` positions, ``n`` n-gram order, ``V`` vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from calm_models._layers import check_int, check_tokens, masked_cross_entropy
from calm_models.config import DataConfig, TrainConfig
from calm_models.protocol import Generation
from calm_models.sampling import (
    check_positions,
    cut_at_eos,
    left_pad,
    sample_next,
    sample_with_logprob,
    target_logprobs,
)


class HFLanguageModel(nn.Module):
    """A ``transformers`` causal LM with the methods of :class:`~calm_models.protocol.LanguageModel`.

    Args:
        model: A ``transformers`` ``*ForCausalLM`` module.
        rollout_rows: Rollout rows per forward pass (bounds the memory of :meth:`brier_estimates`).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> hf = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=32, n_embd=16, n_layer=1, n_head=2))
        >>> model = HFLanguageModel(hf).eval()
        >>> model.brier_estimates(torch.randint(20, (2, 12)), torch.tensor([4, 8])).shape
        torch.Size([2, 2, 4])
    """

    chunk_size = 1

    def __init__(self, model: nn.Module, rollout_rows: int = 64) -> None:
        super().__init__()
        self.hf, self.rollout_rows = model, rollout_rows
        self.vocab_size = model.config.vocab_size
        self.max_tokens = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions

    def _logits(self, tokens, mask=None, past=None):
        """Logits and, given a ``mask`` of the real tokens (which sets the positions), the key/value cache."""
        pos = None if mask is None else (mask.cumsum(1) - 1).clamp_min(0)[:, -tokens.shape[1] :]
        cache = mask is not None
        out = self.hf(input_ids=tokens, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=cache)
        return out.logits, out.past_key_values

    def loss(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Mean next-token cross-entropy over ``(b, L)`` blocks (padded targets left out)."""
        tokens = check_tokens(tokens, vocab_size=self.vocab_size)
        logits = self._logits(tokens[:, :-1])[0].float()
        return {"loss": masked_cross_entropy(logits, tokens[:, 1:], None if mask is None else mask[:, 1:])[0]}

    @torch.no_grad()
    def brier_estimates(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        max_order: int = 4,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Unbiased Brier-1..n estimates ``(b, P, n)``, position ``s`` predicting ``tokens[:, s:s+n]``.

        ``2 P(y_{1:n}) - P(x_{1:n})`` (:class:`~calm_models.baseline.BrierTerms`): the target's probability from one
        teacher-forced pass, ``x`` sampled for all positions at once (one left-padded row per position, key/value cache).
        """
        tokens = check_tokens(tokens, vocab_size=self.vocab_size)
        b, length = tokens.shape
        starts = check_positions(positions, length, max_order, 1, tokens.device)  # (P,)
        p = starts.shape[0]
        u = torch.rand(b, p, max_order, generator=generator, device=tokens.device)
        logits = self._logits(tokens)[0].float()  # (b, L, V)
        target_lp = target_logprobs(logits, tokens, starts, max_order)  # teacher forcing
        # rollouts: one row per (row, position), its prefix left-padded to the longest
        width = int(starts.max())
        col = torch.arange(width, device=tokens.device)
        offset = width - starts  # (P,) left padding of each position
        src = (col[None, :] - offset[:, None]).clamp_min(0)  # (P, width)
        real = col[None, :] >= offset[:, None]  # (P, width)
        prefix = torch.where(real, tokens[:, src], 0).reshape(b * p, width)
        real = real.repeat(b, 1)
        start_logits, u = logits[:, starts - 1].reshape(b * p, -1), u.reshape(b * p, max_order)
        rows = torch.arange(b * p, device=tokens.device).split(self.rollout_rows)
        sample_lp = torch.cat([self._rollout(prefix[r], real[r], start_logits[r], u[r]) for r in rows])
        return 2 * target_lp.cumsum(-1).exp() - sample_lp.reshape(b, p, max_order).cumsum(-1).exp()

    def _rollout(self, prefix, real, logits, u):
        """Sample ``n`` tokens after each left-padded prefix; their log-probabilities ``(r, n)``."""
        mask, past, lps = real.long(), None, []
        for j in range(u.shape[1]):
            x, lp = sample_with_logprob(logits, u[:, j])
            lps.append(lp)
            if j + 1 < u.shape[1]:
                if past is None:  # prefill the prefixes, then one token per step
                    _, past = self._logits(prefix, mask)
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                step_logits, past = self._logits(x[:, None], mask, past)
                logits = step_logits[:, -1].float()
        return torch.stack(lps, -1)

    @torch.no_grad()
    def generate(
        self,
        prompts,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        sampler: str = "exact",
        num_candidates: int = 200,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Generation:
        """Sample continuations of left-padded prompts (``softmax(logits / T)``; ``T = 0``: greedy)."""
        device = next(self.parameters()).device
        tokens, real = left_pad(prompts, 0, 1, self.vocab_size, device)
        check_int(max_new_tokens, "max_new_tokens", 1)
        mask, out, past, inputs = real.long(), [], None, tokens
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits, past = self._logits(inputs, mask, past if use_cache else None)
            u = torch.rand(tokens.shape[0], generator=generator, device=device)
            nxt = sample_next(logits[:, -1].float(), temperature, None, u)
            out.append(nxt)
            if eos_id is not None:
                done |= nxt == eos_id
                if bool(done.all()):
                    break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            inputs = nxt[:, None] if use_cache else torch.cat([tokens, torch.stack(out, 1)], 1)
        return Generation([cut_at_eos(r, eos_id) for r in torch.stack(out, 1).unbind(0)], 0, len(out))

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """About ``2 x`` the non-embedding parameters plus attention over ``seq_len`` keys, per token."""
        cfg = self.hf.config
        embedding = self.hf.get_input_embeddings().weight.numel()
        layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
        width = getattr(cfg, "hidden_size", None) or cfg.n_embd
        forward = 2.0 * (sum(p.numel() for p in self.hf.parameters()) - embedding)
        forward += 4.0 * layers * seq_len * width
        return {"train": 3 * forward, "inference": forward}


def load_hf_run(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    eos_token: str | None = None,
    block_len: int = 1024,
):
    """A :class:`~calm_models.runs.LoadedRun` of a local ``transformers`` causal LM folder.

    Args:
        model_dir: A folder with ``config.json``, the weights and ``tokenizer.json``.
        device: ``auto`` or a torch device.
        dtype: ``auto`` (bf16 on a GPU that supports it, else fp32), ``bf16`` or ``fp32``.
        eos_token: The EOS ending every document (default: detected from the tokenizer); no BOS is added.
        block_len: Tokens per evaluation block (at most the model's context).

    Raises:
        RunError: One line: ``transformers`` missing, no such folder, unreadable model.
    """
    from calm_models.data import DataError, TextTokenizer
    from calm_models.distributed import resolve_device
    from calm_models.runs import LoadedRun, RunError

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise RunError("--hf needs the transformers package (pip install transformers)") from None
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise RunError(f"{folder}: no config.json (a local transformers model folder is needed)")
    try:
        dev = resolve_device(device)
        bf16 = dtype == "bf16" or (dtype == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported())
        hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16 if bf16 else torch.float32)
        tokenizer = TextTokenizer.load(folder / "tokenizer.json", eos_token=eos_token)
    except (OSError, ValueError, DataError) as exc:
        raise RunError(f"{folder}: {str(exc).splitlines()[0]}") from None
    model = HFLanguageModel(hf.to(dev).eval())
    data = DataConfig(block_len=min(block_len, model.max_tokens), eos_token=tokenizer.eos_token)
    return LoadedRun(model.eval(), TrainConfig(stage="ar", data=data), tokenizer, folder, 0, "")
