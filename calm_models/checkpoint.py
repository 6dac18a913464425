"""Crash-safe checkpoints: save, find the latest, verify and resume exactly.

Layout of a run directory::

    run_dir/checkpoints/
        latest                  # text file: name of the newest complete checkpoint
        step_000123/
            model.safetensors   # weights of the unwrapped module (tied tensors stored once)
            train_state.pt      # optimizer, scheduler, RNG states, the caller's train_state
            config.yaml         # the resolved run config
            meta.json           # format version, step, time, model class, size+sha256 per file

Writing is atomic: everything goes to ``step_000123.tmp-<pid>/`` (each file fsynced), which is
then renamed to its final name with ``os.replace``; the ``latest`` pointer is rewritten through
a temporary file and ``os.replace`` as well, and old checkpoints are pruned (``keep_last``) only
after that.  A crash at any moment therefore leaves the previous checkpoint intact and
reachable by :func:`latest_checkpoint`; leftovers of an interrupted save are removed by the next
save.

Weights are saved from the *unwrapped* module: ``DistributedDataParallel``'s ``module.`` and
``torch.compile``'s ``_orig_mod.`` prefixes never reach the file, so a checkpoint loads into a
plain, a compiled or a DDP-wrapped model alike.  FSDP models (FSDP2 ``fully_shard`` or FSDP1)
are gathered into a full CPU state dict with
``torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True,
cpu_offload=True)`` (a collective: every rank calls :func:`save_checkpoint`); only rank 0 writes
files and the other ranks wait at a barrier.  Loading reads the files on every rank (a shared
file system is assumed in multi-node runs).

``train_state.pt`` is read with ``torch.load(weights_only=True)``: the caller's ``train_state``
must hold only plain Python values (``None``, bool, int, float, str, bytes, lists, tuples,
sets, dicts) and torch tensors; numpy scalars are converted to Python numbers, anything else
is refused at save time with a ``TypeError`` naming the key.

Every loading problem -- missing, truncated or corrupt file, checksum mismatch, a config that
differs in the compared fields, missing/unexpected parameters, shape mismatches -- raises
:class:`CheckpointError` with a one-line message naming the file or the fields.

Example:
    >>> import tempfile, torch
    >>> run = tempfile.mkdtemp()
    >>> model = torch.nn.Linear(3, 2)
    >>> path = save_checkpoint(run, step=5, model=model, train_state={"tokens": 640}, config={"lr": 0.1})
    >>> path.name, latest_checkpoint(run) == path
    ('step_000005', True)
    >>> load_checkpoint(path, model=torch.nn.Linear(3, 2))
    {'tokens': 640}
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from calm_models.config import config_to_dict, diff_configs, flatten_config

__all__ = [
    "CHECKPOINT_DIR",
    "FORMAT_VERSION",
    "CheckpointError",
    "capture_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "load_train_state",
    "model_state_dict",
    "read_checkpoint_meta",
    "resolve_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "unwrap_model",
]

#: Version of the checkpoint layout written by :func:`save_checkpoint`.
FORMAT_VERSION = 1
#: Sub-directory of a run directory that holds its checkpoints.
CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
LATEST_FILE = "latest"

_ALIAS_KEY = "calm_models.aliases"
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_AUTO_NAME = re.compile(r"^step_\d+$")
_TRANSIENT = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)$")
_MAX_LISTED = 8


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read, verified or applied.

    The message is a single line naming the file or the fields concerned, so that a command-line
    tool can print ``error: <message>`` without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# ----------------------------------------------------------------------------------------------
# Model state dicts
# ----------------------------------------------------------------------------------------------


def _fsdp_classes() -> tuple[type, ...]:
    """FSDP2 and FSDP1 module classes -- only if torch.distributed.fsdp was imported already.

    No model can be FSDP-wrapped before that module is imported, and importing it costs about
    a second, so it is never imported here.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return ()
    names = ("FSDPModule", "FullyShardedDataParallel")
    return tuple(getattr(fsdp, n) for n in names if isinstance(getattr(fsdp, n, None), type))


