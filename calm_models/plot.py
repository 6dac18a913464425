"""Plot the learning curves of a run from its ``metrics.jsonl`` (:func:`plot_metrics`).

Usage::

    python -m calm_models.plot RUN_DIR [--out curves.png] [--keys loss brier_lm] [--smooth 0.9]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calm_models.metrics import read_metrics

_TOKEN_KEYS = ("tokens", "tokens_seen", "tokens_processed")


def _default_keys(records: list[dict[str, Any]]) -> list[str]:
    present = list(dict.fromkeys(k for record in records for k in record))
    keys = [k for k in ("loss", "brier_lm") if k in present]
    return keys + [k for k in present if "accuracy" in k and not k.endswith("_se")]


def _ema(values: list[float], alpha: float) -> list[float]:
    return list(itertools.accumulate(values, lambda avg, v: alpha * avg + (1 - alpha) * v))


def _points(records: list[dict], split: str, key: str, xname: str, token_key: str | None, step_tokens: dict) -> list:
    """``(x, value)`` of ``key`` in the records of ``split``; ``x`` the step, or the tokens seen at that step."""
    points = []
    for r in records:
        if str(r.get("split", "train")) != split or not isinstance(r.get(key), (int, float)):
            continue
        x = r.get("step") if xname == "step" else r.get(token_key, step_tokens.get(r.get("step")))
        if x is not None:
            points.append((x, float(r[key])))
    return points


def plot_metrics(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    keys: Sequence[str] | None = None,
    smooth: float = 0.0,
) -> Path:
    """Draw the curves of ``run_dir/metrics.jsonl`` into a PNG (on the Agg backend: no display needed).

    One row of panels per metric, one line per split; the left column against the optimiser step and, when the
    records carry a token count (``tokens``, ``tokens_seen`` or ``tokens_processed``), the right one against tokens.

    Args:
        run_dir: Run directory (or a ``.jsonl`` file).
        out: Output image; default ``run_dir/metrics.png``.
        keys: Metrics to draw, one row each (default: ``loss``, ``brier_lm`` and the ``*accuracy*`` keys present).
        smooth: Exponential-moving-average factor in ``[0, 1)`` applied to the train split.

    Returns:
        The path of the image written.

    Raises:
        FileNotFoundError: Missing run directory or metrics file.
        ValueError: No record holds any of the requested keys, or a bad ``smooth``.
        ImportError: matplotlib is not installed (one line saying how to install it).

    Example:
        >>> import tempfile
        >>> from calm_models.metrics import MetricsLogger
        >>> run = tempfile.mkdtemp()
        >>> with MetricsLogger(run) as log:
        ...     for s in range(3):
        ...         log.log({"loss": 3.0 - s, "tokens": 64 * s}, step=s, split="train")
        >>> plot_metrics(run).name
        'metrics.png'
    """
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must lie in [0, 1), got {smooth}")
    run = Path(run_dir)
    if not run.exists():
        raise FileNotFoundError(f"run directory not found: {run}")
    records = read_metrics(run)
    keys = list(keys) if keys else _default_keys(records)
    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    if not keys:
        raise ValueError(f"no plottable metric in {run}: no record has loss, brier_lm or *accuracy")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        hint = "pip install matplotlib (or the project's [plot] extra)"
        raise ImportError(f"matplotlib is not installed: {hint}") from None

    token_key = next((k for k in _TOKEN_KEYS if any(k in r for r in records)), None)
    step_tokens = {r["step"]: r[token_key] for r in records if token_key and "step" in r and token_key in r}
    axes_x = ["step"] + (["tokens"] if token_key else [])
    splits = sorted({str(r.get("split", "train")) for r in records}, key=lambda s: (s != "train", s))
    fig, axes = plt.subplots(len(keys), len(axes_x), figsize=(6 * len(axes_x), 3.2 * len(keys)), squeeze=False)
    for row, key in enumerate(keys):
        title = "BrierLM" if key == "brier_lm" else "reconstruction accuracy" if "accuracy" in key else key
        for col, xname in enumerate(axes_x):
            ax = axes[row][col]
            for index, split in enumerate(splits):
                points = _points(records, split, key, xname, token_key, step_tokens)
                if not points:
                    continue
                xs, ys = zip(*points, strict=True)
                ys = _ema(list(ys), smooth if split == "train" else 0.0)
                ax.plot(xs, ys, label=split, color=f"C{index}", marker="o" if len(xs) < 30 else None, markersize=3)
            ax.set(xlabel=xname, ylabel=key, title=title)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    target = Path(out) if out is not None else (run if run.is_dir() else run.parent) / "metrics.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point on ``argv`` (default ``sys.argv[1:]``); returns 0, or 2 after a one-line error.

    Example:
        >>> main(["/nonexistent/run"])  # prints "error: run directory not found: ..." to stderr
        2
    """
    parser = argparse.ArgumentParser(
        prog="python -m calm_models.plot", description="Plot learning curves from metrics.jsonl."
    )
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output PNG (default RUN_DIR/metrics.png)")
    parser.add_argument("--keys", nargs="+", default=None, help="metrics to plot")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA factor for train curves")
    args = parser.parse_args(argv)
    try:
        path = plot_metrics(args.run_dir, args.out, keys=args.keys, smooth=args.smooth)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
