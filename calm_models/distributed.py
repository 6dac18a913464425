"""Device, process group, data-parallel wrapping (DDP, FSDP2) and autocast, chosen once at start-up."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: ``rank``, ``local_rank``, ``world_size`` and its ``device``."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and logs."""
        return self.rank == 0


def is_initialized() -> bool:
    """A process group is running (``torchrun``, or :func:`init_distributed` with several ranks)."""
    return dist.is_available() and dist.is_initialized()


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The device of a preference: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda`` (``cuda:LOCAL_RANK``),
    ``mps``, or one device such as ``cuda:1`` or a :class:`torch.device`.

    Raises:
        ValueError: An unknown preference, or a requested device that is not available (one line).

    Example:
        >>> resolve_device("cpu"), resolve_device(torch.device("cpu"))
        (device(type='cpu'), device(type='cpu'))
    """
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or not (index == "" or index.isdigit()):
        raise ValueError(f"device must be one of auto, cpu, cuda, mps (or one device, cuda:N), got {device!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} was requested but CUDA is not available on this machine; use device=cpu or "
                "device=auto"
            )
        index = int(index) if index else local_rank
        if index >= torch.cuda.device_count():
            what = f"LOCAL_RANK={local_rank}" if name == "cuda" else f"device {name!r}"
            raise ValueError(f"{what} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    if kind == "mps" and not mps:
        raise ValueError("device 'mps' was requested but MPS is not available; use device=cpu")
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``, pick the device (``cuda:LOCAL_RANK`` on CUDA)
    and start the process group if needed (NCCL on CUDA, Gloo otherwise).

    Example:
        >>> info = init_distributed("cpu")
        >>> (info.rank, info.world_size, info.device.type)
        (0, 1, 'cpu')
    """
    env = {name: os.environ.get(name, "") for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    try:
        world_size, rank, local_rank = (int(env[n] or d) for n, d in zip(env, (1, 0, 0), strict=True))
    except ValueError:
        raise ValueError(f"RANK, LOCAL_RANK and WORLD_SIZE must be integers, got {env}") from None
    if is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not is_initialized():
        if dev.type == "mps":
            raise ValueError("multi-process training on MPS is not supported; use device=cpu")
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world_size} but {missing[0]} is not set; use torchrun")
        kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank, local_rank, world_size, dev)


def barrier() -> None:
    """Wait for every process of the default group (no-op without one)."""
    if is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over all processes (a detached copy; the input is not modified).

    Example:
        >>> all_reduce_mean(torch.tensor([1.0, 3.0]))
        tensor([1., 3.])
    """
    out = tensor.detach().clone()
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out = out / dist.get_world_size()
    return out


def cleanup() -> None:
    """Destroy the default process group if one exists."""
    if is_initialized():
        dist.destroy_process_group()


def wrap_model(
    model: nn.Module, info: DistInfo, strategy: str = "ddp", *, fsdp_modules: Iterable[type[nn.Module]] = ()
) -> nn.Module:
    """Move ``model`` to ``info.device`` and wrap it for data parallelism (in one process: return it).

    Args:
        model: The module (compile after wrapping).
        info: From :func:`init_distributed`.
        strategy: ``"ddp"`` (:class:`~torch.nn.parallel.DistributedDataParallel`), ``"fsdp"``
            (FSDP2 ``fully_shard``) or ``"none"``.
        fsdp_modules: FSDP: sub-module classes sharded one by one before the root (the
            transformer blocks), so that their all-gathers overlap compute.

    Example:
        >>> info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
        >>> type(wrap_model(torch.nn.Linear(2, 2), info, "ddp")).__name__
        'Linear'
    """
    if strategy not in ("ddp", "fsdp", "none"):
        raise ValueError(f"strategy must be one of ddp, fsdp, none, got {strategy!r}")
    model = model.to(info.device)
    if strategy == "none" or info.world_size == 1 or not is_initialized():
        return model
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    classes = tuple(fsdp_modules)
    for sub in [m for m in model.modules() if m is not model and isinstance(m, classes)]:
        fully_shard(sub)
    fully_shard(model)
    return model


def autocast_context(device: torch.device | str, precision: str = "auto"):
    """The forward pass's mixed-precision context: bf16 autocast or a ``nullcontext``.

    ``auto`` is bf16 on a CUDA device that supports it and full precision elsewhere; ``bf16``
    forces it on any device; ``fp32`` disables it.

    Example:
        >>> with autocast_context("cpu", "bf16"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be one of auto, bf16, fp32, got {precision!r}")
    device = torch.device(device)
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "fp32" or (precision == "auto" and not cuda_bf16):
        return contextlib.nullcontext()
    if device.type == "cuda" and not cuda_bf16:
        raise ValueError("precision 'bf16' was requested but this CUDA device does not support it")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
