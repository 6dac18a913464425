"""Standing comparison with the authors' code: the reference CALM trained by its own scripts, next to this project.

The authors' HF-Trainer scripts (``train.train_autoencoder`` and ``train.train_calm`` of the reference in
``../shared/reference/calm``) train their autoencoder and ``EnergyTransformer`` under the budget of the project's
``tiny`` preset (sizes, steps, batch, learning rate, schedule, optimiser), on the CPU, one thread. The trained folders
are converted into ordinary runs (:func:`calm_models.convert.convert`) and every model is scored by the project's
evaluator on the same held-out blocks, so the table separates what the code does from what the recipe does.

Rows (all CALM K = 4 on the same data, tokenizer and held-out blocks):

* ``a``: the reference code at the ``tiny`` preset's learning rate and schedule (2e-3, cosine, warm-up 100);
* ``b``: the reference code at its published learning rate and schedule (3e-4, HF's ``constant``, which ignores the
  warm-up, as in the authors' scripts), on the same reference autoencoder as ``a``;
* ``c``: this project configured like the reference (``calm.compress=mlp calm.head.type=energy_mlp
  calm.head.beta=1``: the architecture :mod:`calm_models.convert` maps a reference model onto), trained by
  :func:`calm_models.train.train` on the reference's converted autoencoder;
* ``d``: the same on the project's own autoencoder (the ``tiny`` preset's, trained by the project);
* ``e``: the ``tiny`` preset (energy head, beta 0.5) on the reference's autoencoder;
* ``f``: the ``tiny`` preset on its own autoencoder (the main job's recipe);
* ``ablate-NAME`` (``--ablate``): row ``a`` rerun with one difference between the two trainers changed toward the
  project (:data:`ABLATIONS`).

Columns: BrierLM with its standard error by the two-sample estimator
(:func:`calm_models.evaluate.evaluate_brier_lm`, positions every ``--stride`` tokens); on the synthetic languages also
BrierLM from the model's own samples scored with the language's exact probabilities (``expected_brier`` of
``benchmarks/synthetic.py``, a several times smaller standard error) and its share of the oracle on the same
positions; the CALM stage's training wall time (the training loop: HF's ``train_runtime``, the project's ``elapsed``)
and training tokens per second, measured on the same machine. A second table lists the autoencoders (training time,
reconstruction accuracy at sigma 0 and 0.3 on the held-out blocks).

Corpora: ``markov1`` and ``markov2`` (the synthetic languages of ``benchmarks/synthetic.py``, whose oracle is known)
and ``stdlib`` (the project's embedded default corpus: :func:`calm_models.data.prepare_data` with the ``tiny``
preset's data settings trains the tokenizer; the train and validation documents are written out as JSON lines, which
both trainers read).

Tokens: the project's ``tokenizer.json`` is wrapped as a ``transformers.PreTrainedTokenizerFast`` with pad = EOS, so
the vocabulary is unchanged. The reference CALM script joins documents with no separator unless the tokenizer adds
one, so its wrapper appends EOS (a ``TemplateProcessing`` post-processor): both trainers see the same token stream
(checked on the held-out documents and the first training documents before anything is trained). The reference
autoencoder script appends EOS itself and pads each document to a multiple of ``K`` with the pad token; it gets the
wrapper without the post-processor.

The reference is copied into each reference run's folder and the *copy* is patched (``flash_attention_2`` ->
``sdpa``; an ablation's change); nothing under ``../shared`` is modified and nothing of it is kept in this repository.
The mapping of the preset onto the reference's ``--config_overrides`` and Trainer flags is printed and stored in
``results.json``; what cannot be mapped is listed there too (e.g. the project's ``random_token_prob``, its
initialisation, its 10% cosine floor).

Usage (from the repository root; one training process at a time, one torch thread)::

    python benchmarks/reference_compare.py --corpus markov1|markov2|stdlib [--out runs/reference_compare] \
        [--rows a b c d e f] [--ablate ae_eval min_lr no_embed_decay init] [--ae-steps N --calm-steps N] \
        [--reference ../shared/reference/calm] [--eval-blocks 4096] [--samples 16] [--seed 0] [--quiet]

It writes ``results.json`` and ``results.md`` in ``OUT/CORPUS`` (``OUT/CORPUS-aeN-calmM`` for a reduced budget,
``-seedS`` for another seed of every training run) and prints the table. Finished runs are reused (the project's
resume from their checkpoints, the reference's from the Trainer's ``checkpoint-*``; scores are cached in each run's
``final.json``), so a rerun, or one adding an ablation, only trains what is missing. Without the reference folder or with other versions than ``transformers==4.43.0``,
``datasets==3.1.0`` and ``accelerate==0.30.1``, it prints one line saying what is missing and exits with status 0
(skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
for _path in (_ROOT, _HERE):  # standalone run: the project and benchmarks/synthetic.py importable
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

#: One thread for every library of this process and of the reference's training processes.
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "RAYON_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(ONE_THREAD)  # before torch and tokenizers start their thread pools

import torch  # noqa: E402

REFERENCE = _ROOT.parent / "shared" / "reference" / "calm"
#: Exact versions the reference's training scripts run with.
REQUIRED = {"transformers": "4.43.0", "datasets": "3.1.0", "accelerate": "0.30.1"}
CORPORA = ("markov1", "markov2", "stdlib")
PRESET = "tiny"
PUBLISHED = {"lr": 3e-4, "schedule": "constant"}  # the authors' train_autoencoder.sh and train_energy.sh
#: Row ``c``/``d``: the overrides that make the ``tiny`` preset's CALM the reference's architecture (the values
#: :mod:`calm_models.convert` sets for a reference model; the remaining sizes already agree, which is checked).
REFERENCE_ARCH = ["calm.compress=mlp", "calm.head.type=energy_mlp", "calm.head.beta=1.0"]
ROWS = {
    "a": "reference code, tiny budget (lr 2e-3, cosine)",
    "b": "reference code, published schedule (lr 3e-4, constant)",
    "c": "project, reference architecture, reference autoencoder",
    "d": "project, reference architecture, own autoencoder",
    "e": "project, tiny preset, reference autoencoder",
    "f": "project, tiny preset, own autoencoder",
}


# ----------------------------------------------------------------------------------------------
# Requirements
# ----------------------------------------------------------------------------------------------


def missing_requirement(reference: Path) -> str | None:
    """Why the comparison cannot run here (one line), or ``None``."""
    from importlib.metadata import PackageNotFoundError, version

    if not ((reference / "models").is_dir() and (reference / "train").is_dir()):
        return f"the reference implementation (models/ and train/) is not at {reference}"
    for name, wanted in REQUIRED.items():
        try:
            found = version(name)
        except PackageNotFoundError:
            found = "none"
        if found != wanted:
            pins = " ".join(f"{n}=={v}" for n, v in REQUIRED.items())
            return f"the reference's training scripts need {name}=={wanted}, found {found} (pip install {pins})"
    return None


# ----------------------------------------------------------------------------------------------
# Data and tokenizers
# ----------------------------------------------------------------------------------------------


def _write_jsonl(texts, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    tmp.replace(path)


def prepare_corpus(corpus: str, data_dir: Path, progress: bool) -> dict[str, Path]:
    """``train.jsonl``, ``valid.jsonl`` (and its copy ``valid.json`` for the reference) and ``tokenizer.json``.

    Synthetic languages: :func:`synthetic.write_data` (the files of ``benchmarks/synthetic.py``). ``stdlib``: the
    project's pipeline trains the tokenizer on the preset's share of the standard library, whose train and validation
    files are then written out one document per line.
    """
    if corpus == "stdlib":
        from calm_models.config import preset
        from calm_models.data import prepare_data, read_documents, stdlib_source_files

        paths = {k: data_dir / f"{k}.jsonl" for k in ("train", "valid")}
        paths["tokenizer"] = data_dir / "tokenizer.json"
        if not all(p.exists() for p in paths.values()):
            cfg = preset(PRESET, "autoencoder").data
            prepare_data(cfg, data_dir, chunk_size=4, progress=progress)  # trains data_dir/tokenizer.json
            for split, max_bytes in (("train", cfg.max_train_bytes), ("valid", cfg.max_valid_bytes)):
                files = stdlib_source_files(split=split, max_bytes=max_bytes)
                _write_jsonl((doc.text for doc in read_documents(files, format="python")), paths[split])
    else:
        from synthetic import write_data

        paths = write_data(corpus, data_dir, train_tokens=4_000_000, valid_tokens=200_000)
    paths["valid_json"] = data_dir / "valid.json"  # the reference's validation_file must end in .json
    if not paths["valid_json"].exists():
        shutil.copyfile(paths["valid"], paths["valid_json"])
    paths["hf_ae"] = hf_tokenizer(paths["tokenizer"], data_dir / "hf-tokenizer-ae", append_eos=False)
    paths["hf_lm"] = hf_tokenizer(paths["tokenizer"], data_dir / "hf-tokenizer-lm", append_eos=True)
    return paths


def hf_tokenizer(tokenizer_json: Path, folder: Path, append_eos: bool) -> Path:
    """The project's tokenizer as a ``PreTrainedTokenizerFast`` folder (pad = EOS; EOS after every text if asked)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from calm_models.data import TextTokenizer

    if (folder / "tokenizer.json").exists():
        return folder
    eos = TextTokenizer.load(tokenizer_json).eos_token
    backend = Tokenizer.from_file(str(tokenizer_json))
    if append_eos:
        backend.post_processor = TemplateProcessing(
            single=f"$A {eos}", special_tokens=[(eos, backend.token_to_id(eos))]
        )
    names = ["input_ids", "attention_mask"]  # as Llama's: the reference's grouping knows no token_type_ids
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos, model_input_names=names)
    wrapped.save_pretrained(str(folder))
    return folder


