"""Every configuration of a run in one place: models, data, optimiser, schedule, run, presets.

Each section is a plain ``@dataclass`` that checks its own fields when it is built (``__post_init__``), so a config that
exists is valid and the modules built from it trust it. A run is one :class:`TrainConfig` (or a :class:`PipelineConfig`:
its stages and a sample), resolved by :func:`load_config` from the defaults, a preset, a YAML/TOML file and dotted
overrides. Merging, type checks and override parsing are OmegaConf's (structured configs); every problem becomes one
:class:`ConfigError` line that names the dotted field.

Example:
    >>> cfg = load_config(TrainConfig, preset=preset("tiny", "ar"), overrides=["optim.lr=1e-3"])
    >>> cfg.optim.lr, cfg.baseline.hidden_size
    (0.001, 256)
    >>> load_config(TrainConfig, overrides=["optim.lrr=1"])
    Traceback (most recent call last):
    ...
    calm_models.config.ConfigError: optim.lrr: Key 'lrr' not in 'OptimConfig'. Did you mean: 'lr'?
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from calm_models.errors import CalmError

#: Stages of :func:`calm_models.train.train`.
STAGES = ("autoencoder", "calm", "ar", "distill")
HEAD_TYPES = ("energy", "energy_mlp", "flow", "diffusion")
_BUILTIN_OPTIMIZERS = ("adamw", "adam", "sgd")


class ConfigError(CalmError, ValueError):
    """A configuration value, key, file or override is invalid (a one-line message)."""


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _none_allowed(obj: Any, name: str) -> bool:
    """The field holds ``None`` and its annotation (``X | None``) allows it."""
    return getattr(obj, name) is None and "None" in str(obj.__dataclass_fields__[name].type)


def _ints(obj: Any, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        _need(ok or _none_allowed(obj, name), f"{name} must be an int >= {minimum}, got {value!r}")


def _choice(obj: Any, name: str, valid: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    _need(value in valid, f"{name} must be one of {valid}, got {value!r}")


def _interval(obj: Any, low: float, high: float, *names: str, closed: str = "[)") -> None:
    for name in names:
        value = getattr(obj, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value >= low if closed[0] == "[" else value > low)
        ok = ok and (value <= high if closed[1] == "]" else value < high)
        bounds = f"{closed[0]}{low:g}, {high:g}{closed[1]}"
        _need(ok or _none_allowed(obj, name), f"{name} must be in {bounds}, got {value!r}")


# ------------------------------------------------------------------------------------ models


@dataclass
class AutoencoderConfig:
    """The robust variational autoencoder (:class:`calm_models.autoencoder.Autoencoder`).

    Attributes:
        vocab_size: Token ids ``V``; ``None`` (the default, and the presets'): the tokenizer's, filled in when the
            model is built (the vocabulary's one home is ``data``); a value that differs from it is an error.
        chunk_size: Tokens per latent vector ``K`` (paper: 4).
        latent_size: Latent dimension ``l`` (paper: 128).
        hidden_size: Hidden width ``H`` (paper: 512).
        intermediate_size: SwiGLU width; ``None`` is ``round(2.5 * H)``.
        num_token_layers: Per-token residual SwiGLU layers on each side.
        num_chunk_layers: Residual SwiGLU layers on the flattened chunk, on each side.
        kl_weight: Weight of the KL term (paper: 1e-3).
        kl_clamp: Per-dimension lower clamp of the KL, ``max(KL_d, kl_clamp)`` (paper: 0.5).
        mask_prob: Probability that an input token's embedding is zeroed in training (0.15).
        latent_dropout: Dropout on the sampled latent in training (paper: 0.15).
        random_token_prob: Chance a training token (input and target) is a random id, so all ids are trained (paper: 0).
        init_std: Standard deviation of the normal init of every linear layer and embedding.
        norm_eps: Epsilon of every RMSNorm.
        inner_norms: RMSNorms before the flatten of the ``K`` tokens and before the expand (ours); ``False``: the
            reference layout of the authors' released models, which also sets ``projection_bias``.
        projection_bias: Biases on the flatten, latent-to-hidden and expand projections.

    Example:
        >>> AutoencoderConfig(vocab_size=128_256).ffn_size
        1280
    """

    vocab_size: int | None = None
    chunk_size: int = 4
    latent_size: int = 128
    hidden_size: int = 512
    intermediate_size: int | None = None
    num_token_layers: int = 1
    num_chunk_layers: int = 1
    kl_weight: float = 1e-3
    kl_clamp: float = 0.5
    mask_prob: float = 0.15
    latent_dropout: float = 0.15
    random_token_prob: float = 0.0
    init_std: float = 0.05
    norm_eps: float = 1e-6
    inner_norms: bool = True
    projection_bias: bool = False

    def __post_init__(self) -> None:
        _ints(self, 1, "vocab_size", "chunk_size", "latent_size", "hidden_size", "intermediate_size")
        _ints(self, 0, "num_token_layers", "num_chunk_layers")
        _interval(self, 0, math.inf, "kl_weight", "kl_clamp")
        _interval(self, 0, 1, "mask_prob", "latent_dropout", "random_token_prob")
        _interval(self, 0, math.inf, "init_std", "norm_eps", closed="()")

    @property
    def ffn_size(self) -> int:
        """Resolved SwiGLU intermediate width."""
        return self.intermediate_size or int(round(2.5 * self.hidden_size))


@dataclass
class BackboneConfig:
    """The Llama-style decoder shared by CALM and the token baseline.

    Attributes:
        hidden_size: Model width ``h``.
        num_layers: Decoder blocks.
        num_heads: Query heads; ``hidden_size`` must be divisible by it.
        num_kv_heads: Key/value heads (grouped-query attention); ``None``: ``num_heads``.
        ffn_size: SwiGLU width; ``None``: ``8/3 h`` rounded up to a multiple of 64.
        max_seq_len: Longest sequence (in backbone positions) of one forward call.
        rope_theta: Base of the rotary frequencies.
        norm_eps: Epsilon of every RMSNorm.
        init_std: Normal init of every linear layer; output projections get ``init_std / sqrt(2 * num_layers)``.

    Example:
        >>> cfg = BackboneConfig(hidden_size=256, num_heads=4, num_kv_heads=2)
        >>> cfg.head_dim, cfg.resolved_kv_heads, cfg.resolved_ffn_size
        (64, 2, 704)
    """

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    ffn_size: int | None = None
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _ints(self, 1, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size", "max_seq_len")
        _interval(self, 0, math.inf, "rope_theta", "norm_eps", "init_std", closed="()")
        h, heads, kv = self.hidden_size, self.num_heads, self.resolved_kv_heads
        _need(h % heads == 0, f"hidden_size ({h}) must be divisible by num_heads ({heads})")
        _need(heads % kv == 0, f"num_heads ({heads}) must be divisible by num_kv_heads ({kv})")
        _need(self.head_dim % 2 == 0, f"hidden_size / num_heads = {self.head_dim} must be even for rotary embeddings")

    @property
    def resolved_kv_heads(self) -> int:
        """Key/value heads with the default resolved."""
        return self.num_kv_heads or self.num_heads

    @property
    def resolved_ffn_size(self) -> int:
        """Feed-forward width with the default resolved."""
        return self.ffn_size or 64 * math.ceil(8 * self.hidden_size / 3 / 64)

    @property
    def head_dim(self) -> int:
        """Per-head size ``h / num_heads``."""
        return self.hidden_size // self.num_heads


@dataclass
class HeadConfig:
    """A generative head (:mod:`calm_models.heads`); fields of the other types are ignored.

    Attributes:
        type: ``"energy"`` (CALM, our adaLN network), ``"energy_mlp"`` (CALM, the released models' MLP generator with
            LayerNorms and concatenated conditioning), ``"flow"`` (flow matching) or ``"diffusion"`` (DDPM).
        hidden_size: Head width ``w``.
        num_blocks: Residual MLP blocks.
        noise_size: Size ``z`` of the energy head's input noise.
        noise: The energy head's noise: ``"uniform"`` (``U[-1/2, 1/2]^z``, the paper's) or ``"normal"`` (``N(0, I)``).
        num_samples: Energy loss: head samples ``N`` per position (>= 2).
        num_components: Energy head: a mixture of ``J`` generators (one noise offset each; 1: one generator), weights
            predicted from the hidden state, trained by :func:`likelihood_free.mixture_energy_score` (``N / J`` each).
        beta: Energy-score exponent in ``(0, 2)``.
        max_target_draws: Flow/diffusion loss: at most this many of the ``M`` targets are used.
        flow_steps: ODE solver steps of the flow sampler.
        flow_solver: ``"euler"`` or ``"midpoint"``.
        flow_time_dist: Flow training times: ``"logit_normal"`` or ``"uniform"``.
        diffusion_steps: DDIM sampling steps (a strided subset of the training steps).
        diffusion_train_steps: Discrete diffusion timesteps ``T`` of training.
        diffusion_eta: DDIM ``eta`` in ``[0, 1]`` (1: ancestral sampling, 0: deterministic).
        norm_eps: Epsilon of the layer norms.

    Example:
        >>> HeadConfig(type="gan")
        Traceback (most recent call last):
        ...
        ValueError: type must be one of ('energy', 'energy_mlp', 'flow', 'diffusion'), got 'gan'
    """

    type: str = "energy"
    hidden_size: int = 256
    num_blocks: int = 3
    noise_size: int = 64
    noise: str = "uniform"
    num_samples: int = 8
    num_components: int = 1
    beta: float = 1.0
    max_target_draws: int = 4
    flow_steps: int = 8
    flow_solver: str = "midpoint"
    flow_time_dist: str = "logit_normal"
    diffusion_steps: int = 50
    diffusion_train_steps: int = 1000
    diffusion_eta: float = 1.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _choice(self, "type", HEAD_TYPES)
        _choice(self, "flow_solver", ("euler", "midpoint"))
        _choice(self, "noise", ("uniform", "normal"))
        _choice(self, "flow_time_dist", ("uniform", "logit_normal"))
        _ints(self, 1, "hidden_size", "noise_size", "max_target_draws", "flow_steps", "diffusion_steps")
        _ints(self, 0, "num_blocks")
        _ints(self, 2, "num_samples", "diffusion_train_steps")
        _ints(self, 1, "num_components")
        j, n = self.num_components, self.num_samples
        _need(j == 1 or self.type == "energy", f"num_components={j} needs type 'energy', got {self.type!r}")
        ok = j == 1 or n % j == 0 and n >= 2 * j
        _need(ok, f"num_samples ({n}) must be a multiple of num_components ({j}), >= 2 each")
        steps, train_steps = self.diffusion_steps, self.diffusion_train_steps
        _need(steps <= train_steps, f"diffusion_steps must be <= diffusion_train_steps, got {steps} > {train_steps}")
        _interval(self, 0, 2, "beta", closed="()")
        _interval(self, 0, 1, "diffusion_eta", closed="[]")
        _interval(self, 0, math.inf, "norm_eps", closed="()")


@dataclass
class CALMConfig:
    """CALM on a frozen autoencoder (the autoencoder is configured separately).

    Attributes:
        backbone: The Transformer over chunks.
        head: The generative head.
        num_targets: Posterior draws ``M`` per chunk used as energy-loss targets (paper: 100).
        compress: Chunk input compression: ``"swiglu"`` (``Linear(K h, h)``, then ``x + SwiGLU(RMSNorm(x))``) or
            ``"mlp"`` (the reference: ``Linear(K h, w) -> SiLU -> Linear(w, h) -> LayerNorm``).
        compress_ffn_size: Inner width ``w`` of the compression (``None``: ``2 h``).

    Example:
        >>> CALMConfig(head=HeadConfig(type="flow")).head.flow_steps
        8
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    num_targets: int = 100
    compress: str = "swiglu"
    compress_ffn_size: int | None = None

    def __post_init__(self) -> None:
        _ints(self, 1, "num_targets", "compress_ffn_size")
        _choice(self, "compress", ("swiglu", "mlp"))


@dataclass
class TokenLMConfig:
    """The token-level Transformer baseline (:class:`calm_models.baseline.TokenLM`).

    Attributes:
        vocab_size: Token ids ``V`` (>= 2).
        backbone: The decoder.
        tie_embeddings: The output layer reuses the input embedding matrix.
    """

    vocab_size: int = 4096
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        _ints(self, 2, "vocab_size")


@dataclass
class BaselineConfig(BackboneConfig):
    """The ``baseline`` section of a run: the token baseline's backbone (every :class:`BackboneConfig` field, so
    ``baseline.hidden_size`` and friends keep their keys) and its output layer.

    Attributes:
        tie_embeddings: The output layer reuses the input embedding matrix (``False``: a separate ``h x V`` matrix).

    Example:
        >>> cfg = load_config(TrainConfig, overrides=["stage=ar", "baseline.tie_embeddings=false"])
        >>> cfg.baseline.tie_embeddings, cfg.baseline.token_lm(300).backbone.hidden_size
        (False, 256)
    """

    tie_embeddings: bool = True

    def token_lm(self, vocab_size: int) -> TokenLMConfig:
        """The :class:`TokenLMConfig` of this section for a vocabulary of ``vocab_size`` ids."""
        backbone = BackboneConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BackboneConfig)})
        return TokenLMConfig(vocab_size=vocab_size, backbone=backbone, tie_embeddings=self.tie_embeddings)


