"""The performance–compute experiment: does CALM beat the token baseline per FLOP?

One command trains, on the same text and with one shared BPE tokenizer,

* token Transformer baselines at three sizes (S, M, L);
* an autoencoder for each chunk size K = 1, 2, 4, 8 (latent size ``32 K``) and a CALM with the
  M backbone on each (energy head);
* for K = 4, CALM with the flow-matching and the diffusion head as well (issue 9: the three
  heads at equal training budget);

every model to the same training budget in FLOPs (counted analytically, see below). The last
2% of the training stream is held out. BrierLM with standard errors is evaluated on that
held-out text at four checkpoints of every run (the frontier curves), and at the end on it and
on every evaluation file (by default WikiText-103 validation and TinyStories, which differ in
domain from the public-domain training books). It then measures generation throughput of CALM
(K = 4) against the M baseline and writes ``results.json``, ``results.md`` and two plots:
BrierLM against training FLOPs and against inference FLOPs per token.

Usage (from the repository root; the CPU version takes about an hour on 2 cores)::

    python benchmarks/frontier.py                       # ../shared/data, runs/frontier
    python benchmarks/frontier.py --scale 50 --device cuda --out runs/frontier-gpu
    python benchmarks/frontier.py --only ar-M calm-k4   # a subset (reuses finished runs)

FLOPs: 2 per multiply-add of every linear layer, training = 3 x forward (forward + backward).
The token baseline counts backbone and output layer per token. CALM counts, per token, the
input compression, the backbone over ``L / K`` chunks and the head's ``N`` samples (all 3x) plus
the frozen encoder's forward for the energy-loss targets, all divided by ``K``; the
autoencoder's own training is added to CALM's total as a one-off cost (reported separately in
the table). Inference FLOPs per token are one forward of each (CALM: compression, backbone,
one head sample and the decoder, divided by ``K``). See ``calm_models.model.CALM.flops_per_token``.

Runs are resumable: a finished run (``final.json`` in its directory) is not trained again, so an
interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # standalone run: make the project importable
    sys.path.insert(0, str(_ROOT))

from calm_models import checkpoint as ckpt  # noqa: E402
from calm_models.config import BackboneConfig, preset  # noqa: E402
from calm_models.data import PackedBlocks, TextTokenizer, encode_documents, read_documents  # noqa: E402
from calm_models.evaluate import evaluate_brier_lm  # noqa: E402
from calm_models.runs import build_model, load_run  # noqa: E402
from calm_models.train import train  # noqa: E402

SHARED = _ROOT.parent / "shared" / "data"
DEFAULT_TRAIN = SHARED / "pd_english_train.jsonl"
DEFAULT_EVAL = [SHARED / "wikitext103_valid.raw", SHARED / "tinystories_val.txt"]

#: Backbones of the baselines; CALM uses ``M`` (the ``small`` preset's backbone).
BACKBONES = {
    "S": BackboneConfig(hidden_size=192, num_layers=3, num_heads=3, ffn_size=512, max_seq_len=256),
    "M": BackboneConfig(hidden_size=256, num_layers=4, num_heads=4, ffn_size=704, max_seq_len=256),
    "L": BackboneConfig(hidden_size=384, num_layers=6, num_heads=6, ffn_size=1024, max_seq_len=256),
}
CHUNK_SIZES = (1, 2, 4, 8)
BLOCK_LEN = 128
BATCH = 16
HELD_OUT_FRACTION = 0.02
HELD_OUT = "held-out training text"


@dataclass(frozen=True)
class Spec:
    """One trained model of the experiment."""

    name: str
    kind: str  # "ar" or "calm"
    size: str = "M"
    chunk_size: int = 1
    head: str = "energy"


def experiment_specs() -> list[Spec]:
    """The runs of the experiment, in training order."""
    specs = [Spec(f"ar-{s}", "ar", size=s) for s in BACKBONES]
    specs += [Spec(f"calm-k{k}", "calm", chunk_size=k) for k in CHUNK_SIZES]
    specs += [Spec(f"calm-k4-{h}", "calm", chunk_size=4, head=h) for h in ("flow", "diffusion")]
    return specs


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------


def _data(cfg, args, tokenizer: Path | None):
    # no valid_files: the last 2% of the training stream is held out (the in-domain evaluation)
    cfg.data = replace(
        cfg.data,
        train_files=[str(args.train)],
        valid_files=[],
        valid_fraction=HELD_OUT_FRACTION,
        block_len=BLOCK_LEN,
        vocab_size=4096,
        tokenizer=str(tokenizer) if tokenizer else None,
    )
    return cfg


def _run_settings(cfg, args, out_dir: Path, steps: int, batch: int = BATCH):
    # the experiment evaluates every checkpoint itself: the loop's own final evaluation is kept
    # small (eval_batches=2)
    cfg.run = replace(
        cfg.run,
        out_dir=str(out_dir),
        steps=steps,
        batch_size=batch,
        eval_every=0,
        eval_batches=2,
        save_every=max(1, steps // 4),
        keep_last=8,
        log_every=10,
        device=args.device,
        seed=args.seed,
        max_time_s=None,
        progress=not args.quiet,
    )
    return cfg


def autoencoder_config(k: int, args, out_dir: Path, tokenizer: Path | None):
    """The ``small`` autoencoder with chunk size ``k`` and latent size ``32 k``."""
    cfg = _data(preset("small", "autoencoder"), args, tokenizer)
    cfg.autoencoder = replace(cfg.autoencoder, chunk_size=k, latent_size=32 * k)
    steps = max(4, round(args.ae_steps * args.scale))
    return _run_settings(cfg, args, out_dir, steps, batch=32)


def model_config(spec: Spec, args, tokenizer: Path, ae_dir: Path | None):
    """Model and data config of one run; :func:`_run_settings` adds the steps of the budget."""
    cfg = _data(preset("small", spec.kind), args, tokenizer)
    if spec.kind == "ar":
        cfg.baseline = BACKBONES[spec.size]
    else:
        cfg.autoencoder_path = str(ae_dir)
        cfg.calm = replace(cfg.calm, backbone=BACKBONES[spec.size], head=replace(cfg.calm.head, type=spec.head))
    return cfg


def flops_per_token(cfg, vocab_size: int, autoencoder=None) -> dict[str, float]:
    """Analytic training and inference FLOPs per token of a config (builds the model once).

    ``autoencoder`` is the trained autoencoder of a ``calm`` config.
    """
    model = build_model(cfg, vocab_size, autoencoder)
    flops = model.flops_per_token(cfg.data.block_len)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("autoencoder."))
    return {"train": flops["train"], "inference": flops["inference"], "params": params}


def budget_steps(budget: float, train_flops: float) -> int:
    """Optimiser steps that spend ``budget`` FLOPs at ``train_flops`` per token."""
    return max(4, round(budget / (train_flops * BATCH * BLOCK_LEN)))


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def eval_blocks(tokenizer: TextTokenizer, held_out, files: list[Path], max_blocks: int) -> dict[str, torch.Tensor]:
    """``{name: (blocks, BLOCK_LEN) tokens}``: the first ``max_blocks`` blocks of each source.

    The first source is the held-out tail of the training stream (``held_out``, a token array),
    then every evaluation file.
    """
    sources = {HELD_OUT: held_out}
    for path in files:
        sources[path.name] = encode_documents(tokenizer, read_documents([str(path)]))[0]
    out = {}
    for name, tokens in sources.items():
        blocks = PackedBlocks(tokens, BLOCK_LEN, 8, pad_id=tokenizer.eos_id)
        out[name] = blocks.get_batch(torch.arange(min(len(blocks), max_blocks)))
    return out


def brier_lm_of(model, blocks: torch.Tensor, seed: int, batch: int = 16) -> dict:
    """BrierLM with standard errors of a model on token blocks (positions every 8 tokens)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    batches = [blocks[i : i + batch] for i in range(0, len(blocks), batch)]
    return evaluate_brier_lm(model, batches, stride=8, generator=gen).to_dict()


