"""Known-truth benchmark: CALM and the token baseline on synthetic languages with exact BrierLM.

A synthetic language is a Markov chain over a small vocabulary of pronounceable words with an
end-of-document state: the token stream (every word one token, ``<|endoftext|>`` after every
document) is exactly the chain's output, so the Brier scores of the *true* model are known in
closed form and a trained model can be reported as a share of them.

Closed form. Let ``P(x | s)`` be the chain's next-token probabilities in state ``s`` (the last
``order`` tokens; EOS is a token and the state after it restarts the document). The two-sample
estimator has expectation ``E_y[2 P(y) - sum_x P(x)^2] = sum_x P(x)^2`` under the true model, so
the expected Brier-n of the true model in state ``s`` is the sum of squared n-gram
probabilities. Because every token leads to its own next state, this is a matrix power::

    b_n = (T o T)^n 1,      Brier-n = E_s[b_n(s)],     BrierLM = 100 (prod_n Brier-n)^(1/4)

with ``T`` the state transition matrix and ``T o T`` its elementwise square. The expectation is
taken under the stationary distribution ``pi`` of the chain (``pi^T (T o T)^n 1``) and, exactly,
over the states of the held-out positions that :func:`calm_models.evaluate.evaluate_brier_lm`
scores (every ``stride`` tokens inside each block, predicting the next 4 tokens from the block
prefix). As a numerical check the true model is also scored through the project's estimator
path: two sampled continuations per position, :func:`likelihood_free.brier_estimate` and
:class:`likelihood_free.BrierLM`.

CALM is scored twice: by that estimator on the observed text (as any model), and by
:func:`expected_brier`, which scores ``S`` of its own continuations per position with the
language's exact probabilities. Both estimate the same expected Brier-n at the held-out states;
the second has a several times smaller standard error (0.3% of the oracle instead of 2% with
the defaults), so it is the one to compare CALM variants with (``--samples``, default 16).

Languages (see :data:`LANGUAGES`): ``markov1`` (order 1, 128 words) and ``markov2`` (order 2,
64 words: the next word depends on the last two). Both have an oracle BrierLM between 10 and 30.

Usage (from the repository root)::

    python benchmarks/synthetic.py --language markov1 [--preset tiny] [--seed 0] \
        [--out runs/synthetic] [--calm-set calm.head.num_samples=32 ...] [--tag NAME]

A distilled one-step head (the ``distill`` stage, :mod:`calm_models.distill`) is trained from a
CALM variant of the same seed, named by its tag::

    python benchmarks/synthetic.py --language markov1 --models calm --calm-set calm.head.type=flow --tag flow
    python benchmarks/synthetic.py --language markov1 --models distill --teacher flow \
        --distill-set distill.loss=coupled calm.head.noise_size=128 --tag coupled

The student's training FLOPs and time in the table include its teacher's (and the teacher's
autoencoder's).

The command writes the language's train/validation JSONL files and word-level
``tokenizer.json``, trains the token baseline (stage ``ar``) and CALM (stage ``autoencoder``,
then ``calm`` on it) through :func:`calm_models.train.train` with the preset's configuration
(``--ar-set``/``--ae-set``/``--calm-set`` add dotted overrides as on the command line of
``python -m calm_models.train``), evaluates BrierLM on the held-out text and writes
``results.json`` and ``results.md``: the oracle, the baseline and CALM, each as a share of the
oracle, with steps, training FLOPs and wall time. Finished runs (a ``final.json``) are reused.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # standalone run: make the project importable
    sys.path.insert(0, str(_ROOT))

from likelihood_free.brier import BrierLM, BrierLMResult, brier_estimate  # noqa: E402

EOS = "<|endoftext|>"
EOS_ID = 0  # token id of EOS; words are 1..V
MAX_ORDER = 4

# Axis key: S states, V tokens (EOS + words), P positions, n n-gram order, B parallel chains.


# ----------------------------------------------------------------------------------------------
# Languages
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LanguageSpec:
    """Parameters of a random Markov language (everything is drawn from ``seed``).

    Attributes:
        order: Tokens of context that determine the next token (1 or 2).
        num_words: Vocabulary size without EOS.
        successors: ``(min, max)`` size of the set of words that may follow a word.
        concentration: Dirichlet parameter of the transition weights (small: peaked).
        end_prob: Probability that a document ends after any word.
        start_words: Number of words a document may start with.
        seed: Seed of the language (not of training).
    """

    order: int
    num_words: int
    successors: tuple[int, int]
    concentration: float
    end_prob: float
    start_words: int
    seed: int


#: The benchmark's languages.
LANGUAGES = {
    "markov1": LanguageSpec(
        order=1, num_words=128, successors=(2, 5), concentration=0.5, end_prob=0.05, start_words=16, seed=1
    ),
    "markov2": LanguageSpec(
        order=2, num_words=64, successors=(3, 6), concentration=0.3, end_prob=0.05, start_words=16, seed=2
    ),
}


def make_words(num_words: int, rng: np.random.Generator) -> list[str]:
    """``num_words`` distinct pronounceable words of two or three consonant-vowel syllables."""
    consonants, vowels = list("bdfgklmnprstvz"), list("aeiou")
    words: set[str] = set()
    while len(words) < num_words:
        syllables = rng.integers(2, 4)
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words)


@dataclass
class MarkovLanguage:
    """A Markov chain over tokens ``0 .. V-1`` (0 is EOS) whose states are the last ``order`` tokens.

    Attributes:
        words: Token strings; ``words[0]`` is EOS.
        order: Context length of a state.
        states: ``(S, order)`` token ids of every reachable state; state 0 is all-EOS (the start).
        probs: ``(S, V)`` next-token probabilities.
        next_state: ``(S, V)`` state after emitting each token (-1 where the probability is 0).
    """

    words: list[str]
    order: int
    states: np.ndarray
    probs: np.ndarray
    next_state: np.ndarray

    def __post_init__(self) -> None:
        v = len(self.words)
        self._lookup = np.full(v**self.order, -1, dtype=np.int64)  # flat context -> state id
        self._lookup[self._flat(self.states)] = np.arange(len(self.states))
        cum = np.cumsum(self.probs, axis=1)
        self._cum = cum / cum[:, -1:]  # exactly 1.0 from the last non-zero entry on

    @property
    def vocab_size(self) -> int:
        """``V``: EOS plus the words."""
        return len(self.words)

    def _flat(self, context: np.ndarray) -> np.ndarray:
        flat = np.zeros(context.shape[:-1], dtype=np.int64)
        for j in range(self.order):
            flat = flat * self.vocab_size + context[..., j]
        return flat

    def state_of(self, context: np.ndarray) -> np.ndarray:
        """State ids ``(...)`` of token contexts ``(..., order)``.

        Raises:
            ValueError: If a context is not a reachable state of the chain.
        """
        ids = self._lookup[self._flat(np.asarray(context, dtype=np.int64))]
        if (ids < 0).any():
            raise ValueError("a context is not a state of the chain (text not from this language?)")
        return ids

    # -- exact quantities ----------------------------------------------------------------------
    def transition_matrix(self) -> np.ndarray:
        """``(S, S)`` state transition probabilities ``T``."""
        t = np.zeros((len(self.states),) * 2)
        rows, toks = np.nonzero(self.next_state >= 0)
        np.add.at(t, (rows, self.next_state[rows, toks]), self.probs[rows, toks])
        return t

    def stationary(self) -> np.ndarray:
        """``(S,)`` stationary distribution ``pi`` of the state chain (``pi T = pi``)."""
        t = self.transition_matrix()
        s = len(t)
        # pi (T - I) = 0 with sum(pi) = 1, solved in the least-squares sense
        a = np.vstack([t.T - np.eye(s), np.ones((1, s))])
        b = np.zeros(s + 1)
        b[-1] = 1.0
        pi = np.linalg.lstsq(a, b, rcond=None)[0]
        return np.clip(pi, 0.0, None) / np.clip(pi, 0.0, None).sum()

    def brier_by_state(self, max_order: int = MAX_ORDER) -> np.ndarray:
        """``(S, n)``: expected Brier-1..n of the true model in each state, ``(T o T)^n 1``."""
        t2 = self.transition_matrix() ** 2
        out = np.empty((len(self.states), max_order))
        b = np.ones(len(self.states))
        for n in range(max_order):
            b = t2 @ b
            out[:, n] = b
        return out

    def ngram_probs(self, states: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """``(..., n)`` true probabilities ``P(y_{1:j} | s)`` of the target prefixes ``(..., n)``."""
        out = np.empty(targets.shape)
        state, p = states.copy(), np.ones(states.shape)
        for j in range(targets.shape[-1]):
            y = targets[..., j]
            p = p * self.probs[state, y]
            out[..., j] = p
            state = np.where(p > 0, self.next_state[state, y], 0)
        return out

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, states: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
        """``(B, length)`` tokens continuing each of the states ``(B,)``."""
        out = np.empty((len(states), length), dtype=np.int64)
        state = np.asarray(states, dtype=np.int64)
        for t in range(length):
            u = rng.random(len(state))
            tok = (self._cum[state] <= u[:, None]).sum(axis=1)  # inverse CDF (B,)
            out[:, t] = tok
            state = self.next_state[state, tok]
        return out

    def documents(self, num_tokens: int, rng: np.random.Generator, chains: int = 1024) -> list[np.ndarray]:
        """Whole documents (word ids, no EOS) holding at least ``num_tokens`` tokens with EOS.

        Documents are independent (the chain restarts after EOS), so ``chains`` of them are drawn
        at once, each run from the start state until its EOS. None is cut short or dropped:
        keeping only the documents that end inside a fixed window would favour short ones.
        """
        docs: list[np.ndarray] = []
        total = 0
        while total < num_tokens:
            state = np.zeros(chains, dtype=np.int64)
            active = np.ones(chains, dtype=bool)
            steps = []
            while active.any():
                u = rng.random(chains)
                tok = np.where(active, (self._cum[state] <= u[:, None]).sum(axis=1), EOS_ID)  # (B,)
                steps.append(tok)
                state = np.where(active, self.next_state[state, tok], 0)
                active &= tok != EOS_ID
            stream = np.stack(steps, axis=1)  # (B, longest document + 1)
            for row, end in zip(stream, (stream == EOS_ID).argmax(axis=1), strict=True):
                docs.append(row[:end])
                total += end + 1
        return docs


def make_language(name: str) -> MarkovLanguage:
    """Build a language of :data:`LANGUAGES` (deterministic).

    Order 1: each word has its own successor set and Dirichlet weights; EOS follows any word
    with ``end_prob`` and is followed by one of ``start_words`` words. Order 2: the successor set
    belongs to the last word, the weights over it to the last *two* words (every pair has its
    own draw), so the previous word changes the prediction.

    Raises:
        ValueError: For an unknown name.
    """
    if name not in LANGUAGES:
        raise ValueError(f"unknown language {name!r}; valid languages: {sorted(LANGUAGES)}")
    spec = LANGUAGES[name]
    rng = np.random.default_rng(spec.seed)
    words = [EOS, *make_words(spec.num_words, rng)]
    v = len(words)
    lo, hi = spec.successors
    support = [
        rng.choice(np.arange(1, v), size=rng.integers(lo, hi + 1), replace=False) for _ in range(v)
    ]  # successor set of each word (support[0] unused)
    start = np.zeros(v)
    start[rng.choice(np.arange(1, v), size=spec.start_words, replace=False)] = rng.dirichlet(
        np.full(spec.start_words, 1.0)
    )

    def row(last: int) -> np.ndarray:
        if last == EOS_ID:
            return start
        p = np.zeros(v)
        p[support[last]] = (1.0 - spec.end_prob) * rng.dirichlet(np.full(len(support[last]), spec.concentration))
        p[EOS_ID] = spec.end_prob
        return p

    # breadth-first over reachable contexts; order 1 draws one row per word, order 2 one per pair
    first = (EOS_ID,) * spec.order
    index = {first: 0}
    states, rows = [first], []
    i = 0
    while i < len(states):
        ctx = states[i]
        if spec.order == 2 and ctx[-1] == EOS_ID:
            rows.append(start)  # a document starts the same way whatever came before
        else:
            rows.append(row(ctx[-1]))
        for tok in np.flatnonzero(rows[-1]):
            nxt = (*ctx[1:], int(tok))
            if nxt not in index:
                index[nxt] = len(states)
                states.append(nxt)
        i += 1
    probs = np.stack(rows)
    next_state = np.full(probs.shape, -1, dtype=np.int64)
    for s, ctx in enumerate(states):
        for tok in np.flatnonzero(probs[s]):
            next_state[s, tok] = index[(*ctx[1:], int(tok))]
    return MarkovLanguage(words, spec.order, np.array(states, dtype=np.int64), probs, next_state)


# ----------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------


def brier_lm_value(brier: np.ndarray) -> float:
    """``100 (prod_n Brier-n)^(1/n)`` of mean Brier scores ``(n,)``."""
    return float(100.0 * np.prod(np.clip(brier, 0.0, None)) ** (1.0 / len(brier)))


def stationary_oracle(lang: MarkovLanguage, max_order: int = MAX_ORDER) -> dict:
    """Expected Brier-1..n and BrierLM of the true model under the stationary distribution."""
    brier = lang.stationary() @ lang.brier_by_state(max_order)
    return {"brier": brier.tolist(), "brier_lm": brier_lm_value(brier)}


def evaluation_states(
    lang: MarkovLanguage, blocks: np.ndarray, stride: int, max_order: int = MAX_ORDER
) -> tuple[np.ndarray, np.ndarray]:
    """States ``(b, P)`` and targets ``(b, P, n)`` of the positions ``evaluate_brier_lm`` scores."""
    starts = np.arange(stride, blocks.shape[1] - max_order + 1, stride)  # as evaluation_starts
    context = blocks[:, starts[:, None] + np.arange(-lang.order, 0)]  # (b, P, order)
    targets = blocks[:, starts[:, None] + np.arange(max_order)]  # (b, P, n)
    return lang.state_of(context), targets


def _result(values: np.ndarray, max_order: int = MAX_ORDER) -> BrierLMResult:
    metric = BrierLM(max_order=max_order)
    metric.update(torch.as_tensor(values, dtype=torch.float64))
    return metric.compute()


def held_out_oracle(lang: MarkovLanguage, blocks: np.ndarray, stride: int, seed: int = 0) -> dict:
    """The true model on the exact held-out positions, three ways (each with standard errors).

    * ``expected``: ``b_n(s)`` averaged over the positions' states (the closed form there);
    * ``exact``: the true model's exact estimate ``2 P(y) - b_n(s)`` on the observed targets;
    * ``sampled``: the project's estimator path, two continuations sampled from the chain per
      position, :func:`~likelihood_free.brier_estimate` and :class:`~likelihood_free.BrierLM`.
    """
    states, targets = evaluation_states(lang, blocks, stride)
    b = lang.brier_by_state()[states]  # (b, P, n)
    exact = 2.0 * lang.ngram_probs(states, targets) - b
    rng = np.random.default_rng(seed)
    flat = states.reshape(-1)
    x1 = lang.sample(flat, MAX_ORDER, rng).reshape(targets.shape)
    x2 = lang.sample(flat, MAX_ORDER, rng).reshape(targets.shape)
    sampled = brier_estimate(torch.as_tensor(x1), torch.as_tensor(x2), torch.as_tensor(targets))
    return {
        name: _result(values).to_dict() for name, values in (("expected", b), ("exact", exact), ("sampled", sampled))
    }


# ----------------------------------------------------------------------------------------------
# Files: text and a word-level tokenizer
# ----------------------------------------------------------------------------------------------


def word_tokenizer(lang: MarkovLanguage):
    """A ``tokenizers`` WordLevel tokenizer with id ``i`` = token ``i`` of the chain (EOS = 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(lang.words)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS])
    return tok