def _is_fsdp(model: nn.Module) -> bool:
    """True for an FSDP-wrapped module, or one whose parameters are sharded DTensors.

    The latter covers a model whose *parent* (e.g. a loss wrapper) was passed to
    ``fully_shard``: its own state dict then holds shards, not full tensors.
    """
    classes = _fsdp_classes()
    if classes and any(isinstance(m, classes) for m in model.modules()):
        return True
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return isinstance(dtensor, type) and any(isinstance(p, dtensor) for p in model.parameters())


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile``, ``DistributedDataParallel``/``DataParallel`` and FSDP1 wrappers.

    An FSDP2 (``fully_shard``) module is sharded in place and returned as is; use
    :func:`model_state_dict` to obtain its full weights.

    Args:
        model: A module, possibly wrapped several times (e.g. compiled DDP).

    Returns:
        The innermost user module (sharing parameters with ``model``).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.compile(lin)) is lin
        True
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")  # see _fsdp_classes
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    fsdp1 = (fsdp1,) if isinstance(fsdp1, type) else ()
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):  # torch.compile's OptimizedModule
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel) + fsdp1):
            model = model.module
        else:
            return model


def _clean_key(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_SEGMENTS)


def _clean_keys(keys: Sequence[str]) -> dict[str, str]:
    """Map each key to its clean name (wrapper segments and a common ``module.`` prefix removed)."""
    cleaned = {k: _clean_key(k) for k in keys}
    if cleaned and all(v.startswith("module.") for v in cleaned.values()):
        cleaned = {k: v[len("module.") :] for k, v in cleaned.items()}
    return cleaned


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict of the unwrapped model, with clean parameter names.

    For FSDP models this is a collective (call it on every rank); the full tensors are gathered
    to CPU on rank 0 (other ranks may receive an empty dict).

    Args:
        model: Plain, compiled, DDP- or FSDP-wrapped module.

    Returns:
        Name -> tensor, names free of ``module.``/``_orig_mod.`` prefixes.  Tied parameters
        appear under each of their names (sharing storage).

    Example:
        >>> list(model_state_dict(torch.compile(torch.nn.Linear(2, 2))))
        ['weight', 'bias']
    """
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    else:
        state = unwrap_model(model).state_dict()
    names = _clean_keys(list(state))
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"state dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                "extra (non-tensor) module state is not supported in model.safetensors"
            )
        out[names[key]] = value
    return out


def _dedupe(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that are the same view of one storage once; record the others as aliases.

    Returns the tensors to write (contiguous, on CPU, no two sharing storage) and
    ``{alias_name: kept_name}``.
    """
    kept: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach()
        if t.numel() == 0 or t.device.type == "meta":
            tensors[name] = t.to("cpu").clone()
            continue
        view = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if view in kept:
            aliases[name] = kept[view]
            continue
        kept[view] = name
        tensors[name] = t
    # Distinct views of one storage (e.g. slices of a buffer) must be written as copies.
    by_storage: dict[tuple[Any, int], list[str]] = {}
    for view, name in kept.items():
        by_storage.setdefault((view[0], view[1]), []).append(name)
    shared = {n for names in by_storage.values() if len(names) > 1 for n in names}
    out = {}
    for name, t in tensors.items():
        t = t.to("cpu")
        out[name] = (
            t.clone(memory_format=torch.contiguous_format) if name in shared else t.contiguous()
        )
    return out, aliases


