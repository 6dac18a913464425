"""Tiny training runs for the command-line tests: a corpus and the dotted overrides of a run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = (
    "the a model of text learns to predict next chunk vector from its context and a small "
    "autoencoder maps four tokens into one latent which the decoder turns back into tokens"
).split()


def corpus(tmp_path: Path, docs: int = 120) -> Path:
    """A deterministic JSONL corpus (about 40 kB for 120 documents), written once per folder."""
    path = tmp_path / "corpus.jsonl"
    if path.exists():
        return path
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(docs):
        n = int(torch.randint(20, 60, (1,), generator=g))
        idx = torch.randint(len(WORDS), (n,), generator=g)
        lines.append(json.dumps({"text": " ".join(WORDS[i] for i in idx.tolist()) + "."}))
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_args(tmp_path: Path, out: str, stage: str = "ar", **extra: object) -> list[str]:
    """Command-line arguments of a few-second run of ``stage`` into ``tmp_path / out``."""
    args = {
        "data.train_files": f"[{corpus(tmp_path)}]",
        "data.vocab_size": 300,
        "data.block_len": 16,
        "data.valid_fraction": 0.1,
        "data.cache_dir": str(tmp_path / "cache"),
        "baseline.hidden_size": 32,
        "baseline.num_layers": 2,
        "baseline.num_heads": 2,
        "baseline.max_seq_len": 64,
        "autoencoder.hidden_size": 32,
        "autoencoder.latent_size": 8,
        "autoencoder.intermediate_size": 64,
        "calm.backbone.hidden_size": 32,
        "calm.backbone.num_layers": 1,
        "calm.backbone.num_heads": 2,
        "calm.backbone.max_seq_len": 64,
        "calm.head.hidden_size": 32,
        "calm.head.num_blocks": 1,
        "calm.num_targets": 8,
        "schedule.kind": "constant",
        "schedule.warmup_steps": 3,
        "optim.lr": 3e-3,
        "run.out_dir": str(tmp_path / out),
        "run.batch_size": 4,
        "run.eval_every": 0,
        "run.eval_batches": 1,
        "run.save_every": 0,
        "run.log_every": 1,
        "run.progress": False,
        "run.num_threads": 1,
        "run.device": "cpu",
    }
    args.update(extra)
    return [stage, *[f"{k}={v}" for k, v in args.items()]]
