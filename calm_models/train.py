"""One training loop for every stage: the autoencoder, CALM and the token baseline.

Command line::

    python -m calm_models.train STAGE [--preset tiny|small|m] [--config FILE] [--resume]
        [--fallback] [--overwrite] [key=value ...]

``STAGE`` is ``autoencoder``, ``calm``, ``ar`` (the token baseline) or ``pipeline``
(autoencoder, then CALM on it, then BrierLM and a generated sample). Settings: defaults < preset
< file < dotted overrides (:func:`calm_models.config.load_config`). Under ``torchrun`` the loop
runs data-parallel (DDP, or FSDP with ``run.strategy=fsdp``).

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
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from calm_models import checkpoint as ckpt
from calm_models import distributed
from calm_models.autoencoder import reconstruction_accuracy
from calm_models.backbone import _Block
from calm_models.config import STAGES, ConfigError, PipelineConfig, TrainConfig, load_config, preset, save_config
from calm_models.data import BlockLoader, DataError, PackedBlocks, TextTokenizer, prepare_data
from calm_models.evaluate import evaluate_brier_lm, format_result
from calm_models.metrics import MetricsLogger
from calm_models.optim import build_optimizer, build_scheduler
from calm_models.runs import RunError, build_model, load_run


class TrainError(RuntimeError):
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


class _RunLock:
    """An exclusive ``flock`` on ``run_dir/.lock`` for the run's life; a dead holder's lock is taken over."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fh = None

    def __enter__(self) -> _RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            raise TrainError(
                f"{self.path.parent} is in use by a running training ({holder}); "
                "use another run.out_dir or wait for it to finish"
            ) from None
        self._fh.seek(0)
        previous = self._fh.read().strip()
        if previous:
            print(f"note: taking over the stale lock of {previous} (that process is gone)", file=sys.stderr)
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self._fh.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.truncate(0)
            self._fh.close()


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


def _resume_point(run_dir: Path, fallback: bool) -> Path | None:
    """The checkpoint to resume from; a corrupt newest one is named, and skipped only with ``fallback``."""
    good, skipped = ckpt.newest_sound_checkpoint(run_dir)
    if not skipped:
        good = good or ckpt.latest_checkpoint(run_dir)  # also custom-named checkpoints
        if good is None:
            print(f"note: --resume given but {run_dir} has no checkpoint; starting from scratch", file=sys.stderr)
        return good
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
    return good


def _stage_config(cfg: TrainConfig) -> tuple[TrainConfig, nn.Module | None]:
    """The CALM stage reads its autoencoder run: its architecture, tokenizer and weights."""
    if cfg.stage != "calm":
        return cfg, None
    try:
        ae = load_run(cfg.autoencoder_path, device="cpu")
    except RunError as exc:
        raise TrainError(f"autoencoder_path: {exc}") from None
    if ae.config.stage != "autoencoder":
        raise TrainError(f"autoencoder_path={cfg.autoencoder_path} holds a {ae.config.stage} run, not an autoencoder")
    data = replace(cfg.data, tokenizer=str(ae.run_dir / "tokenizer.json"))
    return replace(cfg, autoencoder=ae.config.autoencoder, data=data), ae.model


def _eval_block_ids(num_blocks: int, batch: int, batches: int, rank: int, world: int) -> list[torch.Tensor]:
    """Block ids of this rank's validation batches, spread evenly over the split (not its first files)."""
    spread = max(1, num_blocks // (batches * world * batch))
    return [torch.arange(j * batch, (j + 1) * batch) * spread % num_blocks for j in range(rank, batches * world, world)]


@torch.no_grad()
def _evaluate(model: nn.Module, cfg: TrainConfig, valid: PackedBlocks, info: distributed.DistInfo) -> dict:
    """Validation loss and the stage's metric (reconstruction accuracy or BrierLM), over ranks."""
    ids = _eval_block_ids(len(valid), cfg.run.batch_size, cfg.run.eval_batches, info.rank, info.world_size)
    batches = [valid.batch(i) for i in ids]
    batches = [(t.to(info.device), m.to(info.device)) for t, m in batches]
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=info.device).manual_seed(cfg.run.seed + 1000 + info.rank)
    losses = torch.stack([model.loss(t, m)["loss"].float() for t, m in batches])
    out = {"loss": float(distributed.all_reduce_mean(losses.mean()))}
    if cfg.stage == "autoencoder":
        for sigma in (0.0, 0.3):
            acc = torch.stack([reconstruction_accuracy(model, t, sigma, gen) for t, _ in batches])
            out[f"recon_acc_sigma{sigma:g}"] = float(distributed.all_reduce_mean(acc.mean()))
    else:
        out.update(evaluate_brier_lm(model, batches, stride=cfg.run.eval_stride, generator=gen).to_dict())
    model.train(was_training)
    return out


