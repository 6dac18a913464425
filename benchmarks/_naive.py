"""Naive formulations that the package's vectorised code is measured against (benchmarks) and checked against (tests).

:func:`loop_brier_terms` is :meth:`calm_models.baseline.TokenLM.brier_terms` written as one KV-cached rollout per
position: the same uniforms, drawn in the same order, so the same samples up to rounding, at the cost of ``P`` sequential
rollouts instead of ``n - 1`` batched passes.
"""

from __future__ import annotations

import torch

from calm_models.baseline import BrierTerms, TokenLM
from calm_models.sampling import check_positions, sample_with_logprob, target_logprobs


@torch.no_grad()
def loop_brier_terms(
    model: TokenLM, tokens: torch.Tensor, positions: torch.Tensor | None = None, *, max_order: int = 4, generator=None
) -> BrierTerms:
    """``model.brier_terms`` with a Python loop over positions (latest first: a rollout then only overwrites cache
    columns that later positions no longer need)."""
    b, length = tokens.shape
    ends = check_positions(positions, length, max_order, 1, tokens.device) - 1  # (P,)
    p, n = ends.shape[0], max_order
    work = torch.float64 if model.embed.weight.dtype == torch.float64 else torch.float32
    u = torch.rand(b, p, n, generator=generator, device=tokens.device, dtype=work)
    cache = model.backbone.new_cache(b, length + n - 1) if n > 1 else None
    logits = model.logits(tokens, cache=cache)  # (b, L, V)
    target_lp = target_logprobs(logits.to(work), tokens, ends + 1, n)
    samples = torch.empty(b, p, n, dtype=torch.long, device=tokens.device)
    sample_lp = torch.empty(b, p, n, dtype=work, device=tokens.device)
    end_list = ends.tolist()
    for i in sorted(range(p), key=lambda k: -end_list[k]):
        step_logits = logits[:, end_list[i]]  # (b, V)
        if cache is not None:
            cache.crop(end_list[i] + 1)
        for j in range(n):
            x, lp = sample_with_logprob(step_logits, u[:, i, j])
            samples[:, i, j], sample_lp[:, i, j] = x, lp
            if j + 1 < n:
                step_logits = model.logits(x[:, None], cache=cache)[:, 0]
    return BrierTerms(target_lp.cumsum(-1).exp(), sample_lp.cumsum(-1).exp(), samples)
