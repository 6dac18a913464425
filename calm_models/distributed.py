"""Device selection, process groups, model wrapping and autocast, chosen once at start-up.

Launch single-process as ``python -m calm_models.train ...`` or multi-process with
``torchrun --nproc_per_node=N -m calm_models.train ...``.  :func:`init_distributed` reads the
``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` variables that torchrun sets (``MASTER_ADDR`` and
``MASTER_PORT`` too), picks the device once (``auto``: CUDA, else MPS, else CPU), pins the CUDA
device of each process to its local rank and initialises the process group (NCCL on CUDA,
Gloo otherwise).  Everything else in the package asks :func:`is_main_process` before writing
files or logging.

Parallelism strategies (:func:`wrap_model`):

* ``"ddp"``: :class:`~torch.nn.parallel.DistributedDataParallel`; works with NCCL and Gloo
  (CPU) alike.
* ``"fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``, torch >= 2.6) sharding the
  sub-modules of the given classes and then the root, falling back to FSDP1
  (``FullyShardedDataParallel``) on older torch.  Intended for CUDA/NCCL; FSDP2 also runs on
  CPU/Gloo (used by the tests) but there it saves nothing.  Checkpoints of an FSDP model are
  gathered into a full state dict on rank 0 by :mod:`calm_models.checkpoint`.
* ``"none"``: the module itself (also what every strategy returns in a single process).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "autocast_context",
    "barrier",
    "cleanup",
    "init_distributed",
    "is_main_process",
    "resolve_device",
    "wrap_model",
]

_DEVICE_PREFS = ("auto", "cpu", "cuda", "mps")
_PRECISIONS = ("auto", "bf16", "fp32")
_STRATEGIES = ("ddp", "fsdp", "none")


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs.

    Attributes:
        rank: Global rank (0 .. world_size - 1).
        local_rank: Rank on this node; selects the CUDA device.
        world_size: Number of processes.
        device: The device of this process (``cuda:<local_rank>``, ``mps`` or ``cpu``).
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and logs)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device_pref: str = "auto", local_rank: int = 0) -> torch.device:
    """Choose the device from a preference: ``auto`` = CUDA, else MPS, else CPU.

    Args:
        device_pref: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
        local_rank: CUDA device index to use.

    Returns:
        The device.

    Raises:
        ValueError: Unknown preference (lists the valid ones), or an explicitly requested
            device that is not available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device_pref not in _DEVICE_PREFS:
        raise ValueError(f"device must be one of {', '.join(_DEVICE_PREFS)}, got {device_pref!r}")
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if device_pref == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but CUDA is not available")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible")
        return torch.device("cuda", local_rank)
    if device_pref == "mps":
        if not _mps_available():
            raise ValueError("device='mps' was requested but MPS is not available")
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Read torchrun's environment, pick the device and start the process group if needed.

    With ``WORLD_SIZE`` unset or 1 no process group is created.  Otherwise the default group is
    initialised with ``env://`` (NCCL on CUDA, Gloo on CPU); an already initialised group is
    reused.  On CUDA the current device is set to ``cuda:LOCAL_RANK``.

    Args:
        device_pref: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"`` or ``"mps"``.

    Returns:
        The :class:`DistInfo` of this process.

    Raises:
        ValueError: Unknown ``device_pref``, unavailable device, malformed environment
            variables, or multi-process MPS (not supported by torch.distributed).

    Example:
        >>> info = init_distributed("cpu")
        >>> (info.rank, info.world_size, info.device.type)
        (0, 1, 'cpu')
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid RANK={rank} / WORLD_SIZE={world_size}")
    device = resolve_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
        if device.type == "mps":
            raise ValueError("multi-process training on MPS is not supported; use device=cpu")
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ValueError(
                    f"WORLD_SIZE={world_size} but {var} is not set; launch with torchrun"
                )
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            try:  # binding the device lets NCCL initialise eagerly (torch >= 2.3)
                dist.init_process_group(
                    backend=backend, rank=rank, world_size=world_size, device_id=device
                )
            except TypeError:
                dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True in a single process or on rank 0 of the default process group.

    Example:
        >>> is_main_process()
        True
    """
    return not _initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process of the default group (no-op without a process group).

    Example:
        >>> barrier()
    """
    if _initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (a copy; the input is not modified).

    Args:
        tensor: Any shape, on this process's device (CUDA for NCCL).

    Returns:
        Same shape: the element-wise mean over ranks (floating point; integer input is
        promoted by the division).  Without a process group, a detached copy.

    Example:
        >>> all_reduce_mean(torch.tensor([1.0, 3.0]))
        tensor([1., 3.])
    """
    out = tensor.detach().clone()
    if not _initialized() or dist.get_world_size() == 1:
        return out
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def cleanup() -> None:
    """Destroy the default process group if one exists (call at the end of training).

    Example:
        >>> cleanup()
    """
    if _initialized():
        dist.destroy_process_group()


def wrap_model(
    model: nn.Module,
    info: DistInfo,
    strategy: str = "ddp",
    *,
    fsdp_modules: Iterable[type[nn.Module]] = (),
    fsdp_param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Move ``model`` to ``info.device`` and wrap it for data parallelism.

    Args:
        model: The module (unwrapped; apply ``torch.compile`` after wrapping).
        info: From :func:`init_distributed`.
        strategy: ``"ddp"``, ``"fsdp"`` or ``"none"``.  In a single process every strategy
            returns the moved module unwrapped.
        fsdp_modules: With ``"fsdp"``: sub-module classes (e.g. the transformer block) that
            are sharded individually before the root, so their all-gathers overlap compute.
        fsdp_param_dtype: With FSDP2: parameter dtype for compute (e.g. ``torch.bfloat16``);
            gradients are reduced in fp32.  ``None`` keeps the parameters' dtype.

    Returns:
        The wrapped module.  Save checkpoints through :mod:`calm_models.checkpoint`, which
        unwraps it again.

    Raises:
        ValueError: Unknown strategy (lists the valid ones).

    Example:
        >>> info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
        >>> type(wrap_model(torch.nn.Linear(2, 2), info, "ddp")).__name__
        'Linear'
    """
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(_STRATEGIES)}, got {strategy!r}")
    model = model.to(info.device)
    if strategy == "none" or not info.is_distributed or not _initialized():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    classes = tuple(fsdp_modules)
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6: FSDP1
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy(set(classes)) if classes else None
        device_id = info.device if info.device.type == "cuda" else None
        return FullyShardedDataParallel(model, auto_wrap_policy=policy, device_id=device_id)
    kwargs: dict[str, Any] = {}
    if fsdp_param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=fsdp_param_dtype, reduce_dtype=torch.float32
        )
    if classes:
        for sub in list(model.modules())[1:]:
            if isinstance(sub, classes):
                fully_shard(sub, **kwargs)
    fully_shard(model, **kwargs)
    return model


def autocast_context(
    device: torch.device | str, precision: str = "auto"
) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context for the forward pass, chosen once from device and precision.

    * ``"auto"``: bf16 autocast on a CUDA device that supports bf16, else full precision
      (CPU and MPS run fp32 by default).
    * ``"bf16"``: bf16 autocast on any device type (explicitly allowed on CPU/MPS).
    * ``"fp32"``: full precision (a ``nullcontext``).

    Args:
        device: The device the model runs on.
        precision: ``"auto"``, ``"bf16"`` or ``"fp32"``.

    Returns:
        A context manager (``torch.autocast`` or ``contextlib.nullcontext``).

    Raises:
        ValueError: Unknown precision (lists the valid ones), or ``"bf16"`` on a CUDA device
            without bf16 support.

    Example:
        >>> type(autocast_context("cpu")).__name__
        'nullcontext'
        >>> with autocast_context("cpu", "bf16"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    cuda_bf16 = (
        device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    )
    if precision == "auto":
        if not cuda_bf16:
            return contextlib.nullcontext()
    elif device.type == "cuda" and not cuda_bf16:
        raise ValueError(
            "precision='bf16' was requested but this CUDA device does not support bf16"
        )
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
