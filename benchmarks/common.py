"""What the benchmark scripts share (timing, progress, result files live in the package).

Benchmarks are scripts, never tests: they print a table and write JSON and
Markdown under benchmarks/results/.  Every speedup is a ratio of medians
measured in the same run, on the same shapes, dtype and thread count.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(ROOT))  # run from a checkout without installing

from freetickets_kernels.app.machine import machine_info  # noqa: E402,F401
from freetickets_kernels.app.progress import Progress  # noqa: E402
from freetickets_kernels.app.results import markdown_table, write_results  # noqa: E402,F401
from freetickets_kernels.app.timing import median_seconds  # noqa: E402,F401


def progress(items: Sequence, label: str):
    """Iterate ``items`` with a progress bar on stderr."""
    return Progress(items, label)


def run_suite(suite) -> None:
    """Run a suite of ``freetickets_kernels.app.bench`` as a script writing to benchmarks/results/."""
    import argparse

    parser = argparse.ArgumentParser(description=suite.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite.add_arguments(parser, os.path.join(ROOT, "results"))
    args = parser.parse_args()
    try:
        sys.exit(suite.run(args))
    except ValueError as exc:
        parser.error(str(exc))


def report(name: str, rows, columns, out_dir: str, notes: str) -> int:
    """Write ``name``.json and ``name``.md under ``out_dir``, print the table and where it went; exit status 0."""
    paths = write_results(name, rows, columns, out_dir, notes)
    print(markdown_table(rows, columns))
    print(f"\nwrote {paths['json']} and {paths['md']}")
    return 0
