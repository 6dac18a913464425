"""The performance-compute experiment: BrierLM of token baselines and CALM against training and inference FLOPs.

On one corpus, with one shared tokenizer, the command trains

* token Transformer baselines at three sizes (S, M, L; ``BACKBONES``);
* an autoencoder for each chunk size K = 1, 2, 4, 8 (latent size ``32 K``) and a CALM with the
  M backbone on each (the tiny preset's energy head);

every model with a constant learning rate after warm-up (as in the CALM paper) up to the largest
training budget, saving a checkpoint when it reaches each budget. Budgets count *total* training
FLOPs: CALM's include its autoencoder's training, so the comparison is at equal compute. Every
checkpoint is scored with BrierLM (positions every 8 tokens, with standard errors) on the same
held-out blocks. Corpora:

* ``stdlib``: the main job's default corpus, the Python standard library's own source (tiny
  preset: 2048-token BPE, 3 MB of training text, held-out files);
* ``markov1`` / ``markov2``: the synthetic languages of ``benchmarks/synthetic.py``, whose exact
  BrierLM is known (results are also given as shares of it).

Usage (from the repository root; about 2.3 CPU hours for ``stdlib``, 1.2 for a synthetic language)::

    python benchmarks/frontier.py --corpus stdlib --out runs/frontier
    python benchmarks/frontier.py --corpus markov1 --out runs/frontier   # (in parallel: 2 cores)
    python benchmarks/frontier.py --report --out runs/frontier --docs docs/_generated

FLOPs are counted analytically (``model.flops_per_token``: 2 per multiply-add of every linear layer
and the attention scores, training = 3 x forward; CALM adds the frozen encoder's forward for the
energy-loss targets). Finished budgets are not trained again, so an interrupted sweep continues.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
for path in (_ROOT, _ROOT / "benchmarks"):  # standalone run: the project and synthetic.py
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import synthetic  # noqa: E402

from calm_models import checkpoint as ckpt  # noqa: E402
from calm_models.autoencoder import robustness_table  # noqa: E402
from calm_models.config import BackboneConfig, BaselineConfig, preset  # noqa: E402
from calm_models.data import prepare_data  # noqa: E402
from calm_models.evaluate import held_out_batches, score_run  # noqa: E402
from calm_models.runs import build_model, load_run  # noqa: E402
from calm_models.train import train  # noqa: E402

#: Backbones of the baselines; CALM uses ``M`` (the tiny preset's backbone).
BACKBONES = {
    "S": BackboneConfig(hidden_size=192, num_layers=3, num_heads=3, ffn_size=512, max_seq_len=256),
    "M": BackboneConfig(hidden_size=256, num_layers=4, num_heads=4, ffn_size=704, max_seq_len=256),
    "L": BackboneConfig(hidden_size=384, num_layers=6, num_heads=6, ffn_size=1024, max_seq_len=256),
}
CHUNK_SIZES = (1, 2, 4, 8)
CORPORA = ("stdlib", "markov1", "markov2")
STRIDE = 8
#: Budgets (total training FLOPs) of the published tables: every model above zero from the second
#: on; the whole sweep takes about 2.3 (stdlib) and 1.2 (markov1) CPU hours, one thread per model.
DEFAULT_BUDGETS = {"stdlib": [1.2e13, 2.4e13, 4e13, 6e13], "markov1": [1.2e13, 1.8e13, 2.4e13]}
DEFAULT_BUDGETS["markov2"] = DEFAULT_BUDGETS["markov1"]


def model_names() -> list[str]:
    """The language models of the sweep, in training order."""
    return [f"ar-{s}" for s in BACKBONES] + [f"calm-k{k}" for k in CHUNK_SIZES]


def base_config(stage: str, corpus: str, out: Path, args):
    """The tiny preset of ``stage`` on the corpus, with the sweep's run settings."""
    cfg = preset("tiny", stage)
    if corpus != "stdlib":
        files = synthetic.write_data(corpus, out / "data", args.train_tokens, args.valid_tokens)
        data = {"train_files": [str(files["train"])], "valid_files": [str(files["valid"])]}
        cfg.data = replace(cfg.data, **data, max_train_bytes=None, max_valid_bytes=None)
    cfg.data = replace(cfg.data, tokenizer=str(out / "tokenizer.json"), cache_dir=args.cache_dir)
    cfg.schedule = replace(cfg.schedule, kind="constant")
    settings = dict(seed=args.seed, device=args.device, num_threads=args.threads, progress=not args.quiet)
    cfg.run = replace(cfg.run, **settings, eval_every=0, eval_batches=1, save_every=0, keep_last=8, max_time_s=None)
    return cfg


