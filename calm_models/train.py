"""One training loop for every stage: the autoencoder, CALM, the token baseline and distillation.

Command line::

    python -m calm_models.train STAGE [--preset tiny|small|m] [--config FILE] [--teacher RUN]
        [--resume] [--fallback] [--overwrite] [key=value ...]

``STAGE`` is ``autoencoder``, ``calm``, ``ar`` (the token baseline), ``distill`` (a one-step head
trained on the samples of a trained CALM, ``--teacher RUN``; :mod:`calm_models.distill`) or
``pipeline`` (autoencoder, then CALM on it, the baseline at the same FLOPs, BrierLM and a
sample). Settings: defaults < preset < file < dotted overrides
(:func:`calm_models.config.load_config`). Under ``torchrun`` the loop runs data-parallel (DDP, or
FSDP with ``run.strategy=fsdp``).

The loop reads top to bottom: claim the run directory -> data -> model -> optimiser -> resume
-> loop (accumulate, clip, step, log, evaluate, save) -> final save -> final evaluation.
Guarantees: checkpoints are atomic (the last good one survives any crash); a run directory
belongs to one run (a lock, and no silent mixing with an earlier run); a non-finite loss or
gradient stops the run before it touches the weights (or skips the step, if configured);
Ctrl-C or SIGTERM saves and exits with status 130 or 143.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from calm_models import checkpoint as ckpt
from calm_models import distributed
from calm_models.autoencoder import reconstruction_accuracy
from calm_models.backbone import Block
from calm_models.config import STAGES, ConfigError, PipelineConfig, TrainConfig, load_config, preset, save_config
from calm_models.data import BlockLoader, DataError, PackedBlocks, TextTokenizer, prepare_data
from calm_models.distill import Distiller
from calm_models.errors import CalmError
from calm_models.evaluate import evaluate_brier_lm, format_result, held_out_batches, score_run
from calm_models.generate import generate_text
from calm_models.metrics import MetricsLogger
from calm_models.optim import build_optimizer, build_scheduler
from calm_models.runs import RunError, build_model, load_run


class TrainError(CalmError, RuntimeError):
    """Training cannot start or go on (a one-line message)."""


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        run_dir: The run directory.
        step: The optimiser step reached (and saved).
        interrupted: The signal that stopped the run early (``SIGINT``/``SIGTERM``), or ``None``.
        metrics: The final validation metrics (empty when interrupted).
    """

    run_dir: Path
    step: int
    interrupted: int | None = None
    metrics: dict = field(default_factory=dict)


class _Objective(nn.Module):
    """``forward(tokens, mask) = model.loss(tokens, mask)``: what DDP, FSDP and compile wrap."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict:
        return self.model.loss(tokens, mask)


class _Signals:
    """Turns SIGINT and SIGTERM into a stop request, checked at every step boundary."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        with suppress(ValueError):  # not the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """A :class:`filelock.FileLock` on ``run_dir/.lock`` for the run's life (the OS releases it when its process
    dies); ``run_dir/.lock.owner`` says who holds it, and a leftover one names the dead holder."""
    from filelock import FileLock, Timeout

    lock, owner = FileLock(run_dir / ".lock"), run_dir / ".lock.owner"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner.read_text().strip() if owner.exists() else ""
        raise TrainError(
            f"{run_dir} is in use by a running training ({holder or 'another process'}); "
            "use another run.out_dir or wait for it to finish"
        ) from None
    if owner.exists() and (previous := owner.read_text().strip()):
        print(f"note: taking over the stale lock of {previous} (that process is gone)", file=sys.stderr)
    owner.write_text(f"pid {os.getpid()} on {socket.gethostname()}")
    try:
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def _claim(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run with an earlier one in the same directory."""
    if not os.access(run_dir, os.W_OK):
        raise TrainError(f"run.out_dir={run_dir} is not writable")
    old = [p for p in (run_dir / "checkpoints", run_dir / "metrics.jsonl") if p.exists()]
    if old and not resume:
        if not overwrite:
            raise TrainError(
                f"{run_dir} holds an earlier run ({old[0].name}); pass --resume to "
                "continue it or --overwrite to start over (deleting it)"
            )
        for p in old + [run_dir / "metrics.csv", run_dir / "config.yaml"]:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _load(path: str | None, key: str, stages: tuple[str, ...], what: str):
    """The run at ``path`` (the config field ``key``), which must be of one of ``stages``."""
    if not path:
        raise TrainError(f"{key}: the stage needs {what}")
    try:
        run = load_run(path, device="cpu")
    except RunError as exc:
        raise TrainError(f"{key}: {exc}") from None
    if run.config.stage not in stages:
        raise TrainError(f"{key}={path} is a {run.config.stage!r} run, not {what}")
    return run