def write_data(name: str, data_dir: Path, train_tokens: int, valid_tokens: int) -> dict[str, Path]:
    """Write ``train.jsonl``, ``valid.jsonl`` (one document per line) and ``tokenizer.json``.

    The text is a function of the language alone (not of the training seed); existing files are
    kept.
    """
    paths = {k: data_dir / f"{k}.jsonl" for k in ("train", "valid")}
    paths["tokenizer"] = data_dir / "tokenizer.json"
    if all(p.exists() for p in paths.values()):
        return paths
    lang = make_language(name)
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(LANGUAGES[name].seed + 1000)
    for split, count in (("train", train_tokens), ("valid", valid_tokens)):
        docs = lang.documents(count, rng)
        tmp = paths[split].with_suffix(".tmp")
        with tmp.open("w") as f:
            for doc in docs:
                f.write(json.dumps({"text": " ".join(lang.words[i] for i in doc)}) + "\n")
        tmp.replace(paths[split])
    word_tokenizer(lang).save(str(paths["tokenizer"]))
    return paths


# ----------------------------------------------------------------------------------------------
# Training and evaluation through the project's entry points
# ----------------------------------------------------------------------------------------------


def stage_config(stage: str, preset_name: str, data: dict[str, Path], run_dir: Path, overrides: list[str], **run):
    """The preset's config of ``stage`` on the language's files, ``run`` settings (``seed``,
    ``device``, ``num_threads``...), then the dotted ``overrides`` as on the training command line."""
    from calm_models.config import TrainConfig, load_config, preset

    cfg = preset(preset_name, stage)
    files = {"train_files": [str(data["train"])], "valid_files": [str(data["valid"])]}
    cfg.data = replace(cfg.data, **files, tokenizer=str(data["tokenizer"]), max_train_bytes=None, max_valid_bytes=None)
    cfg.run = replace(cfg.run, out_dir=str(run_dir), **run)
    return load_config(TrainConfig, preset=cfg, overrides=[f"stage={stage}", *overrides])