def shared_tokenizer(corpus: str, out: Path, args) -> Path:
    """Train the corpus's BPE (``stdlib``) or write the synthetic word-level one, once."""
    path = out / "tokenizer.json"
    if not path.exists():
        if corpus == "stdlib":
            data = replace(preset("tiny", "ar").data, cache_dir=args.cache_dir)
            prepare_data(data, out / "tokenizer-run", chunk_size=1, progress=not args.quiet)
            shutil.copy(out / "tokenizer-run" / "tokenizer.json", path)
        else:
            shutil.copy(
                synthetic.write_data(corpus, out / "data", args.train_tokens, args.valid_tokens)["tokenizer"], path
            )
    return path


def _train_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / ckpt.STATE_FILE, weights_only=True)["train_state"]


def train_to(cfg, steps: int) -> Path:
    """Train (resuming) until ``steps`` and return the checkpoint of that step."""
    run_dir = Path(cfg.run.out_dir)
    target = run_dir / "checkpoints" / f"step_{steps:06d}"
    if not (target / ckpt.META_FILE).exists():
        latest = ckpt.latest_checkpoint(run_dir)
        train(replace(cfg, run=replace(cfg.run, steps=steps)), resume=latest is not None)
    return target


def lm_config(name: str, corpus: str, out: Path, args, ae_dirs: dict[int, Path]):
    """The config of one language model of the sweep (CALM on the autoencoder of its K)."""
    if name.startswith("ar-"):
        cfg = base_config("ar", corpus, out, args)
        baseline = BaselineConfig(**asdict(BACKBONES[name[3:]]))
        return replace(cfg, baseline=baseline, run=replace(cfg.run, out_dir=str(out / name)))
    k = int(name[len("calm-k") :])
    cfg = base_config("calm", corpus, out, args)
    ae = replace(cfg.autoencoder, chunk_size=k, latent_size=32 * k)
    calm, run = replace(cfg.calm, backbone=BACKBONES["M"]), replace(cfg.run, out_dir=str(out / name))
    return replace(cfg, autoencoder=ae, calm=calm, autoencoder_path=str(ae_dirs[k]), run=run)


def held_out_blocks(run_dir: Path, max_blocks: int) -> torch.Tensor:
    """``max_blocks`` full validation blocks spread evenly over the split (the padded tail is left out).

    Not the first blocks: on ``stdlib`` the first held-out files are much harder than the rest
    (the token baseline's BrierLM on them was a fifth of that on the whole split)."""
    return torch.cat([b.tokens for b in held_out_batches(load_run(run_dir).blocks(), max_blocks, 256)])


def brier(checkpoint: Path, blocks: torch.Tensor, args, lang=None) -> dict:
    """BrierLM (two-sample estimator) and, on a synthetic language ``lang``, the exact-P estimate
    of the same quantity under ``"expected"`` (:func:`synthetic.expected_brier`: every model's 4
    samples per position scored with the true probabilities; about half the two-sample SE at twice
    its cost: CALM K = 1 rolls out four chunks per sample)."""
    run = load_run(checkpoint, device=args.device)
    out = score_run(run, list(blocks.split(32)), stride=STRIDE, seed=args.seed).to_dict()
    model = run.model
    if lang is not None:
        result = synthetic.expected_brier(model, lang, blocks, STRIDE, args.seed, num_samples=4)
        out["expected"] = {**result.to_dict(), "samples": 4}
    return out


