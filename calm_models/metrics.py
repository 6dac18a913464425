"""Append-only training metrics: JSON lines (the source of truth), CSV and optional TensorBoard.

Every :meth:`MetricsLogger.log` call appends one JSON object to ``run_dir/metrics.jsonl`` and one
row to ``run_dir/metrics.csv`` and flushes both, so a crash loses nothing that was logged.  Rows
look like ``{"step": 100, "split": "train", "loss": 2.31, "lr": 3e-4, "tokens_per_s": 5.1e4,
"time": 1715000000.0}``; any keys may appear.  When a record brings a key the CSV header does
not have yet, the CSV is regenerated from the JSON lines with the wider header (written to a
temporary file and renamed, so it is never half-written); otherwise rows are appended.

On resume, pass ``resume_step`` so that records logged after the checkpoint (by the run that
crashed) are dropped and the curves have no duplicated steps.

Example:
    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> with MetricsLogger(run) as log:
    ...     log.log({"loss": 2.5, "lr": 1e-3}, step=1, split="train")
    ...     log.log({"loss": 2.7, "brier_lm": 11.0}, step=1, split="valid")
    >>> [(r["split"], r["loss"]) for r in read_metrics(run)]
    [('train', 2.5), ('valid', 2.7)]
    >>> open(f"{run}/metrics.csv").readline().strip()
    'step,split,time,loss,lr,brier_lm'
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsLogger", "read_metrics"]

JSONL_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
_FIRST_COLUMNS = ("step", "split", "time")


def _plain(value: Any) -> Any:
    """Turn tensors and numpy scalars into Python numbers (logging only: not a hot path)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric tensors must hold one element, got shape {tuple(value.shape)}"
            )
        return value.detach().cpu().item()
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def _jsonl_path(run_dir_or_file: str | os.PathLike[str]) -> Path:
    path = Path(run_dir_or_file)
    return path if path.suffix == ".jsonl" else path / JSONL_FILE


def read_metrics(
    run_dir: str | os.PathLike[str], *, split: str | None = None
) -> list[dict[str, Any]]:
    """Read the records of ``metrics.jsonl``.

    A last line cut short by a crash is ignored; a malformed line elsewhere is an error.

    Args:
        run_dir: Run directory, or the path of a ``.jsonl`` file.
        split: Keep only records of this split (``"train"``, ``"valid"``, ...).

    Returns:
        The records, in the order they were logged.

    Raises:
        FileNotFoundError: If the metrics file does not exist (the message names it).
        ValueError: A malformed line before the last one (the message names file and line).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\\n{"step": 2, "lo')
        >>> read_metrics(d)
        [{'step': 1, 'loss': 2.0}]
    """
    path = _jsonl_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # partial final line: the writer died mid-write
                break
            raise ValueError(f"{path}, line {number}: malformed JSON record") from None
        if split is None or record.get("split") == split:
            records.append(record)
    return records