def train_once(cfg) -> None:
    """Train the run unless its newest checkpoint has reached ``cfg.run.steps`` (resumes otherwise)."""
    from calm_models import checkpoint as ckpt
    from calm_models.train import train

    latest = ckpt.latest_checkpoint(cfg.run.out_dir)
    if latest is None or int(ckpt.read_meta(latest)["step"]) < cfg.run.steps:
        train(cfg, resume=latest is not None)


def run_flops(run_dir: Path) -> dict:
    """Steps, tokens, wall time and training FLOPs of a run's newest checkpoint."""
    from calm_models import checkpoint as ckpt
    from calm_models.runs import load_run

    loaded = load_run(run_dir)
    state = torch.load(loaded.checkpoint / ckpt.STATE_FILE, weights_only=True)["train_state"]
    per_token = loaded.model.flops_per_token(loaded.config.data.block_len)["train"]
    tokens = int(state["tokens"])
    return {
        "steps": int(state["step"]),
        "tokens": tokens,
        "train_flops": per_token * tokens,
        "time_s": float(state["elapsed"]),
    }


def eval_blocks(run_dir: Path, max_blocks: int) -> torch.Tensor:
    """The run's held-out validation blocks ``(b, L)``, chosen by the project's one rule
    (:func:`calm_models.evaluate.held_out_batches`: whole blocks only, since the padded tail is
    not text of the language; all of them with the default ``max_blocks``)."""
    from calm_models.evaluate import held_out_batches
    from calm_models.runs import load_run

    return torch.cat([b.tokens for b in held_out_batches(load_run(run_dir).blocks(), max_blocks, 256)])