def run_corpus(corpus: str, args) -> dict:
    """Train and score every model of one corpus; writes and returns ``<out>/<corpus>/results.json``."""
    out = args.out / corpus
    out.mkdir(parents=True, exist_ok=True)
    shared_tokenizer(corpus, out, args)
    wanted = set(args.only or model_names())
    ks = sorted({int(n[len("calm-k") :]) for n in wanted if n.startswith("calm-k")})
    given = args.budget or DEFAULT_BUDGETS[corpus]
    budgets = sorted(given) if len(given) > 1 else [given[0] * f for f in (0.25, 0.5, 1.0)]
    ae_dirs, ae_info = {}, {}
    for k in ks:  # autoencoders: the tiny preset's, with K tokens per vector and 32 K latents
        cfg = base_config("autoencoder", corpus, out, args)
        cfg = replace(cfg, autoencoder=replace(cfg.autoencoder, chunk_size=k, latent_size=32 * k))
        cfg = replace(cfg, run=replace(cfg.run, out_dir=str(out / f"ae-k{k}")))
        checkpoint = train_to(cfg, max(2, round(cfg.run.steps * args.ae_scale)))
        loaded, state = load_run(checkpoint), _train_state(checkpoint)
        per_token = loaded.model.flops_per_token(cfg.data.block_len)["train"]
        ae_dirs[k] = out / f"ae-k{k}"
        ae_info[k] = {"steps": state["step"], "train_flops": per_token * state["tokens"], "time_s": state["elapsed"]}
        table = robustness_table(loaded.model, list(held_out_blocks(checkpoint, 64).split(16)), sigmas=(0.0, 0.3))
        ae_info[k]["accuracy"] = {str(sigma): acc for sigma, acc in table.items()}
    blocks = None
    lang = None if corpus == "stdlib" else synthetic.make_language(corpus)
    results = {"corpus": corpus, "budgets": budgets, "autoencoders": ae_info, "runs": {}}
    for name in [n for n in model_names() if n in wanted]:
        cfg = lm_config(name, corpus, out, args, ae_dirs)
        k = cfg.chunk_size if name.startswith("calm") else 1
        ae_flops = ae_info[k]["train_flops"] if name.startswith("calm") else 0.0
        tokens_per_step = cfg.run.batch_size * cfg.run.grad_accum * cfg.data.block_len
        entry_path = out / name / "frontier.json"
        entry = json.loads(entry_path.read_text()) if entry_path.exists() else {"curve": []}
        done = {round(p["budget"]) for p in entry["curve"]}
        for budget in budgets:
            if round(budget) in done:
                continue
            if entry.get("flops") is None:  # per-token FLOPs of this model (built once, untrained)
                model = load_run(ae_dirs[k]).model if name.startswith("calm") else None
                model = build_model(cfg, _vocab(out), model)
                params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("autoencoder."))
                entry = {
                    "name": name,
                    "flops": model.flops_per_token(cfg.data.block_len),
                    "params": params,
                    "curve": [],
                }
            steps = max(1, math.ceil((budget - ae_flops) / (entry["flops"]["train"] * tokens_per_step)))
            print(f"== {corpus} {name}: budget {budget:.2e} -> {steps} steps", flush=True)
            checkpoint = train_to(cfg, steps)
            if blocks is None:
                blocks = held_out_blocks(checkpoint, args.eval_blocks)
            state = _train_state(checkpoint)
            t0 = time.perf_counter()
            point = {"budget": budget, "step": state["step"], "tokens": state["tokens"], "time_s": state["elapsed"]}
            point["train_flops"] = entry["flops"]["train"] * state["tokens"] + ae_flops
            scores = brier(checkpoint, blocks, args, lang)
            entry["curve"].append({**point, **scores, "eval_s": time.perf_counter() - t0})
            entry_path.write_text(json.dumps(entry, indent=1))
        results["runs"][name] = entry
    if corpus != "stdlib" and results["runs"]:
        blocks = held_out_blocks(out / next(iter(results["runs"])), args.eval_blocks) if blocks is None else blocks
        results["oracle"] = synthetic.held_out_oracle(lang, blocks.numpy(), STRIDE, seed=args.seed)["expected"]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _vocab(out: Path) -> int:
    from calm_models.data import TextTokenizer

    return TextTokenizer.load(out / "tokenizer.json").vocab_size


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _pm(value: float, se: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if se is None or math.isnan(se) else f"{value:.{digits}f} ± {se:.{digits}f}"


def _label(name: str) -> str:
    return f"Transformer {name[3:]}" if name.startswith("ar-") else f"CALM K={name[len('calm-k') :]}"


def _best(point: dict) -> dict:
    """A curve point's most precise BrierLM: the exact-P estimate on a synthetic language."""
    return point.get("expected", point)


def render(all_results: dict[str, dict], command: str) -> str:
    """Markdown: per corpus, BrierLM of every model at every budget (and shares of the oracle)."""
    lines = [
        f"Command: `{command}`. BrierLM at T = 1 on held-out blocks, positions every {STRIDE} tokens; on a "
        "synthetic language the models' own samples (4 per position) scored with the true "
        "probabilities, shares of the oracle in brackets.",
        "",
    ]
    for corpus, res in all_results.items():
        budgets, oracle = res["budgets"], res.get("oracle")
        title = (
            "standard-library source (the main job's corpus)"
            if corpus == "stdlib"
            else f"synthetic language `{corpus}`"
        )
        lines += [f"**{title}**" + (f" (oracle BrierLM {oracle['brier_lm']:.2f})" if oracle else "") + ":", ""]
        head = " | ".join(f"BrierLM at {b:.1e}" for b in budgets)
        lines += [
            f"| model | params | train FLOPs/token | inference FLOPs/token | {head} |",
            "|---|---|---|---|" + "---|" * len(budgets),
        ]
        for name, entry in res["runs"].items():
            cells = []
            for point in map(_best, entry["curve"]):
                cell = _pm(point["brier_lm"], point["brier_lm_se"])
                if oracle:
                    cell += f" ({100 * point['brier_lm'] / oracle['brier_lm']:.0f}%)"
                cells.append(cell)
            fl = entry["flops"]
            lines.append(
                f"| {_label(name)} | {entry['params'] / 1e6:.2f}M | {fl['train'] / 1e6:.1f}M | {fl['inference'] / 1e6:.2f}M | "
                + " | ".join(cells)
                + " |"
            )
        ae = res.get("autoencoders", {})
        if ae:
            lines += [
                "",
                "Autoencoders (training FLOPs counted in CALM's budget): "
                + ", ".join(
                    f"K={k}: {a['steps']} steps, {a['train_flops']:.1e} FLOPs, token accuracy "
                    f"{100 * a['accuracy']['0.0']:.2f}% at sigma 0 and {100 * a['accuracy']['0.3']:.2f}% at sigma 0.3"
                    for k, a in ae.items()
                )
                + ".",
            ]
        lines.append("")
    return "\n".join(lines)


def plots(all_results: dict[str, dict], out: Path) -> None:
    """``brier_vs_train_flops.png`` and ``brier_vs_inference_flops.png``: one panel per corpus."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for kind in ("train", "inference"):
        fig, axes = plt.subplots(1, len(all_results), figsize=(5.5 * len(all_results), 4.2), squeeze=False)
        for ax, (corpus, res) in zip(axes[0], all_results.items(), strict=True):
            for name, entry in res["runs"].items():
                curve = [{**p, **_best(p)} for p in entry["curve"]]
                if kind == "train":
                    xs = [p["train_flops"] for p in curve]
                else:
                    xs = [entry["flops"]["inference"]] * len(curve[-1:])
                    curve = curve[-1:]
                ys, es = (
                    [p["brier_lm"] for p in curve],
                    [0.0 if math.isnan(p["brier_lm_se"]) else p["brier_lm_se"] for p in curve],
                )
                style = "-o" if name.startswith("ar-") else "--s"
                ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=2, markersize=4, label=_label(name))
            if res.get("oracle"):
                ax.axhline(res["oracle"]["brier_lm"], color="grey", lw=0.8, ls=":", label="true model")
            ax.set(xscale="log", title=corpus, ylabel="BrierLM (held out)")
            if kind == "train":  # the budgets as ticks: log-scale minor labels overlap on a short range
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_xticks(res["budgets"], [f"{b:.1e}" for b in res["budgets"]])
            ax.set_xlabel(
                "training FLOPs (CALM: autoencoder included)" if kind == "train" else "inference FLOPs per token"
            )
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"brier_vs_{kind}_flops.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=CORPORA, default="stdlib")
    parser.add_argument("--report", action="store_true", help="only render every corpus's results.json under --out")
    parser.add_argument("--out", type=Path, default=Path("runs/frontier"))
    parser.add_argument(
        "--budget",
        type=float,
        nargs="+",
        default=None,
        help="training FLOPs budgets (one value: the largest, also 1/4 and 1/2 of it; default: DEFAULT_BUDGETS)",
    )
    parser.add_argument("--ae-scale", type=float, default=0.5, help="multiplies the autoencoders' steps")
    parser.add_argument("--only", nargs="*", default=None, help=f"models, of {model_names()}")
    parser.add_argument("--eval-blocks", type=int, default=512, help="held-out blocks of 64 tokens")
    parser.add_argument("--train-tokens", type=int, default=4_000_000, help="synthetic corpora: training tokens")
    parser.add_argument("--valid-tokens", type=int, default=200_000)
    parser.add_argument("--cache-dir", default=None, help="token cache (default: calm_models' own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--docs", type=Path, default=None, help="also copy results.md and the plots here")
    args = parser.parse_args(argv)
    if not args.report:
        run_corpus(args.corpus, args)
    found = {
        c: json.loads((args.out / c / "results.json").read_text())
        for c in CORPORA
        if (args.out / c / "results.json").exists()
    }
    if not found:
        print(f"error: no results.json under {args.out} (run a corpus first)", file=sys.stderr)
        return 2
    text = render(found, "python benchmarks/frontier.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    (args.out / "results.md").write_text(text)
    plots(found, args.out)
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        (args.docs / "frontier.md").write_text(text)
        for kind in ("train", "inference"):
            shutil.copy(args.out / f"brier_vs_{kind}_flops.png", args.docs / f"brier_vs_{kind}_flops.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
