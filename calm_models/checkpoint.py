"""Crash-safe checkpoints on library formats: save, find the newest good one, resume exactly.

Layout of a run directory::

    run_dir/checkpoints/
        latest                  # name of the newest complete checkpoint
        step_000123/
            model.safetensors   # full weights (safetensors), tied tensors stored once
            train_state.pt      # optimizer and scheduler states and the caller's train state
            config.yaml         # the resolved run config
            meta.json           # format version, step, time, model class, size + sha256 per file

Weights and optimizer states go through ``torch.distributed.checkpoint.state_dict`` (full,
CPU-offloaded state dicts with clean parameter names), so a checkpoint written by a plain,
compiled, DDP or FSDP module loads into any of them, at any world size. Under FSDP saving is a
collective: every rank calls :func:`save_checkpoint`, rank 0 writes.

Writing is atomic: files go to ``step_000123.tmp-<pid>/`` (each fsynced), the directory is
renamed into place, then ``latest`` is replaced through a temporary file, and only then are
old checkpoints pruned (``keep_last``). A crash at any moment leaves the previous checkpoint
intact and found by :func:`latest_checkpoint`; the next save removes the leftovers. Every load
problem (missing, truncated or corrupt file, checksum mismatch, a different model config, a
key or shape mismatch) is a :class:`CheckpointError` with one line naming the file or field.

Example:
    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> path = save_checkpoint(run, step=5, model=torch.nn.Linear(3, 2), train_state={"tokens": 640})
    >>> path.name, latest_checkpoint(run) == path
    ('step_000005', True)
    >>> load_checkpoint(path, model=torch.nn.Linear(3, 2))
    {'tokens': 640}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from calm_models._layers import atomic_write, check_int
from calm_models.config import config_to_dict, diff_configs, flatten_config
from calm_models.distributed import barrier, is_initialized
from calm_models.errors import CalmError

FORMAT_VERSION = 2
MODEL_FILE, STATE_FILE, CONFIG_FILE, META_FILE = ("model.safetensors", "train_state.pt", "config.yaml", "meta.json")
_DATA_FILES = (MODEL_FILE, STATE_FILE, CONFIG_FILE)
_TRANSIENT = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)$")
_AUTO_NAME = re.compile(r"^step_\d+$")


class CheckpointError(CalmError, RuntimeError):
    """A checkpoint cannot be found, read, verified or applied (a one-line message)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def _options(model: nn.Module, **kwargs: Any):
    """Full (gathered) state dicts for sharded models, local ones otherwise (the same tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    return StateDictOptions(full_state_dict=sharded, **kwargs)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA when initialised) generator states, ``weights_only``-loadable.

    Example:
        >>> state = capture_rng_state()
        >>> a = torch.rand(2)
        >>> restore_rng_state(state)
        >>> torch.equal(torch.rand(2), a)
        True
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA states for the devices present)."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state["cuda"])[: torch.cuda.device_count()])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"malformed RNG state: {type(exc).__name__}: {exc}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _root(run_dir: str | os.PathLike[str]) -> Path:
    run_dir = Path(run_dir)
    sub = run_dir / "checkpoints"
    return sub if sub.is_dir() or not run_dir.is_dir() else run_dir


def read_meta(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint directory, or a :class:`CheckpointError`."""
    path = Path(ckpt) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {ckpt} is not a complete checkpoint") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable or corrupt: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "step" not in meta:
        raise CheckpointError(f"{path} is not a checkpoint meta file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {meta.get('format_version')!r}; this "
            f"version of calm_models reads version {FORMAT_VERSION}"
        )
    return meta