def evaluate_run(run_dir: Path, meta: dict, blocks: dict[str, torch.Tensor], args, curve_file: str) -> dict:
    """BrierLM at every checkpoint on ``curve_file`` and at the last one on every source.

    ``meta`` holds the run's training FLOPs per token (and its autoencoder's training FLOPs).
    """
    curve = []
    checkpoints = ckpt.list_checkpoints(run_dir)
    for path in checkpoints:
        loaded = load_run(path, device=args.device)
        state = _train_state(path)
        res = brier_lm_of(loaded.model, blocks[curve_file], args.seed)
        tokens = int(state["tokens"])
        curve.append(
            {
                "step": int(state["step"]),
                "tokens": tokens,
                "train_flops": tokens * meta["train"] + meta.get("ae_train_flops", 0.0),
                "time_s": float(state.get("elapsed", 0.0)),
                **res,
            }
        )
    final = {name: brier_lm_of(loaded.model, b, args.seed) for name, b in blocks.items()}
    return {"curve": curve, "final": final}


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


def _done(run_dir: Path) -> bool:
    return (run_dir / "final.json").exists()


def _train_state(path: Path) -> dict:
    """The loop's train state of a checkpoint: ``step``, ``tokens``, ``elapsed``, ..."""
    return torch.load(path / ckpt.STATE_FILE, weights_only=True)["train_state"]