def train(cfg: TrainConfig, *, resume: bool = False, fallback: bool = False, overwrite: bool = False) -> TrainResult:
    """Train one stage (the caller's config is not modified).

    Args:
        cfg: A resolved configuration.
        resume: Continue from the run directory's latest checkpoint.
        fallback: With ``resume``, take the newest complete checkpoint when the latest is corrupt.
        overwrite: Delete an earlier run found in ``run.out_dir`` instead of refusing.

    Raises:
        TrainError, ConfigError, DataError, CheckpointError: One-line messages.
    """
    run = cfg.run
    run_dir = Path(run.out_dir)
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    try:
        info = distributed.init_distributed(run.device)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    main_process = info.rank == 0
    show_progress = run.progress and main_process
    torch.manual_seed(run.seed)  # the same initialisation on every rank
    cfg, autoencoder = _stage_config(cfg)
    if main_process and run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"run.out_dir={run_dir} is a file, not a directory")
    with _RunLock(run_dir) if main_process else nullcontext():
        if main_process:
            _claim(run_dir, resume, overwrite)
        # -- data: rank 0 trains the tokenizer and fills the token cache first ------------------
        if not main_process:
            distributed.barrier()
        tokenizer, train_blocks, valid_blocks = prepare_data(
            cfg.data, run_dir, chunk_size=cfg.chunk_size, progress=show_progress
        )
        if main_process:
            distributed.barrier()
        cfg = replace(cfg, autoencoder=replace(cfg.autoencoder, vocab_size=tokenizer.vocab_size))
        loader = BlockLoader(
            train_blocks, run.batch_size * run.grad_accum, seed=run.seed, rank=info.rank, world_size=info.world_size
        )

        # -- model, wrapped for data parallelism, then its optimiser ----------------------------
        model = build_model(cfg, tokenizer.vocab_size, autoencoder).to(info.device)
        objective = distributed.wrap_model(_Objective(model), info, run.strategy, fsdp_modules=(_Block,))
        optimizer = build_optimizer(model, cfg.optim)  # after FSDP replaced the parameters
        scheduler = build_scheduler(optimizer, cfg.schedule, run.steps)
        trainable = [p for p in model.parameters() if p.requires_grad]
        parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "config": cfg}

        # -- resume ---------------------------------------------------------------------------
        step, tokens_seen, elapsed, skipped = 0, 0, 0.0, 0
        start_from = _resume_point(run_dir, fallback) if resume else None
        if start_from is not None:
            state = ckpt.load_checkpoint(start_from, sections=cfg.model_sections(), **parts)
            step, tokens_seen, elapsed = state["step"], state["tokens"], state["elapsed"]
            skipped = state.get("skipped", 0)
            try:
                loader.load_state_dict(state["loader"])
            except (ValueError, KeyError) as exc:
                raise TrainError(f"cannot resume the data position of {start_from}: {exc}") from None
            rngs = state["rng"]
            ckpt.restore_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
            if main_process:
                print(f"resuming from {start_from} (step {step})", file=sys.stderr)
        if main_process:
            save_config(cfg, run_dir / "config.yaml")

        if run.compile:
            objective = torch.compile(objective)
        autocast = distributed.autocast_context(info.device, run.precision)
        resume_step = step if start_from is not None else None
        logger = MetricsLogger(run_dir, enabled=main_process, tensorboard=run.tensorboard, resume_step=resume_step)
        flops_per_token = model.flops_per_token(cfg.data.block_len)["train"]
        tokens_per_step = run.batch_size * run.grad_accum * info.world_size * cfg.data.block_len

        def snapshot() -> dict:
            """The train state at this step boundary, RNG states of every rank included."""
            rngs = [ckpt.capture_rng_state()] * info.world_size
            if info.world_size > 1:
                torch.distributed.all_gather_object(rngs, rngs[0])
            counters = {"step": step, "tokens": tokens_seen, "elapsed": elapsed, "skipped": skipped}
            return {**counters, "loader": loader.state_dict(), "rng": rngs}

        def save(state: dict) -> None:
            ckpt.save_checkpoint(run_dir, step=state["step"], train_state=state, keep_last=run.keep_last, **parts)

        def evaluate() -> dict:
            """Validation metrics, logged and shown."""
            metrics = {"tokens": tokens_seen, "train_flops": flops_per_token * tokens_seen}
            metrics |= _evaluate(model, cfg, valid_blocks, info)
            logger.log(metrics, step=step, split="valid")
            if main_process:
                keys = ("loss", "recon_acc_sigma0", "recon_acc_sigma0.3", "brier_lm", "brier_lm_se")
                tqdm.write(f"step {step} valid: " + ", ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics))
            return metrics

        # -- the loop -------------------------------------------------------------------------
        bar = tqdm(total=run.steps, initial=step, desc=cfg.stage, dynamic_ncols=True, disable=not show_progress)
        model.train()
        t_start = time.perf_counter() - elapsed
        state = snapshot()
        with _Signals() as signals:
            while step < run.steps and signals.received is None:
                if run.max_time_s is not None and time.perf_counter() - t_start >= run.max_time_s:
                    break
                t0 = time.perf_counter()
                tokens, mask = (t.to(info.device).chunk(run.grad_accum) for t in next(loader))  # accum x (b, L)
                loss_sum = torch.zeros((), device=info.device)
                for micro, (tok, msk) in enumerate(zip(tokens, mask, strict=True)):
                    sync = micro == run.grad_accum - 1 or not hasattr(objective, "no_sync")
                    with nullcontext() if sync else objective.no_sync(), autocast:
                        loss = objective(tok, msk)["loss"] / run.grad_accum
                    loss.backward()
                    loss_sum += loss.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip or math.inf)
                finite = bool(torch.isfinite(distributed.all_reduce_mean(torch.stack([loss_sum, grad_norm]))).all())
                if not finite:
                    optimizer.zero_grad(set_to_none=True)
                    if skipped >= run.max_nonfinite_skips:
                        logger.close()
                        raise TrainError(
                            f"step {step + 1}: non-finite loss ({float(loss_sum):g}) or gradient "
                            f"norm ({float(grad_norm):g}); stopped without saving. The last good "
                            f"checkpoint is {ckpt.latest_checkpoint(run_dir) or 'none'}; lower "
                            "optim.lr, or set run.max_nonfinite_skips to skip isolated spikes"
                        )
                    skipped += 1
                    logger.log({"nonfinite_skips": skipped}, step=step + 1, split="train")
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                tokens_seen += tokens_per_step
                elapsed = time.perf_counter() - t_start
                state = snapshot()
                if step % run.log_every == 0 or step == run.steps:
                    loss_value = float(distributed.all_reduce_mean(loss_sum))
                    tok_s = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
                    lr, flops = scheduler.get_last_lr()[0], flops_per_token * tokens_seen
                    record = {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens_seen}
                    record |= {"tokens_per_s": tok_s, "train_flops": flops, "time_s": elapsed}
                    logger.log(record, step=step, split="train")
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}")
                bar.update(1)
                if run.eval_every and step % run.eval_every == 0 and step < run.steps:
                    evaluate()
                if run.save_every and step % run.save_every == 0 and step < run.steps:
                    save(state)
        bar.close()
        save(state)  # first the final steps, then anything that could fail
        if signals.received is not None:
            if main_process:
                print(f"interrupted at step {step}: saved {run_dir}", file=sys.stderr)
            logger.close()
            return TrainResult(run_dir, step, signals.received)
        metrics = evaluate()
        logger.close()
    return TrainResult(run_dir, step, None, metrics)