def _stage_config(cfg: TrainConfig) -> tuple[TrainConfig, nn.Module | None, nn.Module | None]:
    """The config resolved with the stage's source run (CALM: its autoencoder; distill: its teacher), the frozen
    autoencoder and the teacher (``None`` for the other stages)."""
    if cfg.stage not in ("calm", "distill"):
        return cfg, None, None
    teacher = None
    if cfg.stage == "distill":
        source = teacher = _load(cfg.teacher_path, "teacher_path", ("calm", "distill"), "a trained CALM (the teacher)")
        ae = teacher.model.autoencoder
        if cfg.autoencoder_path:  # given: it must be the teacher's
            own = _load(cfg.autoencoder_path, "autoencoder_path", ("autoencoder",), "an autoencoder").model.state_dict()
            theirs = ae.state_dict()
            if own.keys() != theirs.keys() or not all(torch.equal(v, theirs[k]) for k, v in own.items()):
                raise TrainError(
                    f"teacher_path={cfg.teacher_path} was trained on another autoencoder than "
                    f"autoencoder_path={cfg.autoencoder_path}; leave autoencoder_path unset to use the teacher's"
                )
        if cfg.distill.backbone != "scratch":  # the student's trunk is a copy of the teacher's
            trunk = {k: getattr(teacher.config.calm, k) for k in ("backbone", "compress", "compress_ffn_size")}
            cfg = replace(cfg, calm=replace(cfg.calm, **trunk))
    else:
        source = _load(cfg.autoencoder_path, "autoencoder_path", ("autoencoder",), "a trained autoencoder")
        ae = source.model
    data = replace(cfg.data, tokenizer=str(source.run_dir / "tokenizer.json"))
    return replace(cfg, autoencoder=source.config.autoencoder, data=data), ae, teacher and teacher.model


@dataclass
class _Session:
    """One training run as it goes: what :func:`_setup` builds and the counters :func:`_train_step` advances."""

    cfg: TrainConfig
    info: distributed.DistInfo
    run_dir: Path
    model: nn.Module  # what is saved and evaluated
    objective: nn.Module  # what is trained: the model (or the distiller around it), wrapped for DDP/FSDP/compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: BlockLoader
    valid: PackedBlocks
    flops_per_token: float
    tokens_per_step: int
    logger: MetricsLogger | None = None
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    skipped: int = 0
    started: float = 0.0  # perf_counter() at step 0 of the whole run (resumed runs count their earlier time)


