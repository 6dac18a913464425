"""Shared pytest configuration.

* Hypothesis runs derandomised (fixed seeds) so every property test is deterministic.
* Tests marked ``gpu`` are skipped cleanly when CUDA is not available.
* ``shared_data`` gives the path of ``../shared/data`` or skips with a clear reason.
* Every test runs with one torch thread: the tensors are tiny, and on a shared 2-core machine
  intra-op threads only add overhead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "deterministic",
    derandomize=True,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """Path of ``../shared/data``; skips the test when that folder is absent."""
    path = Path(os.environ.get("CALM_SHARED_DATA", SHARED_DATA))
    if not (path / "pd_english_train.jsonl").exists():
        pytest.skip(f"real-text data not found at {path} (set CALM_SHARED_DATA to its folder)")
    return path