def checkpoint_problem(ckpt: str | os.PathLike[str], checksum: bool = True) -> str | None:
    """Why a checkpoint directory cannot be used (a one-line reason), or ``None`` if it is sound.

    Checks the meta file and every listed file's size (and, with ``checksum``, its sha256).
    """
    try:
        meta = read_meta(ckpt)
        for name in meta["files"]:
            _check_file(Path(ckpt), meta, name, checksum)
    except CheckpointError as exc:
        return str(exc)
    return None


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Checkpoints of a run with a readable ``meta.json``, oldest first (by save time, then step)."""
    root = _root(run_dir)
    found = []
    for child in root.iterdir() if root.is_dir() else ():
        if child.is_dir() and not _TRANSIENT.match(child.name):
            with contextlib.suppress(CheckpointError):
                meta = read_meta(child)
                found.append((float(meta.get("unix_time", 0)), int(meta["step"]), child.name, child))
    return [item[-1] for item in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``latest`` names, else (pointer missing or stale) the newest listed one.

    Example:
        >>> import tempfile
        >>> latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    root = _root(run_dir)
    try:
        name = (root / "latest").read_text(encoding="utf-8").strip()
    except OSError:  # missing or unreadable: the newest listed one
        name = ""
    if name and "/" not in name:
        with contextlib.suppress(CheckpointError):
            read_meta(root / name)
            return root / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def newest_sound_checkpoint(
    run_dir: str | os.PathLike[str], checksum: bool = True
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest ``step_*`` checkpoint that passes :func:`checkpoint_problem`, and the newer ones that do not.

    Returns:
        ``(checkpoint or None, [(skipped checkpoint, its problem), ...])``, newest first.
    """
    root = _root(run_dir)
    steps = [p for p in root.iterdir() if _AUTO_NAME.match(p.name) and p.is_dir()] if root.is_dir() else []
    skipped = []
    for ckpt in sorted(steps, key=lambda p: int(p.name[5:]), reverse=True):
        problem = checkpoint_problem(ckpt, checksum)
        if problem is None:
            return ckpt, skipped
        skipped.append((ckpt, problem))
    return None, skipped


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory itself, or the latest checkpoint of a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} does not exist")
    if (path / META_FILE).exists():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"no checkpoint found at {path} (expected meta.json or checkpoints/)")
    return latest


def _unshared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that repeat an earlier one (tied weights); return them as ``{alias: kept}``."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().contiguous()
    return tensors, aliases