def _setup(cfg: TrainConfig, info: distributed.DistInfo, resume: bool, fallback: bool, show: bool) -> _Session:
    """Data, model, optimiser and schedule of a claimed run directory; resumed from a checkpoint if asked."""
    run, run_dir, main_process = cfg.run, Path(cfg.run.out_dir), info.is_main
    cfg, autoencoder, teacher = _stage_config(cfg)
    if not main_process:  # rank 0 trains the tokenizer and fills the token cache first
        distributed.barrier()
    tokenizer, train_blocks, valid = prepare_data(cfg.data, run_dir, chunk_size=cfg.chunk_size, progress=show)
    if main_process:
        distributed.barrier()
    if cfg.autoencoder.vocab_size not in (None, tokenizer.vocab_size):
        raise ConfigError(
            f"autoencoder.vocab_size={cfg.autoencoder.vocab_size} but the tokenizer has {tokenizer.vocab_size} tokens; "
            "leave it unset (it comes from the tokenizer; data.vocab_size sizes a new one)"
        )
    cfg = replace(cfg, autoencoder=replace(cfg.autoencoder, vocab_size=tokenizer.vocab_size))
    loader = BlockLoader(
        train_blocks, run.batch_size * run.grad_accum, seed=run.seed, rank=info.rank, world_size=info.world_size
    )
    model = build_model(cfg, tokenizer.vocab_size, autoencoder).to(info.device)
    trained = model  # what the objective trains: the model, or the distiller around it
    if teacher is not None:
        try:
            trained = Distiller(model, teacher.to(info.device), cfg.distill)
        except ValueError as exc:
            raise TrainError(f"distill: {exc}") from None
    objective = distributed.wrap_model(_Objective(trained), info, run.strategy, fsdp_modules=(Block,))
    optimizer = build_optimizer(model, cfg.optim)  # after FSDP replaced the parameters
    scheduler = build_scheduler(optimizer, cfg.schedule, run.steps)
    s = _Session(
        cfg, info, run_dir, model, torch.compile(objective) if run.compile else objective, optimizer, scheduler,
        loader, valid, trained.flops_per_token(cfg.data.block_len)["train"],
        run.batch_size * run.grad_accum * info.world_size * cfg.data.block_len,
    )  # fmt: skip
    resumed = resume and _resume(s, fallback)
    if main_process:
        save_config(cfg, run_dir / "config.yaml")
    resume_step = s.step if resumed else None
    s.logger = MetricsLogger(run_dir, enabled=main_process, tensorboard=run.tensorboard, resume_step=resume_step)
    s.started = time.perf_counter() - s.elapsed
    return s


def _resume(s: _Session, fallback: bool) -> bool:
    """Restore the run's checkpoint (False if it has none); a corrupt newest one is named, and skipped only with
    ``fallback``."""
    good, skipped = ckpt.newest_sound_checkpoint(s.run_dir)
    if skipped:
        newest, problem = skipped[0]
        if good is None:
            raise TrainError(f"cannot resume: {problem}, and no older checkpoint is complete")
        if not fallback:
            raise TrainError(
                f"cannot resume from the newest checkpoint {newest.name}: {problem}; the "
                f"newest complete one is {good.name}: pass --fallback to resume from it"
            )
        reason = f"the newest complete checkpoint, because {newest.name} is unusable ({problem})"
        print(f"note: resuming from {good.name}, {reason}", file=sys.stderr)
    elif (good := good or ckpt.latest_checkpoint(s.run_dir)) is None:  # also custom-named checkpoints
        print(f"note: --resume given but {s.run_dir} has no checkpoint; starting from scratch", file=sys.stderr)
        return False
    state = ckpt.load_checkpoint(good, sections=s.cfg.model_sections(), **_parts(s))
    s.step, s.tokens, s.elapsed, s.skipped = state["step"], state["tokens"], state["elapsed"], state["skipped"]
    try:
        s.loader.load_state_dict(state["loader"])
    except (ValueError, KeyError) as exc:
        raise TrainError(f"cannot resume the data position of {good}: {exc}") from None
    rngs = state["rng"]
    ckpt.restore_rng_state(rngs[s.info.rank] if len(rngs) == s.info.world_size else rngs[0])
    if s.info.is_main:
        print(f"resuming from {good} (step {s.step})", file=sys.stderr)
    return True


def _parts(s: _Session) -> dict:
    return {"model": s.model, "optimizer": s.optimizer, "scheduler": s.scheduler, "config": s.cfg}