def run_pipeline(cfg: PipelineConfig, *, resume: bool = False, fallback: bool = False, overwrite: bool = False) -> dict:
    """Train the autoencoder, CALM on it and the token baseline at the same training FLOPs; print BrierLM and a sample.

    An interrupted stage ends the pipeline (the result then holds ``"interrupted"``).

    Returns:
        ``{"autoencoder", "calm", "baseline": run dirs, "brier_lm": {"calm", "baseline"}, "sample": text}``.
    """
    out, flags = Path(cfg.out_dir), {"resume": resume, "fallback": fallback, "overwrite": overwrite}
    ae_cfg = replace(cfg.ae_stage, stage="autoencoder", run=replace(cfg.ae_stage.run, out_dir=str(out / "autoencoder")))
    ae = train(ae_cfg, **flags)
    if ae.interrupted is not None:
        return {"autoencoder": ae.run_dir, "interrupted": ae.interrupted}
    lm_run = replace(cfg.lm_stage.run, out_dir=str(out / "calm"))
    lm_cfg = replace(cfg.lm_stage, stage="calm", autoencoder_path=str(ae.run_dir), run=lm_run)
    lm = train(lm_cfg, **flags)
    result, spent = {"autoencoder": ae.run_dir, "calm": lm.run_dir}, ae.metrics.get("train_flops", 0.0)
    runs = {f"CALM (autoencoder + CALM: {spent + lm.metrics.get('train_flops', 0.0):.2e} training FLOPs)": lm.run_dir}
    if cfg.compare and lm.interrupted is None:  # the baseline on the same tokenizer, to the same training FLOPs
        spent += lm.metrics["train_flops"]
        data = replace(cfg.ar_stage.data, tokenizer=str(ae.run_dir / "tokenizer.json"))
        run = cfg.ar_stage.run
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        tokens = run.batch_size * run.grad_accum * world * data.block_len
        vocab = TextTokenizer.load(data.tokenizer).vocab_size
        per_token = build_model(cfg.ar_stage, vocab).flops_per_token(data.block_len)["train"]
        run = replace(run, out_dir=str(out / "baseline"), steps=max(1, round(spent / (per_token * tokens))))
        ar = train(replace(cfg.ar_stage, stage="ar", data=data, run=run), **flags)
        result["baseline"] = ar.run_dir
        if ar.interrupted is not None:
            return {**result, "interrupted": ar.interrupted}
        runs[f"Transformer (the same {spent:.2e} training FLOPs)"] = ar.run_dir
    if lm.interrupted is not None or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return {**result, "interrupted": lm.interrupted}
    loaded = load_run(lm_run.out_dir, device=lm_cfg.run.device)
    device = next(loaded.model.parameters()).device
    valid = loaded.blocks()
    n = min(len(valid), cfg.eval_blocks)
    batches = [valid.batch(torch.arange(i, min(n, i + 16))) for i in range(0, n, 16)]
    result["brier_lm"] = {}
    for (title, run_dir), key in zip(runs.items(), ("calm", "baseline"), strict=False):
        model = load_run(run_dir, device=lm_cfg.run.device).model
        gen = torch.Generator(device=device).manual_seed(lm_cfg.run.seed)
        scores = evaluate_brier_lm(model, batches, stride=lm_cfg.run.eval_stride, generator=gen)
        print(format_result(scores, f"\n{title}: BrierLM on {n} validation blocks"))
        result["brier_lm"][key] = scores.brier_lm
    gen = torch.Generator(device=device).manual_seed(lm_cfg.run.seed)
    prompt = torch.tensor(loaded.tokenizer.encode(cfg.prompt), dtype=torch.long)
    ids = loaded.model.generate(
        [prompt], cfg.sample_tokens, temperature=cfg.temperature, eos_id=loaded.tokenizer.eos_id, generator=gen
    ).tokens[0]
    result["sample"] = loaded.tokenizer.decode(ids)
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
            stage = {s: preset(args.preset, s) for s in STAGES}
            base = PipelineConfig(ae_stage=stage["autoencoder"], lm_stage=stage["calm"], ar_stage=stage["ar"])
            cfg = load_config(PipelineConfig, preset=base, file=args.config, overrides=args.overrides)
            interrupted = run_pipeline(cfg, **flags).get("interrupted")
        else:
            stage = [o for o in args.overrides if o.split("=", 1)[0].strip() == "stage"]
            if stage and stage[-1].split("=", 1)[1].strip() != args.stage:
                raise ConfigError(f"{stage[-1]} conflicts with the stage argument {args.stage!r}")
            base, overrides = preset(args.preset, args.stage), [*args.overrides, f"stage={args.stage}"]
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