def _latest_state(run_dir: Path) -> dict | None:
    latest = ckpt.latest_checkpoint(run_dir)
    return None if latest is None else _train_state(latest)


def _train_once(cfg, run_dir: Path) -> dict:
    """Train (or resume) unless the run has reached its steps; returns the final train state."""
    state = _latest_state(run_dir)
    if state is None or int(state["step"]) < cfg.run.steps:
        train(cfg, resume=True)
        state = _latest_state(run_dir)
    return state


def run_experiment(args) -> dict:
    """Train everything that is not finished, evaluate, and return the results."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only) if args.only else None
    specs = [s for s in experiment_specs() if wanted is None or s.name in wanted]
    # the K = 4 autoencoder comes first: it also trains the shared tokenizer
    ks = [4] + sorted({s.chunk_size for s in specs if s.kind == "calm"} - {4})

    # -- autoencoders (the first one trains the shared tokenizer) --------------------------------
    tokenizer_path = out / "ae-k4" / "tokenizer.json"
    ae_dirs, ae_meta, ae_loaded = {}, {}, {}
    for k in ks:
        run_dir = out / f"ae-k{k}"
        cfg = autoencoder_config(k, args, run_dir, tokenizer_path if k != 4 else None)
        state = _train_once(cfg, run_dir)
        ae_loaded[k] = load_run(run_dir, device=args.device)
        per_token = ae_loaded[k].model.flops_per_token(BLOCK_LEN)["train"]
        tokens = int(state["tokens"])
        ae_meta[k] = {
            "train": per_token,
            "tokens": tokens,
            "train_flops": per_token * tokens,
            "time_s": float(state["elapsed"]),
        }
        (run_dir / "flops.json").write_text(json.dumps(ae_meta[k]))
        ae_dirs[k] = run_dir
    tokenizer = TextTokenizer.load(tokenizer_path)
    held_out = ae_loaded[4].blocks().tokens
    blocks = eval_blocks(tokenizer, held_out, args.eval, args.eval_blocks)
    curve_file = HELD_OUT
    from calm_models.autoencoder import robustness_table

    ae_results = {}
    for k in ae_dirs:
        model = ae_loaded[k].model
        device = next(model.parameters()).device
        accuracy = {}
        for name, source in blocks.items():
            gen = torch.Generator(device=device).manual_seed(args.seed)
            table = robustness_table(model, [b.to(device) for b in source.split(64)], sigmas=(0.0, 0.3), generator=gen)
            accuracy[name] = {str(sigma): acc for sigma, acc in table.items()}
        ae_results[k] = {**ae_meta[k], "accuracy": accuracy}

    # -- language models, one FLOP budget ----------------------------------------------------------
    budget = args.budget * args.scale
    results = {"budget_flops": budget, "autoencoders": ae_results, "runs": {}}
    for spec in specs:
        run_dir = out / spec.name
        calm = spec.kind == "calm"
        cfg = model_config(spec, args, tokenizer_path, ae_dirs[spec.chunk_size] if calm else None)
        autoencoder = ae_loaded[spec.chunk_size].model if calm else None  # only counted
        meta = flops_per_token(cfg, tokenizer.vocab_size, autoencoder)
        steps = budget_steps(budget, meta["train"])
        cfg = _run_settings(cfg, args, run_dir, steps)
        if calm:
            meta["ae_train_flops"] = ae_meta[spec.chunk_size]["train_flops"]
        print(
            f"== {spec.name}: {meta['params'] / 1e6:.2f}M parameters, "
            f"{meta['train'] / 1e6:.1f} MFLOP/token (train), {steps} steps",
            flush=True,
        )
        state = _train_once(cfg, run_dir)
        meta.update(steps=steps, time_s=float(state["elapsed"]))
        (run_dir / "flops.json").write_text(json.dumps(meta))
        if _done(run_dir):
            entry = json.loads((run_dir / "final.json").read_text())
        else:
            curves = evaluate_run(run_dir, meta, blocks, args, curve_file)
            entry = {"spec": spec.__dict__, "flops": meta, **curves}
            (run_dir / "final.json").write_text(json.dumps(entry, indent=2))
        results["runs"][spec.name] = entry
        print(json.dumps({spec.name: entry["final"]}), flush=True)

    # -- generation throughput of CALM (K = 4) against the M baseline -------------------------------
    if not args.skip_throughput and {"ar-M", "calm-k4"} <= set(results["runs"]):
        sys.path.insert(0, str(Path(__file__).parent))
        from throughput import measure

        rows = []
        for name in ("ar-M", "calm-k4"):
            rows += measure(str(out / name), [1, 32], 64, args.device)
        results["throughput"] = rows
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _pm(value: float, se: float, digits: int = 2) -> str:
    """``value ± se``; the error is left out where it is undefined (a BrierLM clamped to 0)."""
    if math.isnan(se):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def _label(entry: dict) -> str:
    spec = entry["spec"]
    if spec["kind"] == "ar":
        return f"Transformer {spec['size']}"
    head = "" if spec["head"] == "energy" else f", {spec['head']} head"
    return f"CALM K={spec['chunk_size']}{head}"


def render(results: dict, out: Path, machine: str, command: str) -> str:
    """Markdown report (tables) and the two PNG plots; returns the Markdown text."""
    runs = results["runs"]
    eval_names = list(next(iter(runs.values()))["final"]) if runs else []
    lines = [
        f"Measured on {machine} with `{command}`. Every model was trained on "
        f"the training file to the same budget of {results['budget_flops']:.2e} training FLOPs "
        "(CALM's autoencoder training is listed separately and included in the curves). "
        f"BrierLM is at T = 1, positions every 8 tokens; the {HELD_OUT} is the last "
        f"{100 * HELD_OUT_FRACTION:g}% of the training stream, never trained on.",
        "",
        "| model | params | train FLOPs/token | inference FLOPs/token | tokens seen | train time | "
        + " | ".join(f"BrierLM {n}" for n in eval_names)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(eval_names),
    ]
    for entry in runs.values():
        fl = entry["flops"]
        tokens = entry["curve"][-1]["tokens"] if entry["curve"] else 0
        cells = [_pm(entry["final"][n]["brier_lm"], entry["final"][n]["brier_lm_se"]) for n in eval_names]
        lines.append(
            f"| {_label(entry)} | {fl['params'] / 1e6:.2f}M | {fl['train'] / 1e6:.1f}M | "
            f"{fl['inference'] / 1e6:.2f}M | {tokens / 1e6:.2f}M | {fl['time_s'] / 60:.1f} min | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        f"Brier-n on the {HELD_OUT} (mean ± standard error):",
        "",
        "| model | Brier-1 | Brier-2 | Brier-3 | Brier-4 |",
        "|---|---|---|---|---|",
    ]
    for entry in runs.values():
        f = entry["final"][HELD_OUT]
        lines.append(
            f"| {_label(entry)} | " + " | ".join(_pm(f[f"brier{j}"], f[f"brier{j}_se"], 4) for j in range(1, 5)) + " |"
        )
    lines += [
        "",
        "Autoencoders: token accuracy at latent noise σ = 0 / σ = 0.3:",
        "",
        "| K | latent | training FLOPs | " + " | ".join(eval_names) + " |",
        "|---|---|---|" + "---|" * len(eval_names),
    ]
    for k, ae in results["autoencoders"].items():
        acc = ae["accuracy"]
        cells = [f"{100 * acc[n]['0.0']:.2f}% / {100 * acc[n]['0.3']:.2f}%" for n in eval_names]
        lines.append(f"| {k} | {32 * int(k)} | {ae['train_flops']:.2e} | " + " | ".join(cells) + " |")
    if "throughput" in results:
        lines += [
            "",
            "Generation throughput (64 tokens after a 32-token prompt):",
            "",
            "| model | batch | T | sampler | tokens/s |",
            "|---|---|---|---|---|",
        ]
        for r in results["throughput"]:
            name = Path(r["run"]).name
            lines.append(f"| {name} | {r['batch']} | {r['temperature']} | {r['sampler']} | {r['tokens_per_s']:.0f} |")
    lines += [
        "",
        "![BrierLM against training FLOPs](brier_vs_train_flops.png)",
        "",
        "![BrierLM against inference FLOPs per token](brier_vs_inference_flops.png)",
        "",
    ]
    text = "\n".join(lines)
    _plots(results, out)
    return text


def _plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    # BrierLM is clamped at 0 while any Brier-n is, so Brier-1 is shown beside it
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "brier_lm", "BrierLM"), (axes[1], "brier1", "Brier-1")):
        for entry in runs.values():
            xs = [p["train_flops"] for p in entry["curve"]]
            ys = [p[key] for p in entry["curve"]]
            es = [0.0 if math.isnan(p[f"{key}_se"]) else p[f"{key}_se"] for p in entry["curve"]]
            style = "-o" if entry["spec"]["kind"] == "ar" else "--s"
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=2, label=_label(entry), markersize=4)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (CALM: autoencoder included)")
        ax.set_ylabel(f"{title} ({HELD_OUT})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "brier_vs_train_flops.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for entry in runs.values():
        f = entry["final"][HELD_OUT]
        marker = "o" if entry["spec"]["kind"] == "ar" else "s"
        ax.errorbar(
            [entry["flops"]["inference"]],
            [f["brier_lm"]],
            yerr=[0.0 if math.isnan(f["brier_lm_se"]) else f["brier_lm_se"]],
            fmt=marker,
            capsize=2,
            label=_label(entry),
        )
    ax.set_xscale("log")
    ax.set_xlabel("inference FLOPs per token")
    ax.set_ylabel(f"BrierLM ({HELD_OUT})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "brier_vs_inference_flops.png", dpi=120)
    plt.close(fig)


def _machine(device: str) -> str:
    import os
    import platform

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=Path, default=DEFAULT_TRAIN)
    parser.add_argument("--eval", type=Path, nargs="+", default=DEFAULT_EVAL)
    parser.add_argument("--out", type=Path, default=Path("runs/frontier"))
    parser.add_argument("--budget", type=float, default=3e13, help="training FLOPs per language model at --scale 1")
    parser.add_argument("--ae-steps", type=int, default=500, help="autoencoder steps at --scale 1")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies budget and AE steps")
    parser.add_argument("--eval-blocks", type=int, default=256, help="blocks of 128 tokens per file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="run names (see experiment_specs)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--report-only", action="store_true", help="only re-render results.md and the plots from --out/results.json"
    )
    parser.add_argument(
        "--docs", type=Path, default=None, help="also write results.md and the plots into this directory"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        saved = args.out / "results.json"
        if not saved.exists():
            print(f"error: {saved}: no such file (run the experiment first)", file=sys.stderr)
            return 2
        results = json.loads(saved.read_text())
    else:
        for path in [args.train, *args.eval]:
            if not path.exists():
                print(f"error: {path}: no such file (see ../shared/data/README.md)", file=sys.stderr)
                return 2
        results = run_experiment(args)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = results.get("command") or "python benchmarks/frontier.py " + " ".join(given)
    results["command"] = command.strip()
    results.setdefault("machine", _machine(args.device))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    text = render(results, args.out, results["machine"], results["command"])
    (args.out / "results.md").write_text(text)
    if args.docs:
        import shutil

        args.docs.mkdir(parents=True, exist_ok=True)
        (args.docs / "frontier.md").write_text(text)
        for png in ("brier_vs_train_flops.png", "brier_vs_inference_flops.png"):
            shutil.copy(args.out / png, args.docs / png)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