def _write_model_file(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors, aliases = _unshared(state)
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def _plain(obj: Any, where: str) -> Any:
    """``obj`` with NumPy scalars as numbers; a ``TypeError`` names what ``weights_only`` loading refuses."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise TypeError(f"{where} is a {kind}, which a checkpoint cannot hold; use plain Python values or torch tensors")


def _write_state_file(payload: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(payload, fh))


def _write_latest(root: Path, name: str) -> None:
    atomic_write(root / "latest", (name + "\n").encode())
    _fsync_dir(root)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier failed save of this very process
    try:
        os.kill(pid, 0)
    except OSError as exc:  # a PermissionError means that the process exists
        return not isinstance(exc, ProcessLookupError)
    return True


def _clean_leftovers(root: Path) -> None:
    """Remove what interrupted saves left: temporary, half-deleted or replaced directories."""
    for child in root.iterdir():
        match = _TRANSIENT.match(child.name)
        if not match or not child.is_dir() or _pid_alive(int(match["pid"])):
            continue
        final = root / match["name"]
        if match["kind"] == "old" and not final.exists():
            os.replace(child, final)  # a re-save died between its two renames
        else:
            shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    train_state: Mapping[str, Any] | None = None,
    config: Any | None = None,
    keep_last: int | None = 2,
    name: str | None = None,
    update_latest: bool = True,
) -> Path:
    """Write a checkpoint atomically to ``run_dir/checkpoints/<name>/`` (see the module docstring).

    Args:
        run_dir: Run directory.
        step: Optimiser step reached (``>= 0``).
        model: Plain, compiled, DDP or FSDP module.
        optimizer: Optimiser whose state to save.
        scheduler: Scheduler (anything with ``state_dict()``).
        train_state: Plain values and tensors (step, tokens, loader position, RNG states...).
        config: The resolved run config, written as ``config.yaml``.
        keep_last: Keep only the newest ``keep_last`` ``step_*`` checkpoints (``None``/0: all).
        name: Directory name (default ``step_{step:06d}``); an existing one is replaced.
        update_latest: Point ``latest`` at this checkpoint.

    Returns:
        The checkpoint directory.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    check_int(step, "step", 0)
    train_state = _plain(dict(train_state or {}), "train_state")
    name = name or f"step_{step:06d}"
    if name in (".", "..", "latest") or "/" in name or _TRANSIENT.match(name):
        raise ValueError(f"name must be a plain directory name, got {name!r}")
    options = _options(model, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)  # collective
    optim = None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options)
    root = Path(run_dir) / "checkpoints"
    final = root / name
    if is_initialized() and torch.distributed.get_rank() != 0:
        barrier()
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(root)
        tmp = root / f"{name}.tmp-{os.getpid()}"  # (_clean_leftovers removed an earlier one of this process)
        tmp.mkdir()
        _write_model_file(weights, tmp / MODEL_FILE)
        sched = None if scheduler is None else scheduler.state_dict()
        payload = {"step": step, "optimizer": optim, "train_state": train_state, "scheduler": sched}
        _write_state_file(payload, tmp / STATE_FILE)
        config_dict = config_to_dict(config) if config is not None else {}
        atomic_write(tmp / CONFIG_FILE, yaml.safe_dump(config_dict, sort_keys=False).encode())
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "unix_time": time.time(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_version": torch.__version__,
            "model_class": _class_name(model),
            "files": {f: {"size": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in _DATA_FILES},
        }
        atomic_write(tmp / META_FILE, json.dumps(meta, indent=1).encode())
        _fsync_dir(tmp)
        old = root / f"{name}.old-{os.getpid()}"
        replaced = final.exists()
        if replaced:
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        if replaced:
            shutil.rmtree(old, ignore_errors=True)
        if update_latest:
            _write_latest(root, name)
        if keep_last:
            _prune(root, keep_last, protect=name)
    finally:
        barrier()
    return final


def _prune(root: Path, keep_last: int, protect: str) -> None:
    """Delete all but the newest ``keep_last`` ``step_*`` checkpoints, never ``protect`` or ``latest``'s target."""
    auto = [p for p in list_checkpoints(root) if _AUTO_NAME.match(p.name)]
    keep = {protect, (root / "latest").read_text().strip() if (root / "latest").exists() else protect}
    for stale in auto[: max(0, len(auto) - keep_last)]:
        if stale.name not in keep:
            trash = stale.with_name(f"{stale.name}.del-{os.getpid()}")  # renamed first: a crash leaves a leftover
            os.replace(stale, trash)
            shutil.rmtree(trash, ignore_errors=True)


def _class_name(model: nn.Module) -> str:
    """Class of the innermost module (through ``torch.compile``, DDP and FSDP2's subclass)."""
    while isinstance(inner := getattr(model, "_orig_mod", getattr(model, "module", None)), nn.Module):
        model = inner
    return next(c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))


def _check_file(ckpt: Path, meta: dict[str, Any], name: str, verify: bool) -> Path:
    file, info = ckpt / name, meta["files"].get(name)
    if info is None:
        raise CheckpointError(f"{ckpt / META_FILE} does not list {name}")
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    size = file.stat().st_size
    if size != info.get("size"):
        raise CheckpointError(f"{file} is truncated or corrupt: {size} bytes, expected {info.get('size')}")
    if verify and _sha256(file) != info.get("sha256"):
        raise CheckpointError(f"{file} is corrupt: sha256 checksum mismatch")
    return file


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
            state = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{file} is truncated or corrupt ({type(exc).__name__}: {str(exc)[:200]})") from None
    if state and all(k.startswith("module.") for k in state):  # written from a DDP module
        state = {k[len("module.") :]: v for k, v in state.items()}
    return {**state, **{alias: state[kept] for alias, kept in aliases.items() if kept in state}}


