"""Build models from configs, and load trained runs (model, config, tokenizer) for the tools.

A *run directory* holds ``config.yaml``, ``tokenizer.json``, ``metrics.jsonl`` and ``checkpoints/``; every checkpoint
also holds the config it was saved with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from calm_models import checkpoint as ckpt
from calm_models.autoencoder import Autoencoder
from calm_models.baseline import TokenLM
from calm_models.config import ConfigError, TrainConfig, load_config
from calm_models.data import DataError, PackedBlocks, TextTokenizer, encode_documents, prepare_data, read_documents
from calm_models.distributed import resolve_device
from calm_models.errors import CalmError
from calm_models.model import CALM


class RunError(CalmError, RuntimeError):
    """A run or checkpoint cannot be turned into a model (a one-line message)."""


def build_model(cfg: TrainConfig, vocab_size: int, autoencoder: Autoencoder | None = None) -> nn.Module:
    """A freshly initialised model of ``cfg.stage`` (CALM on ``autoencoder``, or a fresh one).

    Example:
        >>> from calm_models.config import preset
        >>> type(build_model(preset("tiny", "ar"), vocab_size=300)).__name__
        'TokenLM'
    """
    if cfg.stage == "ar":
        return TokenLM(cfg.baseline.token_lm(vocab_size))
    ae = autoencoder or Autoencoder(replace(cfg.autoencoder, vocab_size=vocab_size))
    return ae if cfg.stage == "autoencoder" else CALM(cfg.calm, ae)  # calm, distill: a CALM


@dataclass
class LoadedRun:
    """A trained model with what it needs: its config, tokenizer and checkpoint.

    Attributes:
        model: The model, in eval mode.
        config: The run's :class:`~calm_models.config.TrainConfig`.
        tokenizer: The run's tokenizer.
        checkpoint: The checkpoint directory loaded.
        step: Its optimiser step.
        note: Why this checkpoint and not a newer one (empty when it is the newest).
    """

    model: nn.Module
    config: TrainConfig
    tokenizer: TextTokenizer
    checkpoint: Path
    step: int
    note: str = ""

    @property
    def run_dir(self) -> Path:
        """The run directory of the checkpoint."""
        return self.checkpoint.parent.parent

    def blocks(self, files: list[str] | None = None, block_len: int | None = None) -> PackedBlocks:
        """Blocks of ``files`` (tokenised with the run's tokenizer), or of the run's validation split."""
        block_len, k = block_len or self.config.data.block_len, self.config.chunk_size
        if files:
            tokens, _ = encode_documents(self.tokenizer, read_documents(files))
        else:
            tokens = prepare_data(self.config.data, self.run_dir, chunk_size=k, progress=False)[2].tokens
        return PackedBlocks(tokens, block_len, k, pad_id=self.tokenizer.eos_id)


def _choose(path: Path) -> tuple[Path, str]:
    """The checkpoint to load for ``path`` and, if it is not the newest, why."""
    if (path / ckpt.META_FILE).exists() or not path.is_dir():
        chosen = ckpt.resolve_checkpoint(path)
        if problem := ckpt.checkpoint_problem(chosen):
            raise RunError(problem)
        return chosen, ""
    chosen, skipped = ckpt.newest_sound_checkpoint(path)
    if chosen is None:
        reason = f": {skipped[0][1]}" if skipped else " (expected checkpoints/step_*)"
        raise RunError(f"{path}: no usable checkpoint{reason}")
    note = "; ".join(f"{p.name} is unusable ({problem})" for p, problem in skipped)
    return chosen, f"using {chosen.name} because {note}" if note else ""


def load_run(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedRun:
    """Load the model of a run directory or checkpoint directory, with its tokenizer.

    Args:
        path: A run directory (its newest usable checkpoint) or a checkpoint directory.
        device: ``auto`` or a torch device.

    Raises:
        RunError: One line: no such run, no usable checkpoint, a corrupt or mismatched file, an unavailable device.
    """
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: no such run or checkpoint directory")
    try:
        chosen, note = _choose(path)
        cfg = load_config(TrainConfig, file=chosen / ckpt.CONFIG_FILE)
        tokenizer = TextTokenizer.load(chosen.parent.parent / "tokenizer.json")
        model = build_model(cfg, tokenizer.vocab_size)
        meta = ckpt.load_weights(chosen, model, verify=False)
        dev = resolve_device(device)
    except (ckpt.CheckpointError, ConfigError, DataError, ValueError, OSError) as exc:
        raise RunError(str(exc).splitlines()[0]) from None
    return LoadedRun(model.to(dev).eval(), cfg, tokenizer, chosen, int(meta["step"]), note)