def check_same_stream(paths: dict[str, Path], train_docs: int = 2000) -> int:
    """Assert that the reference CALM script's tokens equal the project's (documents + EOS); returns tokens checked.

    Raises:
        SystemExit: If a document tokenises differently.
    """
    from itertools import islice

    from transformers import AutoTokenizer

    from calm_models.data import TextTokenizer, encode_documents, read_documents

    ours = TextTokenizer.load(paths["tokenizer"])
    theirs = AutoTokenizer.from_pretrained(str(paths["hf_lm"]))
    if len(theirs) != ours.vocab_size or theirs.pad_token_id != ours.eos_id or theirs.eos_token_id != ours.eos_id:
        raise SystemExit("error: the wrapped tokenizer changed the vocabulary or its EOS/pad ids")
    checked = 0
    for split, limit in (("valid", None), ("train", train_docs)):
        texts = [doc.text for doc in islice(read_documents(paths[split]), limit)]
        expected, _ = encode_documents(ours, texts)
        got = [t for ids in theirs(texts)["input_ids"] for t in ids]
        if expected.tolist() != got:
            raise SystemExit(f"error: the reference's tokens of {paths[split]} differ from the project's")
        checked += len(got)
    return checked


# ----------------------------------------------------------------------------------------------
# The preset mapped onto the reference's configuration and Trainer flags
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ablation:
    """One difference between the trainers, changed in the reference toward the project.

    Attributes:
        what: What changes.
        flags: Extra Trainer flags (they replace earlier ones of the same name).
        patches: ``(file in the reference copy, anchor, replacement)``.
    """

    what: str
    flags: tuple[str, ...] = ()
    patches: tuple[tuple[str, str, str], ...] = ()


