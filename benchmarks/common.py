"""Helpers shared by the benchmark scripts: timing, machine info, result files.

Benchmarks are scripts, never tests: they print a table and write JSON and
Markdown under benchmarks/results/.  Every speedup is a ratio of medians
measured in the same run, on the same shapes, dtype and thread count.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Sequence

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(ROOT))  # run from a checkout without installing

from freetickets_kernels.cli import machine_info  # noqa: E402


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def progress(items: Sequence, label: str):
    """Iterate ``items`` printing a one-line progress bar to stderr."""
    total = len(items)
    start = time.perf_counter()
    for i, item in enumerate(items):
        elapsed = time.perf_counter() - start
        eta = elapsed / i * (total - i) if i else 0.0
        bar = "#" * (20 * i // max(total, 1))
        print(f"\r{label} [{bar:<20}] {i}/{total} eta {eta:5.0f}s", end="", file=sys.stderr, flush=True)
        yield item
    print(f"\r{label} [{'#' * 20}] {total}/{total} in {time.perf_counter() - start:.0f}s", file=sys.stderr)


def markdown_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: List[Dict[str, object]], columns: List[str], out_dir: str,
                  notes: str = "") -> Dict[str, str]:
    """Write ``name``.json and ``name``.md atomically; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    info = machine_info()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    payload = {"benchmark": name, "date": stamp, "machine": info, "rows": rows, "notes": notes}
    md = [f"# {name}", "", f"Measured {stamp}.", ""]
    md += [f"- {k}: {v}" for k, v in info.items()]
    md += ["", notes, "", markdown_table(rows, columns), ""]
    paths = {}
    for ext, text in (("json", json.dumps(payload, indent=2)), ("md", "\n".join(md))):
        path = os.path.join(out_dir, f"{name}.{ext}")
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        paths[ext] = path
    return paths