@dataclass
class DistillConfig:
    """The ``distill`` stage: a one-step head learns from a trained multi-step head (:mod:`calm_models.distill`).

    The student is a CALM with an energy head (``calm``); the teacher is the CALM run at ``teacher_path`` (a flow or
    diffusion head), on the same autoencoder.

    Attributes:
        loss: ``"coupled"`` (default): the student's sample for the teacher's starting noise ``x0`` regresses the
            teacher's deterministic sample from it (needs ``calm.head.noise_size`` = the latent size, as the presets
            set for this stage, and a flow teacher or DDIM with ``eta = 0``), plus ``energy_weight`` times the energy
            loss; ``"energy"``: the energy score of the student's ``N`` samples against ``teacher_draws`` teacher
            samples per position (and the real targets, ``real_weight``). On ``markov1`` at 1000 steps the coupled
            loss reaches 93.4% of the oracle, the energy loss 85.4% (``benchmarks/synthetic.py``).
        teacher_draws: Teacher samples per position used as energy-score targets.
        teacher_steps: Sampler steps of the teacher (``None``: its own configuration).
        real_weight: Share of the real targets (posterior draws of the observed chunk) in the energy score's target
            distribution, in ``[0, 1]``; 0 uses the teacher's samples only.
        energy_weight: ``loss="coupled"``: weight of the energy loss added to the regression (0: none).
        backbone: ``"frozen"`` (the teacher's embedding, compression and backbone, not trained: only the head
            learns), ``"finetune"`` (the teacher's, trained on) or ``"scratch"`` (a fresh trunk, trained).

    Example:
        >>> DistillConfig(loss="kl")
        Traceback (most recent call last):
        ...
        ValueError: loss must be one of ('energy', 'coupled'), got 'kl'
    """

    loss: str = "coupled"
    teacher_draws: int = 16
    teacher_steps: int | None = None
    real_weight: float = 0.0
    energy_weight: float = 0.0
    backbone: str = "frozen"

    def __post_init__(self) -> None:
        _choice(self, "loss", ("energy", "coupled"))
        _choice(self, "backbone", ("frozen", "finetune", "scratch"))
        _ints(self, 1, "teacher_draws", "teacher_steps")
        _interval(self, 0, 1, "real_weight", closed="[]")
        _interval(self, 0, math.inf, "energy_weight")