def brier_of(run_dir: Path, blocks: torch.Tensor, stride: int, seed: int, device: str = "cpu") -> dict:
    """BrierLM with standard errors of a run's model on ``blocks`` (positions every ``stride``)."""
    from calm_models.evaluate import score_run

    return score_run(run_dir, list(blocks.split(32)), stride=stride, seed=seed, device=device).to_dict()


def expected_brier(
    model, lang: MarkovLanguage, blocks: torch.Tensor, stride: int, seed: int, num_samples: int = 16
) -> BrierLMResult:
    r"""Brier-1..4 of a model at the held-out states, its own samples scored with the true ``P``.

    Per position with state ``s`` and ``S`` independent continuations ``x_1..x_S ~ Q``, the
    n-gram estimate

    .. math:: \frac{2}{S}\sum_i P(x_{i,1:n} \mid s) - \frac{1}{S(S-1)}\sum_{i \neq j} 1\{x_{i,1:n} = x_{j,1:n}\}

    has expectation ``2 sum_x P Q - sum_x Q^2``, the expectation over ``y ~ P`` of the two-sample
    estimate ``1{x1=y} + 1{x2=y} - 1{x1=x2}`` at that state: the quantity that :func:`brier_of`
    estimates, without the noise of the one observed target (only a synthetic language knows
    ``P``), so its standard error is several times smaller. ``model`` needs
    ``sample_continuations(tokens (b, L), num_samples=S, generator=g) -> (draws (S, b, P', 4),
    starts (P',))`` with the scored positions among ``starts`` (CALM's chunk boundaries).

    A token model (one with ``brier_terms``, :class:`calm_models.baseline.TokenLM`) knows its own
    ``Q``: each of its ``S`` samples scores ``2 P(x) - Q(x)``, whose expectation is the same.
    """
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    states, _ = evaluation_states(lang, blocks.numpy(), stride)  # (b, P)
    starts = np.arange(stride, blocks.shape[1] - MAX_ORDER + 1, stride)
    values = []
    with torch.no_grad():
        for rows in torch.arange(len(blocks)).split(32):
            if hasattr(model, "brier_terms"):
                total = 0.0
                for _ in range(num_samples):
                    terms = model.brier_terms(
                        blocks[rows].to(device), torch.as_tensor(starts, device=device), generator=gen
                    )
                    x = terms.samples.cpu().numpy()  # (b, P, n)
                    total = total + 2.0 * lang.ngram_probs(states[rows.numpy()], x) - terms.sample_prob.cpu().numpy()
                values.append(total / num_samples)
                continue
            draws, at = model.sample_continuations(blocks[rows].to(device), num_samples=num_samples, generator=gen)
            keep = torch.as_tensor(np.searchsorted(at.cpu().numpy(), starts))  # the scored positions
            x = draws[:, :, keep].cpu().numpy()  # (S, b, P, n)
            p = lang.ngram_probs(np.broadcast_to(states[rows.numpy()], x.shape[:-1]), x).mean(0)  # (b, P, n)
            same = np.cumprod(x[:, None] == x[None, :], axis=-1)  # (S, S, b, P, n): first n tokens equal
            values.append(2.0 * p - (same.sum((0, 1)) - num_samples) / (num_samples * (num_samples - 1)))
    return _result(np.concatenate(values))