# ----------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of the Python, numpy, torch CPU (and CUDA/MPS when in use) generators.

    Returns:
        A dict of plain Python values and tensors (loadable with ``weights_only=True``):
        ``{"python": ..., "numpy": {...}, "torch": ByteTensor, "cuda": [ByteTensor, ...]}``
        (``"cuda"`` only when CUDA is initialised, ``"mps"`` only when MPS is available).

    Example:
        >>> state = capture_rng_state()
        >>> a = torch.rand(2)
        >>> restore_rng_state(state)
        >>> torch.equal(torch.rand(2), a)
        True
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None:
        if torch.backends.mps.is_available():
            state["mps"] = mps.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generator states captured by :func:`capture_rng_state`.

    Missing entries are skipped; CUDA states are restored for the devices present.

    Args:
        state: The captured dict (possibly after a save/load round trip).

    Raises:
        CheckpointError: If an entry is malformed.

    Example:
        >>> s = capture_rng_state(); x = random.random(); restore_rng_state(s)
        >>> random.random() == x
        True
    """
    try:
        if "python" in state:
            version, internal, gauss = state["python"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy" in state:
            n = state["numpy"]
            keys = np.asarray(torch.as_tensor(n["keys"]).cpu().numpy(), dtype=np.uint32)
            np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        if "torch" in state:
            torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
        if "cuda" in state and torch.cuda.is_available():
            cuda = list(state["cuda"])[: torch.cuda.device_count()]
            torch.cuda.set_rng_state_all(
                [torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda]
            )
        if "mps" in state and getattr(torch.backends, "mps", None) is not None:
            if torch.backends.mps.is_available():
                torch.mps.set_rng_state(torch.as_tensor(state["mps"], dtype=torch.uint8).cpu())
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"malformed RNG state: {type(exc).__name__}: {exc}") from None


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank_and_world() -> tuple[int, int]:
    if _dist_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather_rng_states() -> list[dict[str, Any]]:
    """RNG states of every rank (collective when a process group exists)."""
    state = capture_rng_state()
    rank, world = _rank_and_world()
    if world == 1:
        return [state]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def _barrier() -> None:
    if _dist_initialized():
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk (best effort for directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _to_plain(obj: Any, where: str) -> Any:
    """Check that ``obj`` loads with ``torch.load(weights_only=True)``; convert numpy scalars."""
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return obj
    if isinstance(obj, (torch.Tensor, torch.Size, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):  # dict and OrderedDict
        items = [
            (_to_plain(k, f"{where} key"), _to_plain(v, f"{where}[{k!r}]")) for k, v in obj.items()
        ]
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, (list, tuple, set)) and type(obj) in (list, tuple, set):
        return type(obj)(_to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which cannot be stored in "
        f"{STATE_FILE}; use plain Python values (None, bool, int, float, str, list, tuple, dict) "
        "or torch tensors"
    )


def _model_class_name(model: nn.Module) -> str:
    inner = unwrap_model(model)
    classes = _fsdp_classes()
    for cls in type(inner).__mro__:  # FSDP2 swaps in a dynamic subclass named FSDP<Class>
        if not (classes and issubclass(cls, classes)):
            return cls.__name__
    return type(inner).__name__


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier, failed save in this very process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _read_meta_file(ckpt: Path) -> dict[str, Any]:
    meta_path = ckpt / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{meta_path} is missing: {ckpt} is not a complete checkpoint"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{meta_path} is unreadable or corrupt: {exc}") from None
    if not isinstance(meta, dict) or "files" not in meta or "step" not in meta:
        raise CheckpointError(f"{meta_path} is not a checkpoint meta file (no 'files'/'step')")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has format version {version!r}; this code reads versions <= {FORMAT_VERSION}"
        )
    return meta


def _is_complete(ckpt: Path) -> dict[str, Any] | None:
    try:
        return _read_meta_file(ckpt) if ckpt.is_dir() else None
    except CheckpointError:
        return None


def _checkpoints_root(run_dir: Path) -> Path:
    sub = run_dir / CHECKPOINT_DIR
    return sub if sub.is_dir() else run_dir  # else run_dir may itself be a checkpoints folder


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by save time, then step).

    Args:
        run_dir: The run directory (or its ``checkpoints`` folder).

    Returns:
        Checkpoint directories holding a readable ``meta.json``; interrupted saves are skipped.

    Example:
        >>> import tempfile
        >>> list_checkpoints(tempfile.mkdtemp())
        []
    """
    root = _checkpoints_root(Path(run_dir))
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _TRANSIENT.match(child.name)
        if match and match["kind"] != "old":
            continue
        meta = _is_complete(child)
        if meta is not None:
            found.append((float(meta.get("unix_time", 0.0)), int(meta["step"]), child))
    return [p for _, _, p in sorted(found, key=lambda x: (x[0], x[1], x[2].name))]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``.

    Follows the ``latest`` pointer when it names a complete checkpoint; otherwise (pointer
    missing or stale after a crash) falls back to the newest complete checkpoint on disk.

    Args:
        run_dir: The run directory (or its ``checkpoints`` folder).

    Returns:
        Path of the checkpoint directory, or ``None`` when the run has none.

    Example:
        >>> import tempfile
        >>> latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    root = _checkpoints_root(Path(run_dir))
    pointer = root / LATEST_FILE
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except OSError:
        name = ""
    if name and "/" not in name and _is_complete(root / name) is not None:
        return root / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Turn a checkpoint directory, a run directory or a checkpoints folder into a checkpoint.

    Args:
        path: A checkpoint directory (holding ``meta.json``), or a run directory / checkpoints
            folder (its latest checkpoint is used).

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: If nothing usable is found there.

    Example:
        >>> import tempfile
        >>> resolve_checkpoint(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        calm_models.checkpoint.CheckpointError: no checkpoint found at ...
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} does not exist")
    if (path / META_FILE).exists():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"no checkpoint found at {path} (expected meta.json or checkpoints/)")
    return latest


