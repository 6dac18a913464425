"""Render pytest-benchmark JSON files as one Markdown table (for the README and the docs).

Usage::

    python -m pytest benchmarks/ --benchmark-json=benchmarks/results/all.json
    python benchmarks/render.py benchmarks/results/all.json [--out docs/_generated/benchmarks.md]

Each row shows the benchmark name, the median time, and the throughput figures the benchmark
recorded in ``extra_info`` (tokens/s, vectors/s, positions/s, peak memory, ...).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_SKIP = {"load_average_1min", "cpu_s_median", "memory_cap_mib"}


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _fmt_value(value) -> str:
    if isinstance(value, float):
        if abs(value) >= 1e5:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def render(paths: list[Path]) -> str:
    """Markdown table of every benchmark in the given pytest-benchmark JSON files."""
    lines = []
    for path in paths:
        data = json.loads(path.read_text())
        machine = data.get("machine_info", {})
        cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
        lines.append(f"**{path.name}** ({cpu}, {data.get('datetime', '')[:10]})\n")
        lines.append("| benchmark | median | details |")
        lines.append("|---|---|---|")
        for bench in data.get("benchmarks", []):
            extra = ", ".join(
                f"{k}={_fmt_value(v)}"
                for k, v in bench.get("extra_info", {}).items()
                if k not in _SKIP and not isinstance(v, dict)
            )  # nested: raw data
            lines.append(f"| `{bench['name']}` | {_fmt_time(bench['stats']['median'])} | {extra} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    text = render(args.json)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