def _nonfinite_policy(s: _Session, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Skip a step with a non-finite loss or gradient norm (counted) up to ``run.max_nonfinite_skips`` times, then stop."""
    s.optimizer.zero_grad(set_to_none=True)
    if s.skipped >= s.cfg.run.max_nonfinite_skips:
        s.logger.close()
        raise TrainError(
            f"step {s.step + 1}: non-finite loss ({float(loss):g}) or gradient norm ({float(grad_norm):g}); "
            f"stopped without saving. The last good checkpoint is {ckpt.latest_checkpoint(s.run_dir) or 'none'}; "
            "lower optim.lr, or set run.max_nonfinite_skips to skip isolated spikes"
        )
    s.skipped += 1
    s.logger.log({"nonfinite_skips": s.skipped}, step=s.step + 1, split="train")


def _train_step(s: _Session, autocast) -> dict:
    """One optimiser step: accumulate ``run.grad_accum`` micro-batches, clip, apply (or skip); the train record."""
    run, device, t0 = s.cfg.run, s.info.device, time.perf_counter()
    tokens, mask = (t.to(device).chunk(run.grad_accum) for t in next(s.loader))  # accum x (b, L)
    loss_sum = torch.zeros((), device=device)
    for micro, (tok, msk) in enumerate(zip(tokens, mask, strict=True)):
        sync = micro == run.grad_accum - 1 or not hasattr(s.objective, "no_sync")
        with nullcontext() if sync else s.objective.no_sync(), autocast:
            loss = s.objective(tok, msk)["loss"] / run.grad_accum
        loss.backward()
        loss_sum += loss.detach()
    trainable = [p for p in s.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, s.cfg.optim.grad_clip or math.inf)
    if bool(torch.isfinite(distributed.all_reduce_mean(torch.stack([loss_sum, grad_norm]))).all()):
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
    else:
        _nonfinite_policy(s, loss_sum, grad_norm)
    s.scheduler.step()
    s.step, s.tokens = s.step + 1, s.tokens + s.tokens_per_step
    s.elapsed = time.perf_counter() - s.started  # wall time of the run, evaluations and saves included
    record = {"loss": loss_sum, "lr": s.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": s.tokens}
    tok_s = s.tokens_per_step / max(time.perf_counter() - t0, 1e-9)
    return record | {"tokens_per_s": tok_s, "train_flops": s.flops_per_token * s.tokens, "time_s": s.elapsed}


def _log(s: _Session, record: dict, bar: tqdm) -> None:
    """Write a train record (its loss averaged over ranks) and show it on the progress bar."""
    record = record | {
        "loss": float(distributed.all_reduce_mean(record["loss"])),
        "grad_norm": float(record["grad_norm"]),
    }
    s.logger.log(record, step=s.step, split="train")
    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")


def _save(s: _Session) -> None:
    """A checkpoint of this step boundary, with every rank's RNG state (a collective under several ranks)."""
    rngs = [ckpt.capture_rng_state()] * s.info.world_size
    if s.info.world_size > 1:
        torch.distributed.all_gather_object(rngs, rngs[0])
    counters = {"step": s.step, "tokens": s.tokens, "elapsed": s.elapsed, "skipped": s.skipped}
    state = {**counters, "loader": s.loader.state_dict(), "rng": rngs}
    ckpt.save_checkpoint(s.run_dir, step=s.step, train_state=state, keep_last=s.cfg.run.keep_last, **_parts(s))


@torch.no_grad()
def _validate(s: _Session) -> dict:
    """Validation loss and the stage's metric (reconstruction accuracy or BrierLM) over ranks, logged and shown."""
    cfg, info, model = s.cfg, s.info, s.model
    size, world = cfg.run.batch_size, info.world_size
    batches = held_out_batches(
        s.valid, cfg.run.eval_batches * size * world, size, rank=info.rank, world_size=world, equal=True
    )
    batches = [(t.to(info.device), m.to(info.device)) for t, m in batches]
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=info.device).manual_seed(cfg.run.seed + 1000 + info.rank)  # not the training's
    losses = torch.stack([model.loss(t, m, generator=gen)["loss"].float() for t, m in batches])
    out = {"tokens": s.tokens, "train_flops": s.flops_per_token * s.tokens}
    out["loss"] = float(distributed.all_reduce_mean(losses.mean()))
    if cfg.stage == "autoencoder":
        for sigma in (0.0, 0.3):
            acc = torch.stack([reconstruction_accuracy(model, t, sigma, gen) for t, _ in batches])
            out[f"recon_acc_sigma{sigma:g}"] = float(distributed.all_reduce_mean(acc.mean()))
    else:
        out.update(evaluate_brier_lm(model, batches, stride=cfg.run.eval_stride, generator=gen).to_dict())
    model.train(was_training)
    s.logger.log(out, step=s.step, split="valid")
    if s.info.is_main:
        keys = ("loss", "recon_acc_sigma0", "recon_acc_sigma0.3", "brier_lm", "brier_lm_se")
        tqdm.write(f"step {s.step} valid: " + ", ".join(f"{k}={out[k]:.4f}" for k in keys if k in out))
    return out