# -------------------------------------------------------------------------- data and training


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenised and cut into blocks (:mod:`calm_models.data`).

    Attributes:
        train_files: Training files or glob patterns; empty: the Python standard library.
        valid_files: Validation files. Empty: the standard library's validation split when
            ``train_files`` is empty too, else the last ``valid_fraction`` of the training stream.
        tokenizer: An existing ``tokenizer.json`` (copied into the run); ``None``: train a
            byte-level BPE of ``vocab_size`` on the training text (or reuse the run's own).
        eos_token: EOS token of a loaded tokenizer; ``None`` detects it.
        vocab_size: BPE vocabulary size when training one.
        block_len: Tokens per training block, a multiple of the chunk size.
        max_train_bytes: Cap on the training text in UTF-8 bytes (``None``: all).
        max_valid_bytes: Cap on the validation text.
        tokenizer_train_bytes: Cap on the text used to train the BPE.
        valid_fraction: Share of the training stream held out when there are no ``valid_files``.
        cache_dir: Token-cache directory; ``None``: :func:`calm_models.data.default_cache_dir`.
        format: Reader format: ``auto``, ``text``, ``jsonl``, ``wikitext`` or ``python``.
        split_paragraphs: Plain text: one document per paragraph block.
        text_field: JSONL field holding the text.
        errors: ``"strict"`` or ``"replace"`` for invalid UTF-8.
    """

    train_files: list[str] = field(default_factory=list)
    valid_files: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    eos_token: str | None = None
    vocab_size: int = 4096
    block_len: int = 256
    max_train_bytes: int | None = None
    max_valid_bytes: int | None = None
    tokenizer_train_bytes: int = 20_000_000
    valid_fraction: float = 0.02
    cache_dir: str | None = None
    format: str = "auto"
    split_paragraphs: bool = False
    text_field: str = "text"
    errors: str = "strict"

    def __post_init__(self) -> None:
        for name in ("train_files", "valid_files"):
            value = getattr(self, name)
            _need(isinstance(value, list), f"{name} must be a list of paths or glob patterns, got {value!r}")
        _ints(self, 257, "vocab_size")
        _ints(self, 1, "block_len", "max_train_bytes", "max_valid_bytes", "tokenizer_train_bytes")
        _interval(self, 0, 1, "valid_fraction", closed="()")
        _choice(self, "format", ("auto", "text", "jsonl", "wikitext", "python"))
        _choice(self, "errors", ("strict", "replace"))
        _need(bool(self.text_field), "text_field must be a non-empty string")


@dataclass
class OptimConfig:
    """The optimiser (:func:`calm_models.optim.build_optimizer`).

    Attributes:
        name: ``adamw``, ``adam``, ``sgd`` or a dotted class path (``torch.optim.RAdam``, ``torch_optimizer.Lamb``).
        lr: Peak learning rate.
        betas: Adam ``(beta1, beta2)``.
        weight_decay: Decoupled weight decay of matrices (not of biases, norms, embeddings).
        eps: Adam epsilon.
        grad_clip: Maximum global gradient norm; 0 disables clipping.
        momentum: SGD momentum.
        extra: Further keyword arguments of the optimiser.
    """

    name: str = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    grad_clip: float = 1.0
    momentum: float = 0.9
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = self.name
        _need(
            name.lower() in _BUILTIN_OPTIMIZERS or "." in name.strip("."),
            f"name: unknown optimizer {name!r}; use {', '.join(_BUILTIN_OPTIMIZERS)} or a dotted class path such as "
            "torch.optim.RAdam (torch-optimizer names moved: 'lamb' is now torch_optimizer.Lamb)",
        )
        _interval(self, 0, math.inf, "lr", closed="()")
        betas = tuple(self.betas)
        _need(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"betas must lie in [0, 1), got {betas}")
        _interval(self, 0, math.inf, "weight_decay", "grad_clip", "momentum")
        _interval(self, 0, math.inf, "eps", closed="()")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up, then constant, cosine or linear decay.

    Attributes:
        kind: ``"constant"`` (as in the CALM paper), ``"cosine"`` or ``"linear"``.
        warmup_steps: Linear warm-up steps.
        min_lr_ratio: Final learning rate of the decaying kinds, as a fraction of the peak.
    """

    kind: str = "constant"
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _choice(self, "kind", ("constant", "cosine", "linear"))
        _ints(self, 0, "warmup_steps")
        _interval(self, 0, 1, "min_lr_ratio", closed="[]")


@dataclass
class RunConfig:
    """How a run is executed (not what is trained).

    Attributes:
        out_dir: Run directory: config, tokenizer, checkpoints, metrics.
        steps: Optimiser steps (the schedule's horizon).
        batch_size: Blocks per rank per micro-step.
        grad_accum: Micro-steps per optimiser step.
        max_time_s: Stop (and save) after this many seconds of training.
        eval_every: Evaluate every this many steps (0: only at the end).
        eval_batches: Validation batches per evaluation (per rank), of blocks spread evenly over the split.
        eval_stride: BrierLM position spacing in tokens (a multiple of the chunk size).
        save_every: Checkpoint every this many steps (0: only at the end).
        log_every: Write training metrics every this many steps.
        keep_last: Checkpoints kept.
        max_nonfinite_skips: Non-finite steps (loss or gradient norm) skipped and counted; one more stops the run.
        seed: Seed of initialisation, data order and sampling.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda`` or ``mps``.
        precision: ``auto`` (bf16 autocast on GPUs that support it), ``bf16`` or ``fp32``.
        compile: Wrap the training objective in :func:`torch.compile`.
        strategy: ``ddp``, ``fsdp`` or ``none`` (used when more than one process runs).
        num_threads: CPU threads of torch (0: torch's default).
        tensorboard: Also log to TensorBoard.
        progress: Show a progress bar.
    """

    out_dir: str = "runs/calm"
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    max_time_s: float | None = None
    eval_every: int = 200
    eval_batches: int = 8
    eval_stride: int = 8
    save_every: int = 500
    log_every: int = 10
    keep_last: int = 2
    max_nonfinite_skips: int = 0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    strategy: str = "ddp"
    num_threads: int = 0
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        _ints(self, 1, "steps", "batch_size", "grad_accum", "eval_batches", "eval_stride", "keep_last")
        _ints(self, 0, "eval_every", "save_every", "log_every", "num_threads", "max_nonfinite_skips")
        _interval(self, 0, math.inf, "max_time_s", closed="()")
        _choice(self, "device", ("auto", "cpu", "cuda", "mps"))
        _choice(self, "precision", ("auto", "bf16", "fp32"))
        _choice(self, "strategy", ("ddp", "fsdp", "none"))


@dataclass
class TrainConfig:
    """Everything one stage needs; the other stages ignore the sections they do not use.

    Each section (``data``, ``autoencoder``, ``calm``, ``distill``, ``baseline``, ``optim``, ``schedule``, ``run``) is
    documented by its class above, e.g. ``optim`` by :class:`OptimConfig`.

    Attributes:
        stage: ``autoencoder``, ``calm``, ``ar`` (the token baseline) or ``distill`` (a one-step head from a teacher).
        autoencoder_path: ``calm`` stage: the trained autoencoder's run or checkpoint; ``distill``: optional, must be
            the teacher's autoencoder.
        teacher_path: ``distill`` stage: the CALM run whose head teaches; its autoencoder and tokenizer are used too.
    """

    stage: str = "autoencoder"
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    autoencoder_path: str | None = None
    teacher_path: str | None = None
    calm: CALMConfig = field(default_factory=CALMConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _choice(self, "stage", STAGES)
        k = self.chunk_size
        _need(self.data.block_len % k == 0, f"data.block_len={self.data.block_len} must be a multiple of K={k}")
        if self.stage == "distill":
            head = self.calm.head.type
            _need(head in ("energy", "energy_mlp"), f"calm.head.type must be a one-step head for distill, got {head!r}")
        if self.stage in ("calm", "distill"):
            _need(self.data.block_len >= 2 * k, f"data.block_len must hold 2 chunks of {k} tokens")
        if self.stage != "autoencoder":
            stride, most = self.run.eval_stride, self.data.block_len - 4
            what = f"a multiple of K={k} and at most data.block_len - 4 = {most} (a 4-token BrierLM target)"
            _need(stride % k == 0 and stride <= most, f"run.eval_stride={stride} must be {what}")

    @property
    def chunk_size(self) -> int:
        """``K`` of this stage (1 for the token baseline)."""
        return 1 if self.stage == "ar" else self.autoencoder.chunk_size

    def model_sections(self) -> list[str]:
        """Sections that define this stage's weights (they must match when resuming)."""
        calm = ["autoencoder", "calm"]
        return {"autoencoder": ["autoencoder"], "calm": calm, "ar": ["baseline"], "distill": [*calm, "teacher_path"]}[
            self.stage
        ]


@dataclass
class PipelineConfig:
    """Autoencoder stage, CALM on it, the token baseline at the same training FLOPs, BrierLM of both, a sample.

    Each stage is the preset's :class:`TrainConfig` of that stage with the section's keys merged over it (any key of
    :class:`TrainConfig`, e.g. ``lm_stage.calm.head.type=flow``); the pipeline itself sets ``stage``,
    ``run.out_dir`` (``out_dir/autoencoder``, ``calm``, ``baseline``), the CALM stage's ``autoencoder_path``, the
    baseline's tokenizer (the autoencoder run's) and its ``run.steps`` (matched to the training FLOPs).

    Attributes:
        out_dir: Parent directory of the ``autoencoder/``, ``calm/`` and ``baseline/`` runs.
        preset: The preset every stage starts from (``tiny``, ``small``, ``m``; ``--preset`` on the command line).
        ae_stage: Keys of the autoencoder stage that differ from the preset.
        lm_stage: Keys of the CALM stage that differ from the preset.
        ar_stage: Keys of the token baseline's stage that differ from the preset; ``compare=False`` skips it.
        compare: Train and score the baseline.
        prompt: Prompt of the sample printed at the end.
        sample_tokens: Tokens generated for it.
        temperature: Sampling temperature in ``(0, 1]``.
        eval_blocks: Validation blocks of the final BrierLM (at most).

    Example:
        >>> cfg = load_config(PipelineConfig, overrides=["lm_stage.calm.head.type=flow"])
        >>> cfg.stage_config("calm").calm.head.type, cfg.stage_config("autoencoder").run.steps
        ('flow', 400)
        >>> load_config(PipelineConfig, overrides=["lm_stage.calm.head.typo=flow"])
        Traceback (most recent call last):
        ...
        calm_models.config.ConfigError: lm_stage.calm.head.typo: Key 'typo' not in 'HeadConfig'. Did you mean: 'type'?
    """

    out_dir: str = "runs/pipeline"
    preset: str = "tiny"
    ae_stage: dict[str, Any] = field(default_factory=dict)
    lm_stage: dict[str, Any] = field(default_factory=dict)
    ar_stage: dict[str, Any] = field(default_factory=dict)
    compare: bool = True
    prompt: str = "def "
    sample_tokens: int = 64
    temperature: float = 1.0
    eval_blocks: int = 2048

    def __post_init__(self) -> None:
        _ints(self, 1, "sample_tokens", "eval_blocks")
        _need(bool(self.prompt), "prompt must not be empty (the sample continues it)")
        _interval(self, 0, 1, "temperature", closed="(]")
        _choice(self, "preset", tuple(PRESETS))
        for stage in _PIPELINE_STAGES:  # a typo fails now, not after an hour of training
            self.stage_config(stage)

    def stage_config(self, stage: str, **fixed: Any) -> TrainConfig:
        """The :class:`TrainConfig` of ``stage`` (``autoencoder``, ``calm`` or ``ar``) with ``fixed`` dotted keys.

        Raises:
            ConfigError: One line naming the key in its section, e.g. ``lm_stage.calm.head.typo: Key 'typo' not in
                'HeadConfig'``.
        """
        from omegaconf import OmegaConf

        section = _PIPELINE_STAGES[stage]
        data = OmegaConf.create(getattr(self, section))
        for key, value in {"stage": stage, **fixed}.items():  # values as they are, not parsed as YAML (paths)
            OmegaConf.update(data, key, str(value) if isinstance(value, os.PathLike) else value, force_add=True)
        try:
            return load_config(TrainConfig, preset=preset(self.preset, stage), data=OmegaConf.to_container(data))
        except ConfigError as exc:
            raise ConfigError(f"{section}.{exc}") from None


#: The pipeline's sections of its three stages.
_PIPELINE_STAGES = {"autoencoder": "ae_stage", "calm": "lm_stage", "ar": "ar_stage"}


# ------------------------------------------------------------------------------------ presets


def _student(stage: str, latent_size: int = 128) -> dict[str, Any]:
    """The distill stage's head: normal noise of the latent size, fed the teacher's own noise (``distill.loss=coupled``)."""
    return {"noise_size": latent_size, "noise": "normal"} if stage == "distill" else {}


def _tiny(stage: str) -> TrainConfig:
    """Minutes on a 2-core CPU, on the stdlib corpus; beta 0.5, not the paper's 1, scores higher at this scale."""
    backbone = BackboneConfig(hidden_size=256, num_layers=4, num_heads=4, ffn_size=704, max_seq_len=256)
    lm = stage != "autoencoder"
    steps, batch, every, evals = (3000, 16, 1000, 16) if lm else (400, 32, 100, 4)
    n = 3_000_000  # bytes of training text (and of the tokenizer's), a tenth of it for validation
    return TrainConfig(
        stage=stage,
        data=DataConfig(
            vocab_size=2048, block_len=64, max_train_bytes=n, max_valid_bytes=n // 10, tokenizer_train_bytes=n
        ),
        autoencoder=AutoencoderConfig(hidden_size=256, intermediate_size=640, random_token_prob=0.02),
        calm=CALMConfig(backbone=backbone, head=HeadConfig(hidden_size=256, num_blocks=2, beta=0.5, **_student(stage))),
        baseline=BaselineConfig(**dataclasses.asdict(backbone)),
        optim=OptimConfig(lr={"autoencoder": 5e-3, "calm": 2e-3, "ar": 1e-3, "distill": 2e-3}[stage]),
        schedule=ScheduleConfig(kind="cosine", warmup_steps=100 if lm else 50),
        run=RunConfig(
            out_dir=f"runs/tiny-{stage}", steps=steps, batch_size=batch, eval_every=every, eval_batches=evals
        ),
    )


def _small(stage: str) -> TrainConfig:
    """A few million parameters for CPU experiments on real English text (pass files)."""
    cfg, steps = _tiny(stage), 3300 if stage == "autoencoder" else 3000
    return replace(
        cfg,
        data=DataConfig(block_len=128),  # no byte caps, the default vocabulary and tokenizer budget
        run=replace(cfg.run, out_dir=f"runs/small-{stage}", eval_every=500, steps=steps),
    )


def _m(stage: str) -> TrainConfig:
    """The CALM paper's M size (K=4, l=128; a GPU preset)."""
    backbone = BackboneConfig(hidden_size=1024, num_layers=16, num_heads=16, ffn_size=2752, max_seq_len=2048)
    run_args = dict(steps=250_000, batch_size=8, grad_accum=8, eval_every=2000, eval_batches=32, save_every=2000)
    return TrainConfig(
        stage=stage,
        data=DataConfig(vocab_size=32768, block_len=2048),
        autoencoder=AutoencoderConfig(num_token_layers=2, num_chunk_layers=2),
        calm=CALMConfig(backbone=backbone, head=HeadConfig(hidden_size=1024, num_blocks=4, **_student(stage))),
        baseline=BaselineConfig(**dataclasses.asdict(backbone)),
        optim=OptimConfig(lr=3e-4),
        schedule=ScheduleConfig(kind="constant", warmup_steps=2000),
        run=RunConfig(out_dir=f"runs/m-{stage}", **run_args),
    )


#: The named presets: functions from a stage name to a :class:`TrainConfig`.
PRESETS = {"tiny": _tiny, "small": _small, "m": _m}


def preset(name: str, stage: str) -> TrainConfig:
    """A fresh :class:`TrainConfig`: the preset ``name`` (one of :data:`PRESETS`) for ``stage`` (one of :data:`STAGES`).

    Raises:
        ConfigError: For an unknown name or stage.

    Example:
        >>> preset("tiny", "ar").baseline.hidden_size
        256
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; valid stages: {list(STAGES)}")
    return PRESETS[name](stage)


# ------------------------------------------------------------------------------------- loader


def _one_line(exc: Exception) -> str:
    key = getattr(exc, "full_key", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{key}: {text}" if key else text


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    """Instantiate the dataclass tree bottom-up so that a failed check names its dotted path."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = data[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            value = _build(hints[f.name], value, f"{path}.{f.name}" if path else f.name)
        elif isinstance(value, list) and typing.get_origin(hints[f.name]) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path + ': ' if path else ''}{_one_line(exc)}") from None


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"unsupported config file type {suffix!r} for {path}; use .yaml, .yml or .toml")
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            data = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli").loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # OS, decoding, YAML and TOML parser errors
        raise ConfigError(f"cannot parse {path}: {_one_line(exc)}") from None
    if not isinstance(data, (dict, type(None))):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data or {}