_AE_ENCODE = "        latent_states = self.ae_model.encoder(input_ids=labels)\n"
_HEAD_INIT = "        self.mlp_generator.initialize_weights()\n"
_LOGGER = "\nlogger = logging.getLogger(__name__)\n"

#: ``--ablate`` choices, most likely culprits first.
ABLATIONS = {
    "ae_eval": Ablation(
        "the frozen autoencoder in eval mode while CALM trains (the Trainer's model.train() also puts the "
        "reference's ae_model in training mode, where its encoder rounds the token embeddings to bf16 before "
        "computing the targets; its masking and latent dropout are in Autoencoder.forward, which CALM does not call)",
        patches=(
            (
                "models/modeling_energy.py",
                _AE_ENCODE,
                "        self.ae_model.eval()  # ablation ae_eval\n" + _AE_ENCODE,
            ),
        ),
    ),
    "min_lr": Ablation(
        "cosine to 10% of the peak learning rate (the project's floor, min_lr_ratio) instead of to 0",
        flags=("--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'),
    ),
    "no_embed_decay": Ablation(
        "no weight decay on the token embedding (the Trainer decays every parameter but biases and norms; the "
        "project decays matrices only, not embeddings)",
        patches=(
            (
                "train/train_calm.py",
                _LOGGER,
                "\n_decay_names = Trainer.get_decay_parameter_names  # ablation no_embed_decay\n"
                "Trainer.get_decay_parameter_names = lambda self, model: [\n"
                '    name for name in _decay_names(self, model) if "embed_tokens" not in name\n]\n' + _LOGGER,
            ),
        ),
    ),
    "init": Ablation(
        "the project's initialisation of the residual outputs: attention output and MLP down projections "
        "N(0, (0.02 / sqrt(2 layers))^2) instead of N(0, 0.02^2)",
        patches=(
            (
                "models/modeling_energy.py",
                _HEAD_INIT,
                _HEAD_INIT + "        for layer in self.transformer.layers:  # ablation init\n"
                "            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):\n"
                "                std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)\n"
                "                nn.init.normal_(proj.weight, mean=0.0, std=std)\n",
            ),
        ),
    ),
}
#: Applied to every copy of the reference: flash-attn is not installed (and needs a GPU).
CPU_PATCHES = (("train/train_calm.py", 'attn_implementation="flash_attention_2"', 'attn_implementation="sdpa"'),)


def _overrides(values: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def reference_setup(stage: str, steps: int | None, lr: float | None = None, schedule: str | None = None) -> dict:
    """The reference's ``--config_overrides`` and Trainer flags for the preset's ``stage``, and the mapping.

    Returns:
        ``{"overrides": {...}, "flags": [...], "mapping": [[preset field, value, reference], ...],
        "unmapped": [...]}``.
    """
    from calm_models.config import preset

    cfg = preset(PRESET, stage)
    run, optim, sched = cfg.run, cfg.optim, cfg.schedule
    ae, k = cfg.autoencoder, cfg.autoencoder.chunk_size
    if ae.num_token_layers != ae.num_chunk_layers or ae.mask_prob != ae.latent_dropout:
        raise SystemExit("error: the preset's autoencoder has no reference equivalent (uneven stages or dropouts)")
    mapping = [
        ["data.block_len", cfg.data.block_len, "--block_size"],
        ["run.batch_size x grad_accum", f"{run.batch_size} x {run.grad_accum}", "--per_device_train_batch_size"],
        ["run.steps", steps or run.steps, "--max_steps"],
        ["optim.lr", lr or optim.lr, "--learning_rate"],
        ["schedule.kind", schedule or sched.kind, "--lr_scheduler_type (HF cosine decays to 0)"],
        ["schedule.warmup_steps", sched.warmup_steps, "--warmup_steps"],
        ["optim.betas", list(optim.betas), "--adam_beta1 --adam_beta2"],
        ["optim.eps", optim.eps, "--adam_epsilon"],
        ["optim.weight_decay", optim.weight_decay, "--weight_decay (HF also decays embeddings)"],
        ["optim.grad_clip", optim.grad_clip, "--max_grad_norm"],
        ["run.seed", run.seed, "--seed"],
        ["run.precision (auto on CPU)", "fp32", "no --bf16 (the authors' GPU runs use --bf16 True)"],
    ]
    if stage == "autoencoder":
        overrides = {
            "hidden_size": ae.hidden_size,
            "intermediate_size": ae.ffn_size,
            "latent_size": ae.latent_size,
            "patch_size": k,
            "num_encoder_layers": ae.num_token_layers + ae.num_chunk_layers,
            "num_decoder_layers": ae.num_token_layers + ae.num_chunk_layers,
            "ae_dropout": ae.mask_prob,
            "kl_weight": ae.kl_weight,
            "kl_clamp": ae.kl_clamp,
            "rms_norm_eps": ae.norm_eps,
        }
        mapping += [
            [
                "autoencoder.hidden_size / ffn_size / latent_size",
                f"{ae.hidden_size} / {ae.ffn_size} / {ae.latent_size}",
                "same names",
            ],
            ["autoencoder.chunk_size", k, "patch_size"],
            ["autoencoder.num_token_layers + num_chunk_layers", overrides["num_encoder_layers"], "num_*coder_layers"],
            ["autoencoder.mask_prob = latent_dropout", ae.mask_prob, "ae_dropout"],
            ["autoencoder.kl_weight, kl_clamp", f"{ae.kl_weight}, {ae.kl_clamp}", "kl_weight, kl_clamp"],
        ]
        unmapped = [
            f"autoencoder.random_token_prob={ae.random_token_prob} (no reference equivalent: 0)",
            f"autoencoder.init_std={ae.init_std} (reference: initializer_range 0.02)",
            "autoencoder.inner_norms=True, projection_bias=False (reference layout: no inner norms, biases)",
            "the reference pads every document with pad (= EOS) tokens to a multiple of K and counts them in the loss",
        ]
    else:
        bb, head = cfg.calm.backbone, cfg.calm.head
        if head.hidden_size != bb.hidden_size or cfg.calm.num_targets != 100:
            raise SystemExit("error: the reference's head is as wide as the backbone and draws 100 targets")
        overrides = {
            "hidden_size": bb.hidden_size,
            "intermediate_size": bb.resolved_ffn_size,
            "num_hidden_layers": bb.num_layers,
            "num_attention_heads": bb.num_heads,
            "num_key_value_heads": bb.resolved_kv_heads,
            "rope_theta": bb.rope_theta,
            "rms_norm_eps": bb.norm_eps,
            "latent_size": ae.latent_size,
            "patch_size": k,
            "num_mlp_layers": head.num_blocks,
            "noise_size": head.noise_size,
            "num_samples": head.num_samples,
            "beta": 1.0,
        }
        mapping += [
            [
                "calm.backbone.hidden_size / num_layers / num_heads",
                f"{bb.hidden_size} / {bb.num_layers} / {bb.num_heads}",
                "hidden_size, num_hidden_layers, num_attention_heads",
            ],
            ["calm.backbone.ffn_size", bb.resolved_ffn_size, "intermediate_size"],
            [
                "calm.head.num_blocks / noise_size / num_samples",
                f"{head.num_blocks} / {head.noise_size} / {head.num_samples}",
                "num_mlp_layers, noise_size, num_samples",
            ],
            ["calm.head.beta", head.beta, "beta=1.0 (the reference's; rows c and d use 1.0 too)"],
            ["calm.head.type, calm.compress", f"{head.type}, {cfg.calm.compress}", "MLP generator, MLP compression"],
        ]
        unmapped = [
            "initialisation: reference N(0, 0.02) everywhere (last head layer 0); project: residual outputs "
            "0.02 / sqrt(2 layers), compression MLP torch's default (ablation init)",
            f"schedule.min_lr_ratio={sched.min_lr_ratio} (HF cosine decays to 0; ablation min_lr)",
            "weight decay of the token embedding (HF decays it; ablation no_embed_decay)",
            "the frozen autoencoder in training mode: bf16-rounded embeddings for the targets (ablation ae_eval)",
            "pad = EOS: Llama's embedding padding_idx keeps the reference CALM's input embedding of EOS at 0",
            "no padding mask in the reference (the project masks the padded tail of the last block only)",
        ]
    lr, kind = lr or optim.lr, schedule or sched.kind
    flags = [
        f"--block_size={cfg.data.block_len}",
        f"--per_device_train_batch_size={run.batch_size}",
        f"--gradient_accumulation_steps={run.grad_accum}",
        f"--max_steps={steps or run.steps}",
        f"--learning_rate={lr}",
        f"--lr_scheduler_type={kind}",
        f"--warmup_steps={sched.warmup_steps}",
        f"--adam_beta1={optim.betas[0]}",
        f"--adam_beta2={optim.betas[1]}",
        f"--adam_epsilon={optim.eps}",
        f"--weight_decay={optim.weight_decay}",
        f"--max_grad_norm={optim.grad_clip}",
        f"--seed={run.seed}",
    ]
    return {"overrides": overrides, "flags": flags, "mapping": mapping, "unmapped": unmapped}


# ----------------------------------------------------------------------------------------------
# Reference runs
# ----------------------------------------------------------------------------------------------


def _merge_flags(flags: list[str], extra: tuple[str, ...]) -> list[str]:
    """``flags`` (``--name=value``) with ``extra`` (``--name value`` pairs) replacing the same names."""
    pairs = {f.split("=", 1)[0]: f for f in flags}
    for name, value in zip(extra[::2], extra[1::2], strict=True):
        pairs[name] = f"{name}={value}"
    return list(pairs.values())


def copy_reference(reference: Path, dest: Path, patches) -> None:
    """A fresh copy of the reference in ``dest`` with ``patches`` applied (every occurrence of each anchor)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(reference, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".git"))
    for name, anchor, new in patches:
        path = dest / name
        text = path.read_text()
        if anchor not in text:
            raise SystemExit(f"error: cannot patch {name}: {anchor.strip()!r} not found (another reference version?)")
        path.write_text(text.replace(anchor, new))


def _finished(out: Path, steps: int) -> bool:
    state = out / "trainer_state.json"
    return (out / "train_results.json").exists() and json.loads(state.read_text())["global_step"] >= steps


def _last_step(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def train_reference(
    script: str, run_dir: Path, reference: Path, args: list[str], steps: int, patches=(), quiet: bool = False
) -> dict:
    """Run the reference's ``train.<script>`` in a patched copy (unless finished); its timing.

    The Trainer's output is ``run_dir/out`` (resumed from its ``checkpoint-*``), the log ``run_dir/train.log``.

    Returns:
        ``{"steps", "time_s", "tokens_per_s", "resumed_from", "command"}``; after a resume ``time_s`` is the
        measured part scaled to all steps.
    """
    out, timing = run_dir / "out", run_dir / "timing.json"
    if _finished(out, steps) and timing.exists():
        return json.loads(timing.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    code = run_dir / "code"
    copy_reference(reference, code, (*CPU_PATCHES, *patches))
    start = _last_step(out)
    if out.exists() and start == 0:  # a start that died before its first checkpoint
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", f"train.{script}", *args, f"--output_dir={out}"]
    env = {
        **os.environ,
        **ONE_THREAD,
        "PYTHONPATH": str(code),
        "HF_HOME": str(run_dir.parent / "hf_home"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # resuming: transformers 4.43 reads its own rng_state.pth (numpy arrays) with torch.load's default, which
        # torch >= 2.6 made weights_only; these are the run's own files
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
    }
    log = run_dir / "train.log"
    if not quiet:
        print(f"[reference] {script} -> {run_dir} (log: {log})", flush=True)
    with log.open("a") as fh:
        fh.write(f"\n$ cd {code} && {' '.join(cmd)}\n")
        fh.flush()
        done = subprocess.run(cmd, cwd=code, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not _finished(out, steps):
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit("error: the reference's training failed; the end of its log:\n" + "\n".join(tail))
    metrics = json.loads((out / "train_results.json").read_text())
    per_step = metrics["train_runtime"] / max(1, steps - start)
    tokens_per_step = _arg(args, "--per_device_train_batch_size") * _arg(args, "--gradient_accumulation_steps")
    tokens_per_step *= _arg(args, "--block_size")
    result = {
        "steps": steps,
        "time_s": per_step * steps,
        "tokens_per_s": tokens_per_step / per_step,
        "resumed_from": start,
        "train_loss": metrics.get("train_loss"),
        "command": f"cd {code} && python " + " ".join(cmd[1:]),
        "load_avg": os.getloadavg()[0],
    }
    timing.write_text(json.dumps(result, indent=2))
    return result


def _arg(args: list[str], name: str) -> int:
    return int(next(a.split("=", 1)[1] for a in args if a.startswith(name + "=")))


def _common_flags(paths: dict[str, Path], tokenizer: Path, save_every: int) -> list[str]:
    return [
        f"--tokenizer_name={tokenizer}",
        f"--train_file={paths['train']}",
        f"--validation_file={paths['valid_json']}",
        "--do_train",
        "--use_cpu=True",
        "--num_train_epochs=1",  # --max_steps decides
        "--save_strategy=steps",
        f"--save_steps={save_every}",
        "--save_total_limit=1",
        "--save_safetensors=False",  # as the authors' scripts (the autoencoder's tied output matrix)
        "--logging_steps=50",
        "--report_to=none",
        "--disable_tqdm=True",
        "--dataloader_num_workers=0",
    ]


# ----------------------------------------------------------------------------------------------
# Project runs, conversion and scores
# ----------------------------------------------------------------------------------------------


def project_run(stage: str, data: dict[str, Path], run_dir: Path, overrides: list[str], args) -> Path:
    """Train (or resume, or reuse) a project run of the preset with ``overrides``."""
    from synthetic import stage_config, train_once

    steps = args.ae_steps if stage == "autoencoder" else args.calm_steps
    extra = [f"run.steps={steps}"] if steps else []
    run = {"seed": args.seed, "device": "cpu", "num_threads": 1, "progress": not args.quiet}
    cfg = stage_config(stage, PRESET, data, run_dir, [*overrides, *extra], **run)
    if not args.quiet:
        print(f"[project] {stage} {' '.join(overrides)} -> {run_dir}", flush=True)
    train_once(cfg)
    return run_dir


def project_timing(run_dir: Path) -> dict:
    """Steps, wall time of the training loop and tokens/s of a project run (and the machine's load when first read)."""
    from synthetic import run_flops

    path = run_dir / "timing.json"
    if not path.exists():
        r = run_flops(run_dir)
        timing = {"steps": r["steps"], "time_s": r["time_s"], "tokens_per_s": r["tokens"] / max(r["time_s"], 1e-9)}
        path.write_text(json.dumps({**timing, "load_avg": os.getloadavg()[0]}, indent=2))
    return json.loads(path.read_text())


def convert_reference(
    ref_out: Path, run_dir: Path, tokenizer: Path, block_len: int, autoencoder: tuple[Path, Path] | None = None
) -> Path:
    """The reference folder ``ref_out`` as a project run ``run_dir`` (converted once).

    A CALM needs ``autoencoder``: the reference autoencoder's folder and its converted run. The CALM is converted with
    the autoencoder weights its own file holds, which must equal the run's: the frozen autoencoder was neither
    re-initialised nor trained.
    """
    from calm_models.convert import convert
    from calm_models.runs import load_run

    if not (run_dir / "config.yaml").exists():
        folder = autoencoder[0] if autoencoder else None
        convert(ref_out, run_dir, autoencoder=folder, tokenizer=str(tokenizer), block_len=block_len, overwrite=True)
    if autoencoder is not None:
        ours, theirs = load_run(run_dir).model.autoencoder.state_dict(), load_run(autoencoder[1]).model.state_dict()
        if ours.keys() != theirs.keys() or not all(torch.equal(v, theirs[k]) for k, v in ours.items()):
            raise SystemExit(f"error: the autoencoder inside {ref_out} differs from the one it was trained on")
    return run_dir


def architecture_differences(project_run: Path, reference_run: Path) -> list[str]:
    """Dotted ``calm.*`` fields in which a project run's model differs from a converted reference run's."""
    from calm_models.config import TrainConfig, config_to_dict, diff_configs, load_config

    def resolved(run: Path) -> dict:
        calm = load_config(TrainConfig, file=run / "config.yaml").calm
        bb = replace(calm.backbone, num_kv_heads=calm.backbone.resolved_kv_heads)
        bb = replace(bb, ffn_size=bb.resolved_ffn_size)
        return {"calm": config_to_dict(replace(calm, backbone=bb))}

    skip = {"calm.backbone.max_seq_len"}  # a cap on the context, not a weight (the converter keeps the reference's)
    return [p for p in diff_configs(resolved(project_run), resolved(reference_run)) if p not in skip]


def score(run_dir: Path, blocks: torch.Tensor, lang, args) -> dict:
    """BrierLM of a run on ``blocks`` (and the exact-P estimate on a synthetic language), cached in ``final.json``."""
    from synthetic import brier_of, expected_brier_of

    path = run_dir / "final.json"
    entry = json.loads(path.read_text()) if path.exists() else {}
    if entry.get("num_blocks") != len(blocks) or entry.get("stride") != args.stride:
        entry = {"num_blocks": len(blocks), "stride": args.stride, **brier_of(run_dir, blocks, args.stride, args.seed)}
    if lang is not None and entry.get("expected", {}).get("samples") != args.samples:
        entry["expected"] = expected_brier_of(run_dir, lang, blocks, args.stride, args.seed, args.samples)
    path.write_text(json.dumps(entry, indent=2))
    return entry


@torch.no_grad()
def autoencoder_scores(run_dir: Path, blocks: torch.Tensor, seed: int) -> dict:
    """Reconstruction accuracy of an autoencoder run on ``blocks`` at sigma 0 and 0.3."""
    from calm_models.autoencoder import reconstruction_accuracy
    from calm_models.runs import load_run

    ae = load_run(run_dir).model
    gen = torch.Generator().manual_seed(seed)
    return {
        f"recon_acc_sigma{s:g}": float(
            torch.stack([reconstruction_accuracy(ae, b, s, gen) for b in blocks.split(256)]).mean()
        )
        for s in (0.0, 0.3)
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def render(results: dict) -> str:
    """Markdown: the CALM table, the autoencoders, the mapping."""
    synthetic = results["oracle"] is not None
    head = "| row | model | CALM steps | BrierLM (two-sample) |"
    rule = "|---|---|---|---|"
    if synthetic:
        head += " BrierLM (exact P) | share of oracle |"
        rule += "---|---|"
    head += " train time | train tokens/s | load | reference's own BrierLM |"
    rule += "---|---|---|---|"
    lines = [
        f"Corpus `{results['corpus']}`, budget of the `{PRESET}` preset (autoencoder {results['ae_steps']} steps, "
        f"CALM {results['calm_steps']} steps), {results['num_blocks']} held-out blocks of {results['block_len']} "
        f"tokens, positions every {results['stride']} tokens ({results['positions']} positions). "
        f"Command: `{results['command']}`.",
        "",
    ]
    if synthetic:
        o = results["oracle"]
        lines += [f"Oracle BrierLM on these positions: {o['brier_lm']:.2f} ± {o['brier_lm_se']:.2f}.", ""]
    lines += [head, rule]
    for key, e in results["rows"].items():
        cells = [key, e["label"], str(e["timing"]["steps"]), f"{e['brier_lm']:.2f} ± {e['brier_lm_se']:.2f}"]
        if synthetic:
            x = e["expected"]
            cells += [
                f"{x['brier_lm']:.2f} ± {x['brier_lm_se']:.2f}",
                f"{100 * x['share']:.1f}% ± {100 * x['share_se']:.1f}%",
            ]
        t = e["timing"]
        own, theirs = t.get("own_eval", {}).get("brierLM"), t.get("own_eval", {})
        negative = any(theirs.get(f"brier{j}", 0) < 0 for j in range(1, 5))
        cells += [_minutes(t["time_s"]) + (" *" if t.get("resumed_from") else ""), f"{t['tokens_per_s']:,.0f}"]
        cells += [f"{t['load_avg']:.1f}", "" if own is None else f"{100 * own:.2f}" + (" †" if negative else "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Train time and tokens/s are the CALM stage's training loop (HF `train_runtime`, the project's `elapsed`), "
        "one torch thread, this machine; * resumed (the measured part scaled to all steps); load: the 1-minute "
        "load average when the run ended (other jobs share the CPU). The reference's own BrierLM is its script's "
        "evaluation at the end (`eval_brierLM`, two samples per chunk boundary, its own validation blocks, "
        f"at most {results['eval_blocks']} of them, no standard error); † its Brier-n means are negative, and the "
        "script's `max(prod, 0) ** 0.25` turns four negative means into a positive BrierLM (the project clips each "
        "Brier-n at 0). The exact-P column scores "
        f"{results['samples']} of the model's own samples per position with the language's true probabilities; the "
        "share is of the closed-form oracle on the same positions.",
        "",
        "| autoencoder | steps | train time | train tokens/s | reconstruction accuracy, sigma 0 / 0.3 |",
        "|---|---|---|---|---|",
    ]
    for name, e in results["autoencoders"].items():
        t = e["timing"]
        lines.append(
            f"| {name} | {t['steps']} | {_minutes(t['time_s'])} | {t['tokens_per_s']:,.0f} | "
            f"{100 * e['recon_acc_sigma0']:.2f}% / {100 * e['recon_acc_sigma0.3']:.2f}% |"
        )
    if results["ablations"]:
        lines += ["", "Ablations (row `a` with one change toward the project):", ""]
        lines += [f"* `{name}`: {what}" for name, what in results["ablations"].items()]
    lines += ["", "Preset -> reference mapping:", "", "| preset field | value | reference |", "|---|---|---|"]
    for stage, setup in results["mapping"].items():
        lines += [f"| **{stage}** | | `--config_overrides {_overrides(setup['overrides'])}` |"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in setup["mapping"]]
        lines += [f"| not mapped | | {u} |" for u in setup["unmapped"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="markov1", choices=CORPORA)
    parser.add_argument("--out", type=Path, default=Path("runs/reference_compare"))
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS), help="main rows to run")
    parser.add_argument("--ablate", nargs="*", default=[], choices=list(ABLATIONS), help="ablation rows to add")
    parser.add_argument("--ae-steps", type=int, default=None, help="autoencoder steps (default: the preset's)")
    parser.add_argument("--calm-steps", type=int, default=None, help="CALM steps (default: the preset's)")
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="the authors' code (models/, train/)")
    parser.add_argument("--eval-blocks", type=int, default=4096, help="held-out blocks scored (at most)")
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16, help="samples per position of the exact-P estimate")
    parser.add_argument("--seed", type=int, default=0, help="seed of every training run and of the evaluation")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if reason := missing_requirement(args.reference):
        print(f"reference_compare: skipped: {reason}")
        return 0
    torch.set_num_threads(1)
    # every project module this run uses, imported up front: an hours-long run keeps one version of the code
    import synthetic  # noqa: F401

    import calm_models.convert  # noqa: F401
    import calm_models.evaluate  # noqa: F401
    import calm_models.train  # noqa: F401
    from calm_models.config import preset

    ae_cfg, lm_cfg = preset(PRESET, "autoencoder"), preset(PRESET, "calm")
    ae_steps, calm_steps = args.ae_steps or ae_cfg.run.steps, args.calm_steps or lm_cfg.run.steps
    reduced = (ae_steps, calm_steps) != (ae_cfg.run.steps, lm_cfg.run.steps)
    suffix = (f"-ae{ae_steps}-calm{calm_steps}" if reduced else "") + (f"-seed{args.seed}" if args.seed else "")
    root = args.out / (args.corpus + suffix)
    block_len = lm_cfg.data.block_len
    progress = not args.quiet

    # -- data, tokenizers and the mapping ----------------------------------------------------
    data = prepare_corpus(args.corpus, args.out / args.corpus / "data", progress)
    print(f"token streams identical on {check_same_stream(data):,} tokens (project pipeline vs reference tokenizer)")
    setups = {"autoencoder": reference_setup("autoencoder", ae_steps), "calm": reference_setup("calm", calm_steps)}
    for stage, setup in setups.items():
        print(f"{stage}: --config_overrides {_overrides(setup['overrides'])} {' '.join(setup['flags'])}")
        for field_name, value, ref in setup["mapping"]:
            print(f"    {field_name} = {value} -> {ref}")
        for note in setup["unmapped"]:
            print(f"    not mapped: {note}")

    # -- autoencoders: the project's, then the reference's (converted) ------------------------
    own_ae = project_run("autoencoder", data, root / "autoencoder", [], args)
    ref_ae_dir = root / "ref-autoencoder"
    ae_args = [
        f"--config_overrides={_overrides(setups['autoencoder']['overrides'])}",
        *_common_flags(data, data["hf_ae"], save_every=max(1, ae_steps // 2)),
        *setups["autoencoder"]["flags"],
    ]
    ref_ae_timing = train_reference(
        "train_autoencoder", ref_ae_dir, args.reference, ae_args, ae_steps, quiet=args.quiet
    )
    ref_ae = convert_reference(ref_ae_dir / "out", ref_ae_dir / "run", data["tokenizer"], block_len)
    from synthetic import eval_blocks, held_out_oracle, make_language, share

    blocks = eval_blocks(own_ae, args.eval_blocks)  # the project's held-out blocks of the corpus
    lang = make_language(args.corpus) if args.corpus != "stdlib" else None
    autoencoders = {
        "reference code": {"timing": ref_ae_timing, **autoencoder_scores(ref_ae, blocks, args.seed)},
        "project (tiny)": {"timing": project_timing(own_ae), **autoencoder_scores(own_ae, blocks, args.seed)},
    }

    # -- CALM rows ----------------------------------------------------------------------------
    rows: dict[str, dict] = {}

    def reference_calm(name: str, lr=None, schedule=None, ablation: Ablation | None = None) -> tuple[Path, dict]:
        setup = reference_setup("calm", calm_steps, lr=lr, schedule=schedule)
        flags = _merge_flags(setup["flags"], ablation.flags if ablation else ())
        calm_args = [
            f"--ae_name_or_path={ref_ae_dir / 'out'}",
            f"--config_overrides={_overrides(setup['overrides'])}",
            *_common_flags(data, data["hf_lm"], save_every=500),
            "--do_eval",  # the script needs it (its compute_metrics); the reference's own BrierLM, at the end
            "--per_device_eval_batch_size=16",
            f"--max_eval_samples={args.eval_blocks}",
            *flags,
        ]
        run_dir = root / name
        patches = ablation.patches if ablation else ()
        timing = train_reference("train_calm", run_dir, args.reference, calm_args, calm_steps, patches, args.quiet)
        own = json.loads((run_dir / "out" / "eval_results.json").read_text())
        timing["own_eval"] = {k.removeprefix("eval_"): v for k, v in own.items() if k.startswith("eval_brier")}
        autoencoder = (ref_ae_dir / "out", ref_ae)
        return convert_reference(run_dir / "out", run_dir / "run", data["tokenizer"], block_len, autoencoder), timing

    def add(key: str, label: str, run_dir: Path, timing: dict, **extra) -> None:
        entry = {"label": label, "run": str(run_dir), "timing": timing, **extra, **score(run_dir, blocks, lang, args)}
        rows[key] = entry
        if not args.quiet:
            print(f"{key}: {label}: BrierLM {entry['brier_lm']:.2f} ± {entry['brier_lm_se']:.2f}", flush=True)

    for key in args.rows:
        if key == "a":
            add("a", ROWS["a"], *reference_calm("ref-calm"))
        elif key == "b":
            add("b", ROWS["b"], *reference_calm("ref-calm-published", PUBLISHED["lr"], PUBLISHED["schedule"]))
        else:
            ae_dir = ref_ae if key in "ce" else own_ae
            arch = REFERENCE_ARCH if key in "cd" else []
            name = {
                "c": "calm-refarch-refae",
                "d": "calm-refarch-ownae",
                "e": "calm-tiny-refae",
                "f": "calm-tiny-ownae",
            }
            run_dir = project_run("calm", data, root / name[key], [*arch, f"autoencoder_path={ae_dir}"], args)
            add(key, ROWS[key], run_dir, project_timing(run_dir), overrides=arch)
            if key in "cd" and "a" in rows:  # the architecture must be the converted reference's
                if diff := architecture_differences(run_dir, Path(rows["a"]["run"])):
                    raise SystemExit(f"error: row {key} differs from the reference's architecture in {diff}")
    for name in args.ablate:
        ablation = ABLATIONS[name]
        add(
            f"ablate-{name}",
            f"reference code, tiny budget, ablation {name}",
            *reference_calm(f"ref-calm-ablate-{name}", ablation=ablation),
        )

    # -- report -------------------------------------------------------------------------------
    oracle = None
    if lang is not None:
        oracle = held_out_oracle(lang, blocks.numpy(), args.stride, seed=args.seed)["expected"]
        for entry in rows.values():
            s = share(entry["expected"], oracle)
            entry["expected"].update(share=s["brier_lm"], share_se=s["brier_lm_se"])
    positions = len(range(args.stride, block_len - 4 + 1, args.stride))
    results = {
        "corpus": args.corpus,
        "preset": PRESET,
        "ae_steps": ae_steps,
        "calm_steps": calm_steps,
        "num_blocks": len(blocks),
        "block_len": block_len,
        "stride": args.stride,
        "positions": positions * len(blocks),
        "samples": args.samples,
        "eval_blocks": args.eval_blocks,
        "command": "python benchmarks/reference_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "oracle": oracle,
        "rows": rows,
        "autoencoders": autoencoders,
        "ablations": {name: ABLATIONS[name].what for name in args.ablate},
        "mapping": setups,
    }
    (root / "results.json").write_text(json.dumps(results, indent=2))
    text = render(results)
    (root / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
