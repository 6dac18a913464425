"""The relative-speed guard of ``pytest benchmarks/``: the run fails when a published speed-up halves.

Wall-clock times depend on the machine; the *ratio* of the library to its naive formulation, both
timed in the same run, does not, to first order. After the benchmarks ran, every guard of
:data:`GUARDS` whose two benchmarks ran compares the ratio of their median times with the ratio
published in the README (``published``) and fails the session (exit status 1, with one line per
guard) when it fell below half of it. Guards whose benchmarks were deselected are skipped.

Update ``published`` together with the README's speed table (``benchmarks/render.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Guard:
    """``slow`` median / ``fast`` median must stay above ``published / 2``; a benchmark is ``(test name, params)``."""

    what: str
    fast: tuple[str, dict]
    slow: tuple[str, dict]
    published: float


#: The speed-ups of the README's table (its run of 2026-12-06, 2-core x86_64 CPU, quiet).
GUARDS = (
    Guard(
        "energy_loss fwd+bwd against the broadcast formulation, 1024 vectors",
        ("test_energy_loss_forward_backward", {"impl": "energy_loss", "vectors": 1024}),
        ("test_energy_loss_forward_backward", {"impl": "broadcast", "vectors": 1024}),
        published=11.0,
    ),
    Guard(
        "batched_temperature_sample against the per-row Counter, batch 512",
        ("test_batched", {"batch": 512}),
        ("test_counter_reference", {"batch": 512}),
        published=49.0,
    ),
    Guard(
        "token-baseline BrierLM against the per-position loop, 1 x 128 tokens",
        ("test_baseline_brier_eval", {"method": "batched", "batch": 1}),
        ("test_baseline_brier_eval", {"method": "loop", "batch": 1}),
        published=13.5,
    ),
)


def _median(benchmarks: list, test: str, params: dict) -> float | None:
    for bench in benchmarks:
        if bench.name.split("[")[0] == test and (bench.params or {}) == params and bench.stats:
            return bench.stats.median
    return None


def check_guards(benchmarks: list, guards: tuple[Guard, ...] = GUARDS) -> list[str]:
    """One line per guard: ``ok``, ``FAILED`` (ratio below half the published one) or ``skipped``."""
    lines = []
    for guard in guards:
        fast, slow = _median(benchmarks, *guard.fast), _median(benchmarks, *guard.slow)
        if fast is None or slow is None:
            lines.append(f"skipped  {guard.what}: not run")
            continue
        ratio = slow / fast
        status = "ok      " if ratio >= guard.published / 2 else "FAILED  "
        lines.append(
            f"{status}{guard.what}: {ratio:.1f}x (published {guard.published:g}x, floor {guard.published / 2:g}x)"
        )
    return lines


def pytest_sessionfinish(session, exitstatus):
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is None or getattr(bench_session, "disabled", False):
        return
    lines = check_guards(bench_session.benchmarks)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("-", "relative-speed guard")
        for line in lines:
            reporter.write_line(line)
    if any(line.startswith("FAILED") for line in lines) and session.exitstatus == 0:
        session.exitstatus = 1