def read_checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint (step, time, model class, files with size and sha256).

    Args:
        path: Checkpoint or run directory.

    Returns:
        The parsed metadata, with ``"path"`` added.

    Raises:
        CheckpointError: Missing or corrupt ``meta.json``.

    Example:
        >>> import tempfile
        >>> p = save_checkpoint(tempfile.mkdtemp(), step=3, model=torch.nn.Linear(1, 1))
        >>> read_checkpoint_meta(p)["step"]
        3
    """
    ckpt = resolve_checkpoint(path)
    meta = _read_meta_file(ckpt)
    meta["path"] = str(ckpt)
    return meta


def _verify_files(
    ckpt: Path, meta: Mapping[str, Any], names: Sequence[str], checksum: bool
) -> None:
    for name in names:
        file = ckpt / name
        info = meta["files"].get(name)
        if info is None:
            raise CheckpointError(f"{ckpt / META_FILE} does not list {name}")
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != info.get("size"):
            raise CheckpointError(
                f"{file} is truncated or corrupt: {size} bytes, expected {info.get('size')}"
            )
        if checksum and info.get("sha256") and _sha256(file) != info["sha256"]:
            raise CheckpointError(f"{file} is corrupt: sha256 checksum mismatch")


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------


def _write_model_file(
    tensors: dict[str, torch.Tensor], aliases: dict[str, str], path: Path
) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", _ALIAS_KEY: json.dumps(aliases)})


def _write_state_file(payload: dict[str, Any], path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _remove_tree(path: Path) -> None:
    """Delete a directory: first rename it to a transient name (atomic), then remove it."""
    trash = path.with_name(f"{path.name}.del-{os.getpid()}")
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def _clean_leftovers(root: Path) -> None:
    """Remove what interrupted saves left behind (temporary, half-deleted or replaced dirs)."""
    for child in root.iterdir():
        match = _TRANSIENT.match(child.name)
        if not match or not child.is_dir() or _pid_alive(int(match["pid"])):
            continue
        final = root / match["name"]
        if match["kind"] == "old" and _is_complete(final) is None:
            try:  # a re-save died between moving the old copy aside and renaming the new one
                os.replace(child, final)
                continue
            except OSError:
                pass
        shutil.rmtree(child, ignore_errors=True)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f"{LATEST_FILE}.tmp-{os.getpid()}"
    _write_text(tmp, name + "\n")
    os.replace(tmp, root / LATEST_FILE)
    _fsync(root)


def _prune(root: Path, keep_last: int, protect: set[str]) -> None:
    auto = [p for p in list_checkpoints(root.parent) if _AUTO_NAME.match(p.name)]
    for old in auto[: max(0, len(auto) - keep_last)]:
        if old.name not in protect:
            _remove_tree(old)


def _optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[str, dict[str, Any]]:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return "fqn", get_optimizer_state_dict(model, optimizer, options=options)
    return "torch", optimizer.state_dict()


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
    """Write a checkpoint atomically to ``run_dir/checkpoints/<name>/``.

    Call on every rank (FSDP state gathering and the RNG gathering are collectives); only rank
    0 writes files, the other ranks wait at a barrier.  See the module docstring for the layout
    and the crash-safety guarantees.

    Args:
        run_dir: Run directory (created if needed).
        step: Optimiser step reached (>= 0); recorded in ``meta.json``.
        model: The model (plain, compiled, DDP or FSDP); its unwrapped weights are saved.
        optimizer: Optimiser whose state to save, if any.
        scheduler: Learning-rate scheduler (anything with ``state_dict()``), if any.
        train_state: Caller's resumable state (step, tokens seen, data loader state, ...):
            plain Python values and tensors only.
        config: Resolved run config (dataclass or dict), written as ``config.yaml``.
        keep_last: After the new checkpoint is complete, delete all but the newest
            ``keep_last`` automatically named (``step_<n>``) checkpoints; ``None`` or ``0``
            keeps everything.  Custom-named checkpoints are never pruned.
        name: Directory name; default ``step_{step:06d}``.  Saving again under an existing
            name replaces that checkpoint atomically.
        update_latest: Point ``checkpoints/latest`` at this checkpoint (default).

    Returns:
        The final checkpoint directory.

    Raises:
        ValueError: Negative ``step`` or ``keep_last``, or an invalid ``name``.
        TypeError: ``train_state`` holds a value that ``torch.load(weights_only=True)`` cannot
            read (the message names the key).

    Example:
        >>> import tempfile
        >>> run = tempfile.mkdtemp()
        >>> for s in (1, 2, 3):
        ...     _ = save_checkpoint(run, step=s, model=torch.nn.Linear(1, 1), keep_last=2)
        >>> [p.name for p in list_checkpoints(run)]
        ['step_000002', 'step_000003']
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 0):
        raise ValueError(f"keep_last must be None or an int >= 0, got {keep_last!r}")
    name = name if name is not None else f"step_{step:06d}"
    if (
        not name
        or name in (".", "..", LATEST_FILE)
        or "/" in name
        or os.sep in name
        or _TRANSIENT.match(name)
    ):
        raise ValueError(f"name must be a plain directory name, got {name!r}")
    train_state = _to_plain(dict(train_state or {}), "train_state")
    config_dict = config_to_dict(config) if config is not None else {}

    # Collectives first: every rank takes part.
    weights = model_state_dict(model)
    optim_format, optim_state = (None, None)
    if optimizer is not None:
        optim_format, optim_state = _optimizer_state(model, optimizer)
    rng_states = _gather_rng_states()
    rank, world = _rank_and_world()
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / name
    if rank != 0:
        _barrier()
        return final

    try:
        root.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(root)
        tmp = root / f"{name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        tensors, aliases = _dedupe(weights)
        _write_model_file(tensors, aliases, tmp / MODEL_FILE)
        _fsync(tmp / MODEL_FILE)
        payload = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "train_state": train_state,
            "optimizer": optim_state,
            "optimizer_format": optim_format,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_states,
            "world_size": world,
        }
        _write_state_file(_to_plain(payload, "checkpoint state"), tmp / STATE_FILE)
        _write_text(tmp / CONFIG_FILE, yaml.safe_dump(config_dict, sort_keys=False))
        files = {
            f: {"size": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
            for f in (MODEL_FILE, STATE_FILE, CONFIG_FILE)
        }
        now = time.time()
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "time": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "unix_time": now,
            "model_class": _model_class_name(model),
            "world_size": world,
            "torch_version": torch.__version__,
            "aliases": aliases,
            "files": files,
        }
        _write_text(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
        _fsync(tmp)
        old = None
        if final.exists():  # re-saving under the same name: move the old copy aside first
            old = root / f"{name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if update_latest:
            _write_latest(root, name)
        if keep_last:
            try:
                pointed = (root / LATEST_FILE).read_text(encoding="utf-8").strip()
            except OSError:
                pointed = name
            _prune(root, keep_last, protect={name, pointed})
    finally:
        _barrier()
    return final


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------


def _read_weights(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        tensors = {}
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = fh.get_tensor(key)
        aliases = json.loads(metadata.get(_ALIAS_KEY, "{}"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{file} is truncated or corrupt ({type(exc).__name__}: {first})"
        ) from None
    for alias, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(
                f"{file} is corrupt: alias {alias!r} points to missing {target!r}"
            )
        tensors[alias] = tensors[target]
    return tensors, aliases


def _listing(names: Sequence[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _apply_weights(file: Path, model: nn.Module, strict: bool) -> None:
    state, _ = _read_weights(file)
    fsdp = _is_fsdp(model)
    target = model if fsdp else unwrap_model(model)
    model_keys = list(target.state_dict().keys())
    clean_to_actual = {v: k for k, v in _clean_keys(model_keys).items()}
    file_names = _clean_keys(list(state))
    state = {file_names[k]: v for k, v in state.items()}
    missing = [k for k in clean_to_actual if k not in state]
    unexpected = [k for k in state if k not in clean_to_actual]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_listing(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_listing(unexpected)}")
        raise CheckpointError(f"{file} does not match the model's parameters; " + "; ".join(parts))
    current = target.state_dict()
    mismatched = [
        f"{k} has shape {tuple(state[k].shape)} in the checkpoint but "
        f"{tuple(current[clean_to_actual[k]].shape)} in the model"
        for k in clean_to_actual
        if k in state and tuple(state[k].shape) != tuple(current[clean_to_actual[k]].shape)
    ]
    if mismatched:
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        raise CheckpointError(f"{file}: " + "; ".join(mismatched[:3]) + more)
    try:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            set_model_state_dict(
                model,
                {k: v for k, v in state.items() if k in clean_to_actual},
                options=StateDictOptions(full_state_dict=True, strict=strict),
            )
        else:
            target.load_state_dict(
                {clean_to_actual[k]: v for k, v in state.items() if k in clean_to_actual},
                strict=False,
            )
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load {file} into the model: {exc}") from None


def load_model_weights(
    path: str | os.PathLike[str], model: nn.Module, *, strict: bool = True, verify: bool = True
) -> dict[str, Any]:
    """Load only the weights of a checkpoint (for evaluation or generation).

    Args:
        path: Checkpoint directory, run directory (latest checkpoint) or a bare
            ``.safetensors`` file.
        model: Target module (plain, compiled, DDP or FSDP); its parameters are overwritten.
        strict: Require exactly the same parameter names (shapes must always match).
        verify: Check the file size and sha256 recorded in ``meta.json`` first.

    Returns:
        The checkpoint's ``meta.json`` contents (``{}`` for a bare file).

    Raises:
        CheckpointError: Missing/corrupt files, model class mismatch (when ``strict``),
            missing/unexpected parameters (when ``strict``) or shape mismatches.

    Example:
        >>> import tempfile
        >>> src = torch.nn.Linear(2, 2)
        >>> p = save_checkpoint(tempfile.mkdtemp(), step=0, model=src)
        >>> dst = torch.nn.Linear(2, 2)
        >>> _ = load_model_weights(p, dst)
        >>> torch.equal(dst.weight, src.weight)
        True
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        _apply_weights(path, model, strict)
        return {}
    ckpt = resolve_checkpoint(path)
    meta = _read_meta_file(ckpt)
    _verify_files(ckpt, meta, [MODEL_FILE], checksum=verify)
    _check_model_class(ckpt, meta, model, strict)
    _apply_weights(ckpt / MODEL_FILE, model, strict)
    return meta


def _check_model_class(ckpt: Path, meta: Mapping[str, Any], model: nn.Module, strict: bool) -> None:
    saved = meta.get("model_class")
    current = _model_class_name(model)
    if strict and saved and saved != current:
        raise CheckpointError(f"{ckpt} holds a {saved} but the model is a {current}")


def load_train_state(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read the raw ``train_state.pt`` payload of a checkpoint (no model needed).

    Args:
        path: Checkpoint or run directory.
        map_location: Passed to ``torch.load``.

    Returns:
        ``{"step", "train_state", "optimizer", "optimizer_format", "scheduler", "rng",
        "world_size", "format_version"}``.

    Raises:
        CheckpointError: Missing, truncated or corrupt file.

    Example:
        >>> import tempfile
        >>> p = save_checkpoint(tempfile.mkdtemp(), step=7, model=torch.nn.Linear(1, 1))
        >>> load_train_state(p)["step"]
        7
    """
    ckpt = resolve_checkpoint(path)
    file = ckpt / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip/EOF/runtime errors all mean "corrupt"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{file} is truncated or corrupt ({type(exc).__name__}: {first[:200]})"
        ) from None
    if not isinstance(payload, dict) or "train_state" not in payload:
        raise CheckpointError(f"{file} is not a calm_models train state")
    return payload


def _check_config(ckpt: Path, config: Any, fields: Sequence[str] | None) -> None:
    file = ckpt / CONFIG_FILE
    try:
        saved = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{file} is missing or corrupt: {str(exc).splitlines()[0]}") from None
    current = config_to_dict(config)
    flat_saved, flat_current = flatten_config(saved), flatten_config(current)
    # Fields that exist on one side only (added or removed since) cannot be compared.
    diffs = [
        p for p in diff_configs(saved, current, fields) if p in flat_saved and p in flat_current
    ]
    if diffs:
        shown = "; ".join(
            f"{p} = {flat_saved[p]!r} in the checkpoint but {flat_current[p]!r} now"
            for p in diffs[:_MAX_LISTED]
        )
        more = f" (and {len(diffs) - _MAX_LISTED} more)" if len(diffs) > _MAX_LISTED else ""
        raise CheckpointError(f"{ckpt} was saved with a different configuration: {shown}{more}")


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    config: Any | None = None,
    fields: Sequence[str] | None = None,
    map_location: Any = "cpu",
    strict: bool = True,
    restore_rng: bool = True,
    verify: bool = True,
) -> dict[str, Any]:
    """Resume from a checkpoint: weights, optimizer, scheduler and RNG states.

    Args:
        path: Checkpoint directory, or a run directory (its latest checkpoint).
        model: Target model (plain, compiled, DDP or FSDP; same wrapping as when training).
        optimizer: Optimiser to restore (must be built over the same parameters).
        scheduler: Scheduler to restore.
        config: Current config (dataclass or dict).  When given, every dotted field under
            ``fields`` that exists in both the saved and the current config must be
            equal, else the load is refused before touching the model.
        fields: Dotted prefixes to compare, e.g. ``["model"]``; ``None`` compares every
            field present in ``config`` (so pass only the model-defining part, or a prefix).
        map_location: ``torch.load`` map location of the train state (optimizer states are
            moved to the parameters' devices by the optimizer itself).
        strict: Require the same model class and exactly the same parameter names.
        restore_rng: Restore Python/numpy/torch(/CUDA) RNG states of this rank.
        verify: Check file sizes and sha256 checksums recorded in ``meta.json``.

    Returns:
        The ``train_state`` dict given to :func:`save_checkpoint`.

    Raises:
        CheckpointError: One line naming the file or fields: missing/truncated/corrupt file,
            checksum mismatch, config mismatch (field and both values), model class mismatch,
            missing/unexpected parameters, shape mismatch (parameter and both shapes), or an
            optimizer/scheduler state that does not fit.

    Example:
        >>> import tempfile
        >>> run = tempfile.mkdtemp()
        >>> _ = save_checkpoint(run, step=1, model=torch.nn.Linear(2, 2), config={"model": {"h": 2}})
        >>> load_checkpoint(run, model=torch.nn.Linear(2, 2), config={"model": {"h": 4}})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        calm_models.checkpoint.CheckpointError: ... was saved with a different configuration: model.h = 2 in the checkpoint but 4 now
    """
    ckpt = resolve_checkpoint(path)
    meta = _read_meta_file(ckpt)
    _verify_files(ckpt, meta, [MODEL_FILE, STATE_FILE, CONFIG_FILE], checksum=verify)
    if config is not None:
        _check_config(ckpt, config, fields)
    _check_model_class(ckpt, meta, model, strict)
    payload = load_train_state(ckpt, map_location=map_location)
    _apply_weights(ckpt / MODEL_FILE, model, strict)
    file = ckpt / STATE_FILE
    if optimizer is not None:
        if payload.get("optimizer") is None:
            raise CheckpointError(f"{file} holds no optimizer state")
        try:
            if payload.get("optimizer_format") == "fqn" or _is_fsdp(model):
                if payload.get("optimizer_format") != "fqn":
                    raise ValueError(
                        "the optimizer state was saved without FSDP; load it without FSDP"
                    )
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_optimizer_state_dict,
                )

                set_optimizer_state_dict(
                    model,
                    optimizer,
                    payload["optimizer"],
                    options=StateDictOptions(full_state_dict=True),
                )
            else:
                optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(f"cannot restore the optimizer from {file}: {exc}") from None
    if scheduler is not None:
        if payload.get("scheduler") is None:
            raise CheckpointError(f"{file} holds no scheduler state")
        try:
            scheduler.load_state_dict(payload["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"cannot restore the scheduler from {file}: {exc}") from None
    if restore_rng:
        states = payload.get("rng") or []
        rank, world = _rank_and_world()
        if len(states) == world:
            restore_rng_state(states[rank])
        elif states:
            warnings.warn(
                f"{file} was saved by {len(states)} process(es) but {world} are running: "
                "RNG states not restored",
                stacklevel=2,
            )
    return payload["train_state"]