def _init_process(cfg: TrainConfig) -> distributed.DistInfo:
    """Threads, the process group (under ``torchrun``), the seed of the initialisation, a usable ``run.out_dir``."""
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    try:
        info = distributed.init_distributed(cfg.run.device)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    torch.manual_seed(cfg.run.seed)  # the same initialisation on every rank
    run_dir = Path(cfg.run.out_dir)
    if info.is_main and run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"run.out_dir={run_dir} is a file, not a directory")
    return info


def train(cfg: TrainConfig, *, resume: bool = False, fallback: bool = False, overwrite: bool = False) -> TrainResult:
    """Train one stage (the caller's config is not modified): setup, then step, evaluate and save until done.

    Args:
        cfg: A resolved configuration.
        resume: Continue from the run directory's latest checkpoint.
        fallback: With ``resume``, take the newest complete checkpoint when the latest is corrupt.
        overwrite: Delete an earlier run found in ``run.out_dir`` instead of refusing.

    Raises:
        TrainError, ConfigError, DataError, CheckpointError: One-line messages.
    """
    run, run_dir = cfg.run, Path(cfg.run.out_dir)
    info = _init_process(cfg)
    with _run_lock(run_dir) if info.is_main else nullcontext():
        if info.is_main:
            _claim(run_dir, resume, overwrite)
        show = run.progress and info.is_main
        s = _setup(cfg, info, resume, fallback, show)
        autocast = distributed.autocast_context(info.device, run.precision)
        bar = tqdm(total=run.steps, initial=s.step, desc=cfg.stage, dynamic_ncols=True, disable=not show)
        s.model.train()
        with _Signals() as signals:
            while s.step < run.steps and signals.received is None and (run.max_time_s or math.inf) > s.elapsed:
                record = _train_step(s, autocast)
                if s.step % run.log_every == 0 or s.step == run.steps:
                    _log(s, record, bar)
                bar.update(1)
                if run.eval_every and s.step % run.eval_every == 0 and s.step < run.steps:
                    _validate(s)
                if run.save_every and s.step % run.save_every == 0 and s.step < run.steps:
                    _save(s)
        bar.close()
        _save(s)  # first the final steps, then anything that could fail
        if signals.received is not None and info.is_main:
            print(f"interrupted at step {s.step}: saved {run_dir}", file=sys.stderr)
        metrics = _validate(s) if signals.received is None else {}
        s.logger.close()
    return TrainResult(run_dir, s.step, signals.received, metrics)


