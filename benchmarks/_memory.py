"""Peak-memory measurement for the benchmarks (private helper, shared by bench_*.py files).

CPU: :func:`measure_in_subprocess` runs a callable once in a fresh Python process and reports
its peak resident memory above the baseline taken right after the inputs were built, so the
number is not polluted by whatever the benchmark process allocated before. An optional cap on
the child's address space turns a formulation that would exhaust the machine into a clean
``"oom"`` report instead of a crash.

CUDA: :func:`measure_cuda` uses ``torch.cuda.max_memory_allocated`` in-process.

The callable is named by ``"path/to/file.py:factory"``: the child imports that file, calls
``factory(**kwargs)`` to build the inputs and get a zero-argument callable, then times and
measures one call of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["MemoryReport", "available_memory_bytes", "measure_cuda", "measure_in_subprocess"]

_CHILD = r"""
import gc, importlib.util, json, resource, sys, time

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

args = json.loads(sys.argv[1])
sys.path[:0] = args["sys_path"]
report = {"status": "error", "peak_bytes": None, "baseline_bytes": None, "seconds": None,
          "message": ""}
try:
    import torch
    torch.set_num_threads(args["threads"])
    path, name = args["target"].rsplit(":", 1)
    spec = importlib.util.spec_from_file_location("_measured_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, name)(**args["kwargs"])
    gc.collect()
    exact = reset_peak()
    baseline = status("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["baseline_bytes"] = baseline
    if args["limit_bytes"] is not None:
        cap = status("VmSize") + args["limit_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    start = time.perf_counter()
    try:
        fn()
    except (MemoryError, RuntimeError) as exc:
        text = str(exc)
        if isinstance(exc, MemoryError) or "alloc" in text.lower() or "memory" in text.lower():
            report["status"] = "oom"
            report["message"] = text.strip().splitlines()[-1][:300]
        else:
            raise
    else:
        report["seconds"] = time.perf_counter() - start
        report["status"] = "ok"
    peak = status("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["peak_bytes"] = peak - baseline
except Exception as exc:  # reported to the parent, never raised through the pipe
    report["message"] = f"{type(exc).__name__}: {exc}"[:500]
print("\n" + json.dumps(report))
"""


@dataclass
class MemoryReport:
    """Result of one measured call.

    Attributes:
        status: ``"ok"``, ``"oom"`` (allocation refused under the cap, or the child was
            killed), ``"timeout"`` or ``"error"``.
        peak_bytes: peak resident memory during the call above ``baseline_bytes`` (for
            ``"oom"``: the peak reached before failing); ``None`` if unknown.
        baseline_bytes: resident memory after the inputs were built.
        seconds: wall time of the call (``None`` unless ``status == "ok"``).
        message: error text, if any.
    """

    status: str
    peak_bytes: int | None = None
    baseline_bytes: int | None = None
    seconds: float | None = None
    message: str = ""

    @property
    def peak_mib(self) -> float | None:
        """Peak in MiB, or ``None``."""
        return None if self.peak_bytes is None else self.peak_bytes / 2**20

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready), with ``peak_mib`` added."""
        return {**asdict(self), "peak_mib": self.peak_mib}


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes, or ``None`` where it is unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_in_subprocess(
    target: str,
    kwargs: dict | None = None,
    *,
    limit_bytes: int | None = None,
    threads: int = 2,
    timeout: float = 600.0,
    sys_path: list[str] | None = None,
) -> MemoryReport:
    """Runs ``factory(**kwargs)()`` once in a fresh interpreter and reports its peak memory.

    Args:
        target: ``"path/to/file.py:factory"``; ``factory(**kwargs)`` builds the inputs and
            returns the zero-argument callable to measure.
        kwargs: JSON-serialisable keyword arguments of the factory.
        limit_bytes: cap on the address space the call may add (``RLIMIT_AS``); beyond it
            allocations fail and the report says ``"oom"``. ``None``: no cap.
        threads: ``torch.set_num_threads`` in the child.
        timeout: seconds before the child is killed (``"timeout"``).
        sys_path: folders prepended to the child's ``sys.path`` (default: the repository
            root, so that the project's packages import without installation).

    Returns:
        A :class:`MemoryReport`.
    """
    root = str(Path(__file__).resolve().parents[1])
    payload = {
        "target": target,
        "kwargs": kwargs or {},
        "limit_bytes": limit_bytes,
        "threads": threads,
        "sys_path": sys_path if sys_path is not None else [root],
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(payload)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return MemoryReport("timeout", message=f"no result within {timeout:.0f} s")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        killed = proc.returncode < 0
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return MemoryReport(
            "oom" if killed else "error", message=f"child exited with code {proc.returncode}: {tail[0][:300]}"
        )
    return MemoryReport(**json.loads(lines[-1]))


def measure_cuda(fn, device=None) -> int:
    """Peak CUDA memory (bytes) allocated by one call of ``fn()`` above what was allocated before.

    Args:
        fn: zero-argument callable; its inputs should already be on the device.
        device: CUDA device (default: the current one).

    Returns:
        ``torch.cuda.max_memory_allocated`` during the call minus the allocation before it.
    """
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline
