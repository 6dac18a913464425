"""The relative-speed guard of ``pytest benchmarks/`` (benchmarks/conftest.py) fails when a speed-up halves."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

_SPEC = importlib.util.spec_from_file_location(
    "bench_conftest", Path(__file__).parents[1] / "benchmarks" / "conftest.py"
)
guard = sys.modules["bench_conftest"] = importlib.util.module_from_spec(_SPEC)  # dataclasses look it up there
_SPEC.loader.exec_module(guard)


def _bench(name: str, params: dict, median: float) -> SimpleNamespace:
    return SimpleNamespace(name=f"{name}[x]", params=params, stats=SimpleNamespace(median=median))


def test_guard_passes_at_the_published_ratio_and_fails_below_half():
    g = guard.Guard("toy", ("test_fast", {"n": 1}), ("test_slow", {"n": 1}), published=10.0)
    fast = _bench("test_fast", {"n": 1}, 1.0)
    assert guard.check_guards([fast, _bench("test_slow", {"n": 1}, 10.0)], (g,))[0].startswith("ok")
    assert guard.check_guards([fast, _bench("test_slow", {"n": 1}, 5.0)], (g,))[0].startswith("ok")  # exactly half
    assert guard.check_guards([fast, _bench("test_slow", {"n": 1}, 4.9)], (g,))[0].startswith("FAILED")
    assert guard.check_guards([fast], (g,))[0].startswith("skipped")  # the slow one was deselected
    assert guard.check_guards([fast, _bench("test_slow", {"n": 2}, 10.0)], (g,))[0].startswith("skipped")


def test_every_guard_names_benchmarks_that_exist():
    sources = "".join(p.read_text() for p in (Path(__file__).parents[1] / "benchmarks").glob("bench_*.py"))
    for g in guard.GUARDS:
        for test, _ in (g.fast, g.slow):
            assert f"def {test}(" in sources, test