def run_pipeline(cfg: PipelineConfig, *, resume: bool = False, fallback: bool = False, overwrite: bool = False) -> dict:
    """Train the autoencoder, CALM on it and the token baseline at the same training FLOPs; print BrierLM and a sample.

    An interrupted stage ends the pipeline (the result then holds ``"interrupted"``).

    Returns:
        ``{"autoencoder", "calm", "baseline": run dirs, "brier_lm": {"calm", "baseline"}, "sample": text}``.
    """
    out, flags = Path(cfg.out_dir), {"resume": resume, "fallback": fallback, "overwrite": overwrite}
    ae = train(cfg.stage_config("autoencoder", **{"run.out_dir": out / "autoencoder"}), **flags)
    if ae.interrupted is not None:
        return {"autoencoder": ae.run_dir, "interrupted": ae.interrupted}
    lm_cfg = cfg.stage_config("calm", **{"run.out_dir": out / "calm", "autoencoder_path": ae.run_dir})
    lm = train(lm_cfg, **flags)
    result = {"autoencoder": ae.run_dir, "calm": lm.run_dir}
    spent = ae.metrics.get("train_flops", 0.0) + lm.metrics.get("train_flops", 0.0)
    titles = {"calm": f"CALM (autoencoder + CALM: {spent:.2e} training FLOPs)"}
    if cfg.compare and lm.interrupted is None:  # the baseline on the same tokenizer, to the same training FLOPs
        tokenizer = ae.run_dir / "tokenizer.json"
        ar_cfg = cfg.stage_config("ar", **{"run.out_dir": out / "baseline", "data.tokenizer": tokenizer})
        run, world = ar_cfg.run, torch.distributed.get_world_size() if distributed.is_initialized() else 1
        tokens = run.batch_size * run.grad_accum * world * ar_cfg.data.block_len
        per_token = build_model(ar_cfg, TextTokenizer.load(tokenizer).vocab_size).flops_per_token(ar_cfg.data.block_len)
        ar = train(
            replace(ar_cfg, run=replace(run, steps=max(1, round(spent / (per_token["train"] * tokens))))), **flags
        )
        result["baseline"] = ar.run_dir
        if ar.interrupted is not None:
            return {**result, "interrupted": ar.interrupted}
        titles["baseline"] = f"Transformer (the same {spent:.2e} training FLOPs)"
    if lm.interrupted is not None or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return {**result, "interrupted": lm.interrupted}
    loaded = load_run(lm_cfg.run.out_dir, device=lm_cfg.run.device)
    batches = held_out_batches(loaded.blocks(), cfg.eval_blocks)
    n = sum(len(b.tokens) for b in batches)
    score = {"stride": lm_cfg.run.eval_stride, "seed": lm_cfg.run.seed, "device": lm_cfg.run.device}
    result["brier_lm"] = {}
    for key, title in titles.items():
        scores = score_run(loaded if key == "calm" else result[key], batches, **score)
        print(format_result(scores, f"\n{title}: BrierLM on {n} validation blocks"))
        result["brier_lm"][key] = scores.brier_lm
    gen = torch.Generator(device=next(loaded.model.parameters()).device).manual_seed(lm_cfg.run.seed)
    texts, _ = generate_text(loaded, [cfg.prompt], cfg.sample_tokens, temperature=cfg.temperature, generator=gen)
    result["sample"] = texts[0]
    print(f"\nCALM sample (T={cfg.temperature}):\n{cfg.prompt}{result['sample']}")
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m calm_models.train",
        description="Train the autoencoder, CALM, the token baseline, or the whole pipeline.",
    )
    parser.add_argument("stage", choices=(*STAGES, "pipeline"))
    parser.add_argument("--preset", default="tiny", help="tiny, small or m (default tiny)")
    parser.add_argument("--config", default=None, help="YAML or TOML file")
    parser.add_argument("--teacher", default=None, metavar="RUN", help="distill: the teacher run (teacher_path=RUN)")
    flags = {
        "--resume": "continue from the latest checkpoint",
        "--fallback": "with --resume: take the newest complete checkpoint if the latest is corrupt",
        "--overwrite": "delete an earlier run in run.out_dir instead of refusing",
    }
    for flag, text in flags.items():
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when done, 2 with a one-line error, 130/143 after an interrupt (saved)."""
    args = _parse(argv)
    flags = {"resume": args.resume, "fallback": args.fallback, "overwrite": args.overwrite}
    try:
        if args.stage == "pipeline":
            data = {"preset": args.preset}  # a config file's preset wins over --preset's default
            cfg = load_config(PipelineConfig, data=data, file=args.config, overrides=args.overrides)
            interrupted = run_pipeline(cfg, **flags).get("interrupted")
        else:
            stage = [o for o in args.overrides if o.split("=", 1)[0].strip() == "stage"]
            if stage and stage[-1].split("=", 1)[1].strip() != args.stage:
                raise ConfigError(f"{stage[-1]} conflicts with the stage argument {args.stage!r}")
            teacher = [f"teacher_path={args.teacher}"] if args.teacher else []
            base, overrides = preset(args.preset, args.stage), [*teacher, *args.overrides, f"stage={args.stage}"]
            cfg = load_config(TrainConfig, preset=base, file=args.config, overrides=overrides)
            interrupted = train(cfg, **flags).interrupted
    except (ConfigError, DataError, TrainError, RunError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()
    return 0 if interrupted is None else 128 + int(interrupted)


if __name__ == "__main__":
    raise SystemExit(main())