def _apply_weights(file: Path, model: nn.Module, strict: bool) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = _read_weights(file)
    empty = next(iter(model.state_dict()), None) is None  # (dcp needs a process group then)
    names = set() if empty else set(get_model_state_dict(model, options=_options(model)))
    missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{file} does not fit the model: missing from the checkpoint: {', '.join(missing[:8]) or '-'}; "
            f"not in the model: {', '.join(unexpected[:8]) or '-'}"
        )
    state = {k: v for k, v in state.items() if k in names}
    if not state:
        return
    try:
        set_model_state_dict(model, state, options=_options(model, strict=strict))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{file} does not fit the model: {exc}") from None


def load_weights(
    path: str | os.PathLike[str], model: nn.Module, *, strict: bool = True, verify: bool = True
) -> dict[str, Any]:
    """Load only the weights of a checkpoint (or run, or bare ``.safetensors`` file) into ``model``.

    Returns:
        The checkpoint's ``meta.json`` (``{}`` for a bare file).

    Example:
        >>> import tempfile
        >>> src, dst = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> _ = load_weights(save_checkpoint(tempfile.mkdtemp(), step=0, model=src), dst)
        >>> torch.equal(dst.weight, src.weight)
        True
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        _apply_weights(path, model, strict)
        return {}
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if strict and meta.get("model_class") not in (None, _class_name(model)):
        raise CheckpointError(f"{ckpt} holds a {meta['model_class']} but the model is a {_class_name(model)}")
    _apply_weights(_check_file(ckpt, meta, MODEL_FILE, verify), model, strict)
    return meta


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    config: Any | None = None,
    sections: list[str] | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Resume from a checkpoint: weights, optimizer and scheduler; returns the saved ``train_state``.

    Args:
        path: Checkpoint or run directory.
        model: Target model (plain, compiled, DDP or FSDP).
        optimizer: Optimiser to restore (built over the same parameters).
        scheduler: Scheduler to restore.
        config: The current config; every field of ``sections`` present in both must equal the
            saved one, else the load is refused before touching the model.
        sections: Top-level config sections to compare (``None``: all).
        verify: Check the sha256 of every file.

    Example:
        >>> import tempfile
        >>> run = tempfile.mkdtemp()
        >>> _ = save_checkpoint(run, step=1, model=torch.nn.Linear(2, 2), config={"model": {"h": 2}})
        >>> load_checkpoint(run, model=torch.nn.Linear(2, 2), config={"model": {"h": 4}})
        Traceback (most recent call last):
        ...
        calm_models.checkpoint.CheckpointError: ... was saved with a different configuration: model.h = 2 in the checkpoint but 4 now
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    files = {n: _check_file(ckpt, meta, n, verify) for n in _DATA_FILES}
    if config is not None:
        saved = yaml.safe_load(files[CONFIG_FILE].read_text(encoding="utf-8")) or {}
        diffs = diff_configs(saved, config, sections)
        if diffs:
            flat_saved, flat_now = flatten_config(saved), flatten_config(config)
            shown = "; ".join(f"{p} = {flat_saved[p]!r} in the checkpoint but {flat_now[p]!r} now" for p in diffs[:8])
            raise CheckpointError(f"{ckpt} was saved with a different configuration: {shown}")
    try:
        payload = torch.load(files[STATE_FILE], map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and EOF errors all mean a corrupt file
        raise CheckpointError(f"{files[STATE_FILE]} is truncated or corrupt ({type(exc).__name__})") from None
    load_weights(ckpt, model, verify=False)
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler")):
        if obj is None:
            continue
        if payload.get(key) is None:
            raise CheckpointError(f"{files[STATE_FILE]} holds no {key} state")
        try:
            if key == "optimizer":
                set_optimizer_state_dict(model, optimizer, payload[key], options=_options(model))
            else:
                scheduler.load_state_dict(payload[key])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AssertionError) as exc:
            raise CheckpointError(f"cannot restore the {key} from {files[STATE_FILE]}: {exc}") from None
    return payload["train_state"]
