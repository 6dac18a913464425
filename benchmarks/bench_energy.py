"""Benchmark: energy_loss forward + backward against the broadcast formulation.

The CALM setting: n = 8 model draws and m = 100 target draws of d = 128 latent vectors, for
1k and 8k vectors (batch elements) per micro-batch. Both formulations run in the same session;
time comes from pytest-benchmark, peak memory from a fresh subprocess (CPU, resident memory
above the baseline after the inputs were built) or ``torch.cuda.max_memory_allocated`` (CUDA),
stored in ``extra_info``. The broadcast formulation builds an (n, m, B, d) tensor; where a
one-off run would exceed the memory cap it is reported as OOM and its timing skipped.

Run (from the repository root)::

    python -m pytest benchmarks/bench_energy.py -p no:cacheprovider -o python_files='bench_*.py' \
        --benchmark-json=bench_energy.json
    python benchmarks/bench_energy.py --json bench_energy.json   # standalone table

Environment: ``BENCH_THREADS`` (torch threads, default 2), ``BENCH_ENERGY_MEM_CAP_GB`` (cap on
the extra memory of one measured call, default min(8, 60% of available)),
``BENCH_DEVICE`` (default: cuda if available, else cpu).

Axis key: n model draws, m target draws, B vectors (batch), d features.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # standalone run: make the project importable
    sys.path.insert(0, str(_ROOT))
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from _memory import MemoryReport, available_memory_bytes, measure_cuda, measure_in_subprocess  # noqa: E402

from likelihood_free.energy import energy_loss  # noqa: E402

N_SAMPLES, N_TARGETS, DIM = 8, 100, 128
VECTORS = (1024, 8192)
IMPLS = ("energy_loss", "broadcast")
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
DEVICE = os.environ.get("BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def broadcast_energy_loss(samples: torch.Tensor, targets: torch.Tensor, beta: float = 1.0):
    """The energy loss written plainly from its formula: (n, n, B, d) and (n, m, B, d) tensors."""
    n, m = samples.shape[0], targets.shape[0]
    d_xx = (samples[:, None] - samples[None, :]).norm(dim=-1)  # (n, n, B); diagonal is 0
    d_xy = (samples[:, None] - targets[None, :]).norm(dim=-1)  # (n, m, B)
    spread = d_xx.pow(beta).sum(dim=(0, 1)) / (n * (n - 1))  # (B,)
    fit = d_xy.pow(beta).sum(dim=(0, 1)) / (n * m)  # (B,)
    return -(spread - 2.0 * fit).mean()


def make_case(impl: str, vectors: int, device: str = "cpu", seed: int = 0):
    """Builds inputs and returns a zero-argument callable: one forward + backward pass."""
    loss_fn = {"energy_loss": energy_loss, "broadcast": broadcast_energy_loss}[impl]
    g = torch.Generator().manual_seed(seed)
    samples = torch.randn(N_SAMPLES, vectors, DIM, generator=g).to(device).requires_grad_()
    targets = torch.randn(N_TARGETS, vectors, DIM, generator=g).to(device)

    def step() -> None:
        samples.grad = None
        loss_fn(samples, targets).backward()
        if samples.device.type == "cuda":
            torch.cuda.synchronize(samples.device)

    return step


def estimated_broadcast_bytes(vectors: int) -> int:
    """Rough peak of the broadcast formulation: the (n, m, B, d) difference, its gradient and a
    temporary, in float32."""
    return 3 * N_SAMPLES * N_TARGETS * vectors * DIM * 4


def memory_cap_bytes() -> int:
    """Cap on the extra memory a single measured call may take."""
    if "BENCH_ENERGY_MEM_CAP_GB" in os.environ:
        return int(float(os.environ["BENCH_ENERGY_MEM_CAP_GB"]) * 2**30)
    available = available_memory_bytes() or 16 * 2**30
    return int(min(8 * 2**30, 0.6 * available))


def measure_memory(impl: str, vectors: int) -> MemoryReport:
    """Peak memory of one forward + backward (subprocess on CPU, in-process on CUDA)."""
    if DEVICE.startswith("cuda"):
        fn = make_case(impl, vectors, DEVICE)
        try:
            return MemoryReport("ok", peak_bytes=measure_cuda(fn))
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            return MemoryReport("oom", message=str(exc).splitlines()[0])
    return measure_in_subprocess(
        f"{Path(__file__).resolve()}:make_case",
        {"impl": impl, "vectors": vectors, "device": DEVICE},
        limit_bytes=memory_cap_bytes(),
        threads=THREADS,
    )


# ----------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # standalone run without pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("vectors", VECTORS)
    @pytest.mark.parametrize("impl", IMPLS)
    def test_energy_loss_forward_backward(benchmark, impl: str, vectors: int) -> None:
        torch.set_num_threads(THREADS)
        benchmark.group = f"energy loss fwd+bwd, n={N_SAMPLES} m={N_TARGETS} d={DIM}, {vectors} vectors"
        memory = measure_memory(impl, vectors)
        info = {
            "impl": impl,
            "vectors": vectors,
            "n": N_SAMPLES,
            "m": N_TARGETS,
            "d": DIM,
            "device": DEVICE,
            "threads": THREADS,
            "memory_cap_mib": memory_cap_bytes() / 2**20,
            "memory": memory.to_dict(),
            "peak_memory_mib": memory.peak_mib,
        }
        benchmark.extra_info.update(info)
        if memory.status != "ok":
            need = ""
            if impl == "broadcast":
                need = f"; needs ~{estimated_broadcast_bytes(vectors) / 2**30:.1f} GiB (estimate)"
            pytest.skip(
                f"{impl} at {vectors} vectors did not run within the memory cap of "
                f"{memory_cap_bytes() / 2**30:.1f} GiB (status {memory.status}: "
                f"{memory.message}){need}; raise BENCH_ENERGY_MEM_CAP_GB to try"
            )
        step, cpu_seconds = _with_cpu_time(make_case(impl, vectors, DEVICE))
        rounds = 5 if impl == "energy_loss" else 3
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
        benchmark.extra_info["vectors_per_s"] = vectors / benchmark.stats.stats.median
        # Process CPU time (all threads) per call: robust to other jobs sharing the cores.
        benchmark.extra_info["cpu_s_median"] = statistics.median(cpu_seconds[1:])
        benchmark.extra_info["load_average_1min"] = os.getloadavg()[0]


# ----------------------------------------------------------------------------- standalone


def _with_cpu_time(step):
    """Wraps ``step`` so that each call appends its process CPU time (s) to the returned list."""
    cpu_seconds: list[float] = []

    def timed() -> None:
        start = time.process_time()
        step()
        cpu_seconds.append(time.process_time() - start)

    return timed, cpu_seconds


def _time(step, rounds: int) -> tuple[float, float, float]:
    """(median wall s, min wall s, median process CPU s) over ``rounds`` calls after a warm-up."""
    step, cpu_seconds = _with_cpu_time(step)
    step()  # warm-up
    wall = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        wall.append(time.perf_counter() - start)
    return statistics.median(wall), min(wall), statistics.median(cpu_seconds[1:])


def main(argv: list[str] | None = None) -> dict:
    """Times both formulations side by side, prints a table, optionally writes JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, nargs="+", default=list(VECTORS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)

    rows = []
    for vectors in args.vectors:
        for impl in IMPLS:
            memory = measure_memory(impl, vectors)
            wall = best = cpu = None
            if memory.status == "ok":
                rounds = args.rounds if impl == "energy_loss" else max(1, args.rounds // 2)
                wall, best, cpu = _time(make_case(impl, vectors, DEVICE), rounds)
            rows.append(
                {
                    "impl": impl,
                    "vectors": vectors,
                    "median_s": wall,
                    "min_s": best,
                    "cpu_s": cpu,
                    "vectors_per_s": None if wall is None else vectors / wall,
                    "peak_memory_mib": memory.peak_mib,
                    "memory": memory.to_dict(),
                }
            )
    header = (
        f"energy loss forward+backward, n={N_SAMPLES} m={N_TARGETS} d={DIM}, device={DEVICE}, "
        f"threads={THREADS}, memory cap {memory_cap_bytes() / 2**30:.1f} GiB, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(header)
    print(
        f"{'impl':<12} {'vectors':>7} {'median ms':>10} {'min ms':>8} {'cpu ms':>8} "
        f"{'vectors/s':>10} {'peak MiB':>9}  note"
    )

    def fmt(value, scale=1.0, spec=".1f") -> str:
        return "-" if value is None else format(scale * value, spec)

    for row in rows:
        note = row["memory"]["status"] if row["memory"]["status"] != "ok" else ""
        print(
            f"{row['impl']:<12} {row['vectors']:>7} {fmt(row['median_s'], 1e3):>10} "
            f"{fmt(row['min_s'], 1e3):>8} {fmt(row['cpu_s'], 1e3):>8} "
            f"{fmt(row['vectors_per_s'], spec='.0f'):>10} {fmt(row['peak_memory_mib'], spec='.0f'):>9}"
            f"  {note}"
        )
    for vectors in args.vectors:
        fast, slow = (next(r for r in rows if r["impl"] == i and r["vectors"] == vectors) for i in IMPLS)
        if fast["median_s"] and slow["median_s"]:
            print(
                f"{vectors} vectors: energy_loss is {slow['median_s'] / fast['median_s']:.1f}x "
                f"faster (median wall), {slow['min_s'] / fast['min_s']:.1f}x (min wall), "
                f"{slow['cpu_s'] / fast['cpu_s']:.1f}x (CPU time); peak memory "
                f"{fast['peak_memory_mib'] / slow['peak_memory_mib']:.3f} of broadcast"
            )
        elif fast["median_s"]:
            print(
                f"{vectors} vectors: broadcast {slow['memory']['status']} "
                f"({slow['memory']['message'][:120]}); energy_loss ran"
            )
    result = {"setting": header, "rows": rows}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