class MetricsLogger:
    """Append metrics to ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard if asked).

    Create it with ``enabled=is_main_process()``: on other ranks every method does nothing.

    Args:
        run_dir: Run directory (created if needed).
        enabled: Write anything at all (``False`` on non-zero ranks).
        tensorboard: Also write TensorBoard scalars under ``run_dir/tensorboard`` (tag
            ``"<split>/<key>"``); warns once and continues without if ``tensorboard`` is not
            installed.
        resume_step: When resuming from a checkpoint at this step, first drop the records
            with a larger ``step`` (logged by the interrupted run after its last checkpoint).

    Example:
        >>> import tempfile
        >>> log = MetricsLogger(tempfile.mkdtemp(), enabled=False)
        >>> log.log({"loss": 1.0}, step=0)
        >>> log.close()
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        enabled: bool = True,
        tensorboard: bool = False,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.jsonl_path = self.run_dir / JSONL_FILE
        self.csv_path = self.run_dir / CSV_FILE
        self._jsonl: io.TextIOWrapper | None = None
        self._csv: io.TextIOWrapper | None = None
        self._columns: list[str] = []
        self._writer: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        records = self._repair(resume_step)
        self._columns = self._columns_of(records)
        self._rewrite_csv(records)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._csv = open(self.csv_path, "a", encoding="utf-8", newline="")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:
                warnings.warn(
                    "tensorboard is not installed; logging to metrics.jsonl/metrics.csv only "
                    "(pip install tensorboard)",
                    stacklevel=2,
                )

    # -- files ---------------------------------------------------------------------------------

    def _repair(self, resume_step: int | None) -> list[dict[str, Any]]:
        """Drop a partial last line and (on resume) records past ``resume_step``."""
        if not self.jsonl_path.is_file():
            return []
        records = read_metrics(self.jsonl_path)
        text = self.jsonl_path.read_text(encoding="utf-8")
        keep = records
        if resume_step is not None:
            keep = [
                r
                for r in records
                if not (isinstance(r.get("step"), int) and r["step"] > resume_step)
            ]
        if len(keep) != len(records) or (text and not text.endswith("\n")):
            body = "".join(json.dumps(r) + "\n" for r in keep)
            self._replace(self.jsonl_path, body)
        return keep

    @staticmethod
    def _replace(path: Path, text: str) -> None:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @staticmethod
    def _columns_of(records: list[dict[str, Any]]) -> list[str]:
        columns = [c for c in _FIRST_COLUMNS if any(c in r for r in records)]
        for record in records:
            columns.extend(k for k in record if k not in columns)
        return columns

    def _rewrite_csv(self, records: list[dict[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self._columns, lineterminator="\n")
        if self._columns:
            writer.writeheader()
            writer.writerows(records)
        if self._csv is not None:
            self._csv.close()
        self._replace(self.csv_path, buffer.getvalue())
        if self._csv is not None:
            self._csv = open(self.csv_path, "a", encoding="utf-8", newline="")

    # -- public --------------------------------------------------------------------------------

    def log(
        self, metrics: Mapping[str, Any], *, step: int | None = None, split: str | None = None
    ) -> None:
        """Append one record and flush it to disk.

        Args:
            metrics: Scalar metrics (Python numbers, one-element tensors, numpy scalars, strings).
                May also hold ``"step"`` and ``"split"`` instead of the keyword arguments.
            step: Optimiser step; stored as ``"step"``.
            split: ``"train"``, ``"valid"``, ...; stored as ``"split"``.

        Raises:
            ValueError: A tensor with more than one element.

        Example:
            >>> import tempfile
            >>> log = MetricsLogger(tempfile.mkdtemp())
            >>> log.log({"loss": torch.tensor(0.5)}, step=3, split="train")
            >>> read_metrics(log.run_dir)[0]["loss"]
            0.5
        """
        if not self.enabled or self._jsonl is None or self._csv is None:
            return
        metrics = dict(metrics)
        step = metrics.pop("step", None) if step is None else step
        split = metrics.pop("split", None) if split is None else split
        record: dict[str, Any] = {}
        if step is not None:
            record["step"] = int(step)
        if split is not None:
            record["split"] = split
        record["time"] = round(time.time(), 3)
        record.update({str(k): _plain(v) for k, v in metrics.items() if k not in ("step", "split")})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if any(k not in self._columns for k in record):
            self._columns = self._columns_of([{c: None for c in self._columns}, record])
            self._rewrite_csv(read_metrics(self.jsonl_path))
        else:
            csv.DictWriter(self._csv, fieldnames=self._columns, lineterminator="\n").writerow(
                record
            )
            self._csv.flush()
        if self._writer is not None and step is not None:
            prefix = f"{split}/" if split else ""
            for key, value in record.items():
                if key in _FIRST_COLUMNS or isinstance(value, bool):
                    continue
                if isinstance(value, numbers.Real) and math.isfinite(value):
                    self._writer.add_scalar(prefix + key, value, int(step))
            self._writer.flush()

    def close(self) -> None:
        """Close the files (further :meth:`log` calls are ignored)."""
        for fh in (self._jsonl, self._csv):
            if fh is not None:
                fh.close()
        self._jsonl = self._csv = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
