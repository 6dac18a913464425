"""Append-only training metrics: JSON lines (the source of truth), a CSV copy, optional TensorBoard.

Every :meth:`MetricsLogger.log` appends one record to ``run_dir/metrics.jsonl`` and to ``run_dir/metrics.csv`` and
flushes both, so a crash loses nothing logged; a new key rewrites the CSV with the wider header (atomically).
Non-finite numbers are written as ``null``.

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
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from calm_models._layers import atomic_write, to_json

_FIRST_COLUMNS = ("step", "split", "time")


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"metric tensors must hold one element, got shape {tuple(value.shape)}")
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def read_metrics(run_dir: str | os.PathLike[str], *, split: str | None = None) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (of one ``split`` if given), skipping a cut-off last line.

    Raises:
        FileNotFoundError: No metrics file (the message names it).
        ValueError: A malformed line before the last one (naming file and line).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\\n{"step": 2, "lo')
        >>> read_metrics(d)
        [{'step': 1, 'loss': 2.0}]
    """
    path = Path(run_dir)
    path = path if path.suffix == ".jsonl" else path / "metrics.jsonl"
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
            if number == len(lines):  # the writer died in the middle of this line
                break
            raise ValueError(f"{path}, line {number}: malformed JSON record") from None
        if split is None or record.get("split") == split:
            records.append(record)
    return records


class MetricsLogger:
    """Append metrics to ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard if asked).

    Args:
        run_dir: Run directory.
        enabled: ``False`` (on ranks other than 0) makes every method a no-op.
        tensorboard: Also write scalars under ``run_dir/tensorboard`` (warns if not installed).
        resume_step: First drop the records with a larger ``step`` (an interrupted run's records after its checkpoint).
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
        self.jsonl_path, self.csv_path = (self.run_dir / "metrics.jsonl", self.run_dir / "metrics.csv")
        self._jsonl = self._csv = self._writer = None
        self._columns: list[str] = []
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        records = read_metrics(self.jsonl_path) if self.jsonl_path.is_file() else []
        if resume_step is not None:
            records = [r for r in records if not (isinstance(r.get("step"), int) and r["step"] > resume_step)]
        atomic_write(self.jsonl_path, "".join(to_json(r) + "\n" for r in records).encode())
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._rewrite_csv(records)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:
                message = "tensorboard is not installed; logging to metrics.jsonl and metrics.csv only"
                warnings.warn(f"{message} (pip install tensorboard)", stacklevel=2)

    def _rewrite_csv(self, records: list[dict[str, Any]]) -> None:
        first = [c for c in _FIRST_COLUMNS if any(c in r for r in records)]
        self._columns = list(dict.fromkeys([*first, *(k for record in records for k in record)]))
        buffer = io.StringIO()
        if self._columns:
            writer = csv.DictWriter(buffer, fieldnames=self._columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
        if self._csv is not None:
            self._csv.close()
        atomic_write(self.csv_path, buffer.getvalue().encode())
        self._csv = open(self.csv_path, "a", encoding="utf-8", newline="")

    def log(self, metrics: Mapping[str, Any], *, step: int | None = None, split: str | None = None) -> None:
        """Append one record (scalars, one-element tensors, strings) and flush it to disk.

        Example:
            >>> import tempfile
            >>> log = MetricsLogger(tempfile.mkdtemp())
            >>> log.log({"loss": torch.tensor(0.5)}, step=3, split="train")
            >>> read_metrics(log.run_dir)[0]["loss"]
            0.5
        """
        if self._jsonl is None:
            return
        metrics = dict(metrics)
        step = metrics.pop("step", step)
        split = metrics.pop("split", split)
        record = {
            **({"step": int(step)} if step is not None else {}),
            **({"split": split} if split is not None else {}),
            "time": round(time.time(), 3),
            **{str(k): _plain(v) for k, v in metrics.items()},
        }
        record = json.loads(to_json(record))  # NaN and inf become null, in both files
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if any(k not in self._columns for k in record):
            self._rewrite_csv(read_metrics(self.jsonl_path))
        else:
            csv.DictWriter(self._csv, fieldnames=self._columns, lineterminator="\n").writerow(record)
            self._csv.flush()
        if self._writer is not None and step is not None:
            for key, value in record.items():
                if key not in _FIRST_COLUMNS and type(value) in (int, float) and math.isfinite(value):  # not bool
                    self._writer.add_scalar(f"{split}/{key}" if split else key, value, int(step))
            self._writer.flush()

    def close(self) -> None:
        """Close the files; later :meth:`log` calls are ignored."""
        for fh in (self._jsonl, self._csv, self._writer):
            if fh is not None:
                fh.close()
        self._jsonl = self._csv = self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