def load_config(
    cls: type,
    *,
    preset: Any = None,
    file: str | os.PathLike[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    data: dict[str, Any] | None = None,
) -> Any:
    """Resolve a configuration: defaults < preset < data < file < dotted overrides, then check it.

    Args:
        cls: The root dataclass, e.g. :class:`TrainConfig`.
        preset: An instance of ``cls`` to start from instead of its defaults.
        file: A YAML or TOML file holding any subset of the fields.
        overrides: ``"dotted.key=value"`` strings (YAML values: ``optim.lr=3e-4``,
            ``data.train_files=[a.jsonl,b.jsonl]``, ``data.tokenizer=null``).
        data: A (partial) mapping merged before the file, e.g. a saved ``config.yaml``.

    Returns:
        A checked instance of ``cls``.

    Raises:
        ConfigError: One line naming the file or the dotted field: an unknown key (with a
            suggestion), a value of the wrong type, a failed check.

    Example:
        >>> load_config(ScheduleConfig, overrides=["warmup_steps=-1"])
        Traceback (most recent call last):
        ...
        calm_models.config.ConfigError: warmup_steps must be an int >= 0, got -1
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.structured(preset if preset is not None else cls)
        merged = OmegaConf.merge(merged, data or {}, _read_file(file) if file is not None else {})
        if bad := [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]:
            raise ConfigError(f"override {bad[0]!r} must look like key.sub=value")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        plain = OmegaConf.to_container(merged, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    return _build(cls, plain, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config tree as plain JSON/YAML values (tuples become lists).

    Example:
        >>> config_to_dict(ScheduleConfig())
        {'kind': 'constant', 'warmup_steps': 2000, 'min_lr_ratio': 0.1}
    """

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    return plain(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write a config as YAML, atomically; :func:`load_config` (``data=``) reads it back."""
    import yaml

    from calm_models._layers import atomic_write

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return atomic_write(Path(path), text.encode("utf-8"))


def flatten_config(cfg: Any) -> dict[str, Any]:
    """A config (dataclass or dict) as ``{"dotted.path": leaf}``.

    Example:
        >>> flatten_config({"model": {"hidden": 8, "betas": (0.9, 0.95)}, "seed": 0})
        {'model.hidden': 8, 'model.betas': [0.9, 0.95], 'seed': 0}
    """

    def walk(node: Any, prefix: str) -> dict[str, Any]:
        if not (isinstance(node, dict) and node):
            return {prefix: node}
        subtrees = (walk(value, f"{prefix}.{key}" if prefix else str(key)) for key, value in node.items())
        return {k: v for subtree in subtrees for k, v in subtree.items()}

    return walk(config_to_dict(cfg), "")


def diff_configs(a: Any, b: Any, sections: list[str] | None = None) -> list[str]:
    """The sorted dotted paths whose values differ between two configs (dataclasses or dicts).

    Only the top-level ``sections`` are compared when given; a path present on one side only is not compared.

    Example:
        >>> diff_configs({"model": {"h": 8, "l": 2}, "lr": 1}, {"model": {"h": 16, "l": 2}, "lr": 2}, ["model"])
        ['model.h']
    """
    fa, fb = flatten_config(a), flatten_config(b)
    paths = [p for p in fa.keys() & fb.keys() if sections is None or p.split(".")[0] in sections]
    return sorted(p for p in paths if fa[p] != fb[p])