def expected_brier_of(
    run_dir: Path, lang: MarkovLanguage, blocks: torch.Tensor, stride: int, seed: int, samples: int, device: str = "cpu"
) -> dict:
    """:func:`expected_brier` of a run's model, as a dict with ``samples``."""
    from calm_models.runs import load_run

    result = expected_brier(load_run(run_dir, device=device).model, lang, blocks, stride, seed, samples)
    return {**result.to_dict(), "samples": samples}


def share(entry: dict, oracle: dict) -> dict:
    """Brier-n and BrierLM of ``entry`` as shares of the oracle's (with the entry's SE)."""
    keys = [f"brier{j}" for j in range(1, MAX_ORDER + 1)] + ["brier_lm"]
    return {
        k: v
        for key in keys
        for k, v in ((key, entry[key] / oracle[key]), (f"{key}_se", entry[f"{key}_se"] / oracle[key]))
    }


def _tag(tag: str | None, overrides: list[str]) -> str:
    if tag or not overrides:
        return tag or ""
    import hashlib

    return hashlib.sha1(" ".join(overrides).encode()).hexdigest()[:8]


def run_seed(args, data: dict[str, Path], root: Path, seed: int) -> dict:
    """Train and evaluate the requested models of one seed; returns their entries and the oracle."""
    run = {"seed": seed, "device": args.device, "num_threads": args.threads, "progress": not args.quiet}
    lang = make_language(args.language)
    seed_dir, models, blocks = root / f"seed{seed}", {}, None

    def finished(run_dir: Path, make) -> dict:
        path = run_dir / "final.json"
        if not path.exists():
            path.write_text(json.dumps(make(), indent=2))
        return json.loads(path.read_text())

    def evaluate(run_dir: Path, extra: dict) -> dict:
        return {**extra, **run_flops(run_dir), **brier_of(run_dir, blocks, args.stride, seed, args.device)}

    def with_expected(run_dir: Path, entry: dict, samples: int) -> None:
        """Add (once per sample count) the exact-P estimate to ``entry`` and its ``final.json``."""
        if args.samples and entry.get("expected", {}).get("samples") != samples:
            entry["expected"] = expected_brier_of(run_dir, lang, blocks, args.stride, seed, samples, args.device)
            (run_dir / "final.json").write_text(json.dumps(entry, indent=2))

    if "ar" in args.models:
        tag = _tag(None, args.ar_set)
        cfg = stage_config("ar", args.preset, data, seed_dir / ("ar" + (f"-{tag}" if tag else "")), args.ar_set, **run)
        train_once(cfg)
        blocks = eval_blocks(Path(cfg.run.out_dir), args.eval_blocks)
        ar_dir = Path(cfg.run.out_dir)
        models["baseline"] = finished(ar_dir, lambda: evaluate(ar_dir, {"overrides": args.ar_set}))
        # 2 P(x) - Q(x) per sample: fewer samples than CALM need
        with_expected(ar_dir, models["baseline"], max(1, args.samples // 4))
    if "calm" in args.models:
        tag = _tag(None, args.ae_set)
        ae_cfg = stage_config(
            "autoencoder",
            args.preset,
            data,
            seed_dir / ("autoencoder" + (f"-{tag}" if tag else "")),
            args.ae_set,
            **run,
        )
        train_once(ae_cfg)
        ae_dir = Path(ae_cfg.run.out_dir)
        ae = run_flops(ae_dir)
        tag = _tag(args.tag, args.calm_set)
        cfg = stage_config(
            "calm",
            args.preset,
            data,
            seed_dir / ("calm" + (f"-{tag}" if tag else "")),
            [*args.calm_set, f"autoencoder_path={ae_dir}"],
            **run,
        )
        train_once(cfg)
        run_dir = Path(cfg.run.out_dir)
        blocks = eval_blocks(run_dir, args.eval_blocks) if blocks is None else blocks

        def make() -> dict:
            entry = evaluate(run_dir, {"overrides": args.calm_set, "ae_overrides": args.ae_set})
            entry.update(ae_steps=ae["steps"], ae_train_flops=ae["train_flops"], ae_time_s=ae["time_s"])
            entry["train_flops"] += ae["train_flops"]
            return entry

        models["calm"] = finished(run_dir, make)
        with_expected(run_dir, models["calm"], args.samples)
    if "distill" in args.models:  # a one-step student of a trained CALM variant (--teacher TAG)
        teacher_dir = seed_dir / f"calm-{args.teacher}"
        teacher = json.loads((teacher_dir / "final.json").read_text())
        tag = _tag(args.tag, args.distill_set)
        cfg = stage_config(
            "distill",
            args.preset,
            data,
            seed_dir / (f"distill-{args.teacher}" + (f"-{tag}" if tag else "")),
            [*args.distill_set, f"teacher_path={teacher_dir}"],
            **run,
        )
        train_once(cfg)
        run_dir = Path(cfg.run.out_dir)
        blocks = eval_blocks(run_dir, args.eval_blocks) if blocks is None else blocks

        def make_student() -> dict:
            entry = evaluate(run_dir, {"overrides": args.distill_set, "teacher": args.teacher})
            # FLOPs and time include the teacher's (and its autoencoder's): the table's totals
            entry.update(teacher_train_flops=teacher["train_flops"], distill_train_flops=entry["train_flops"])
            entry.update(ae_time_s=teacher.get("ae_time_s", 0.0) + teacher["time_s"], ae_steps=teacher["steps"])
            entry["train_flops"] += teacher["train_flops"]
            return entry

        models["distill"] = finished(run_dir, make_student)
        with_expected(run_dir, models["distill"], args.samples)
    oracle = held_out_oracle(lang, blocks.numpy(), args.stride, seed=seed)
    for entry in models.values():
        entry["share"] = share(entry, oracle["expected"])
        if "expected" in entry:
            entry["expected"]["share"] = share(entry["expected"], oracle["expected"])
    return {"seed": seed, "oracle": oracle, "models": models}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _pm(value: float, se: float | None, digits: int = 4) -> str:
    if se is None or math.isnan(se):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def render(results: dict) -> str:
    """Markdown tables: oracle, then every model of every seed, absolute and as shares."""
    st = results["stationary_oracle"]
    lines = [
        f"Language `{results['language']}` ({results['num_states']} states, vocabulary {results['vocab_size']}), "
        f"preset `{results['preset']}`, positions every {results['stride']} tokens in {results['eval_blocks']} "
        f"held-out blocks of {results['block_len']} tokens. Command: `{results['command']}`.",
        "",
        "| model | seed | steps | train FLOPs | train time | Brier-1 | Brier-2 | Brier-3 | Brier-4 | BrierLM | share of oracle |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| oracle, stationary (closed form) | | | | | "
        + " | ".join(f"{b:.4f}" for b in st["brier"])
        + f" | {st['brier_lm']:.2f} | |",
    ]
    rows = (
        ("oracle, held-out states (closed form)", "expected"),
        ("true model, exact P on held-out targets", "exact"),
        ("true model, sampled two-sample estimator", "sampled"),
    )
    for run in results["runs"]:
        o = run["oracle"]
        for label, key in rows:
            r, ratio = o[key], o[key]["brier_lm"] / o["expected"]["brier_lm"]
            cells = " | ".join(_pm(r[f"brier{j}"], r[f"brier{j}_se"]) for j in range(1, 5))
            lines.append(
                f"| {label} | {run['seed']} | | | | {cells} | {_pm(r['brier_lm'], r['brier_lm_se'], 2)} | {ratio:.3f} |"
            )
        for name, e in run["models"].items():
            label = {"baseline": "token baseline", "distill": f"CALM K=4 distilled from {e.get('teacher')}"}.get(
                name, "CALM K=4"
            ) + (f" ({', '.join(e['overrides'])})" if e.get("overrides") else "")
            s, minutes = e["share"], (e["time_s"] + e.get("ae_time_s", 0.0)) / 60
            extra = " teacher" if name == "distill" else " AE"
            steps = f"{e['steps']}" + (f" (+{e['ae_steps']}{extra})" if "ae_steps" in e else "")
            cells = " | ".join(
                f"{_pm(e[f'brier{j}'], e[f'brier{j}_se'])} ({100 * s[f'brier{j}']:.0f}%)" for j in range(1, 5)
            )
            lines.append(
                f"| {label} | {run['seed']} | {steps} | {e['train_flops']:.2e} | {minutes:.1f} min | {cells} | "
                f"{_pm(e['brier_lm'], e['brier_lm_se'], 2)} | {100 * s['brier_lm']:.1f}% ± {100 * s['brier_lm_se']:.1f}% |"
            )
            if x := e.get("expected"):
                xs = x["share"]
                cells = " | ".join(
                    f"{_pm(x[f'brier{j}'], x[f'brier{j}_se'])} ({100 * xs[f'brier{j}']:.0f}%)" for j in range(1, 5)
                )
                lines.append(
                    f"| {label}, its {x['samples']} samples per position scored with the true P | {run['seed']} "
                    f"| | | | {cells} | {_pm(x['brier_lm'], x['brier_lm_se'], 2)} | "
                    f"{100 * xs['brier_lm']:.1f}% ± {100 * xs['brier_lm_se']:.1f}% |"
                )
    lines += [
        "",
        "Shares are of the closed-form oracle on the same held-out positions (the model's standard error "
        "divided by the oracle). CALM's FLOPs and time include its autoencoder's training. The rows 'scored with "
        "the true P' estimate the same expected Brier-n from the model's own samples and the language's exact "
        "probabilities (`expected_brier_of`): unbiased, with a several times smaller standard error.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--language", default="markov1", choices=sorted(LANGUAGES))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="training seed(s)")
    parser.add_argument("--out", type=Path, default=Path("runs/synthetic"))
    parser.add_argument("--models", nargs="+", default=["ar", "calm"], choices=["ar", "calm", "distill"])
    parser.add_argument("--ar-set", nargs="*", default=[], help="dotted overrides of the ar stage")
    parser.add_argument("--ae-set", nargs="*", default=[], help="overrides of the autoencoder stage")
    parser.add_argument("--calm-set", nargs="*", default=[], help="overrides of the calm stage")
    parser.add_argument("--tag", default=None, help="name of the CALM variant (default: a hash of --calm-set)")
    parser.add_argument("--teacher", default=None, help="distill: the tag of the trained CALM variant that teaches")
    parser.add_argument("--distill-set", nargs="*", default=[], help="overrides of the distill stage")
    parser.add_argument("--train-tokens", type=int, default=4_000_000)
    parser.add_argument("--valid-tokens", type=int, default=200_000)
    parser.add_argument("--eval-blocks", type=int, default=4096)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16, help="CALM samples per position scored with the true P")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads:  # evaluation too, not only training (several runs share a CPU)
        torch.set_num_threads(args.threads)
    from calm_models.config import ConfigError, preset

    if "distill" in args.models and not args.teacher:
        parser.error("--models distill needs --teacher TAG (a CALM variant trained with --tag TAG)")
    root = args.out / args.language
    data = write_data(args.language, root / "data", args.train_tokens, args.valid_tokens)
    lang = make_language(args.language)
    try:
        runs = [run_seed(args, data, root, seed) for seed in args.seed]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    block_len = preset(args.preset, "calm").data.block_len
    positions = len(range(args.stride, block_len - MAX_ORDER + 1, args.stride))
    results = {
        "language": args.language,
        "spec": LANGUAGES[args.language].__dict__,
        "num_states": len(lang.states),
        "vocab_size": lang.vocab_size,
        "preset": args.preset,
        "stride": args.stride,
        "block_len": block_len,
        "eval_blocks": int(runs[0]["oracle"]["expected"]["count"]) // positions,
        "command": "python benchmarks/synthetic.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "stationary_oracle": stationary_oracle(lang),
        "runs": runs,
    }
    tag = _tag(args.tag, args.distill_set if args.models == ["distill"] else args.calm_set)
    tag = f"distill-{args.teacher}" + (f"-{tag}" if tag else "") if args.models == ["distill"] else tag
    name = "results" + (f"-{tag}" if tag else "")
    (root / f"{name}.json").write_text(json.dumps(results, indent=2))
    text = render(results)
    (root / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
