"""Wall-clock timing the way every figure of this project is measured: median of repeats."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Union

import torch


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2,
                   device: Union[str, torch.device] = "cpu") -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    On a CUDA ``device`` the stream is synchronized around every run, so the
    time is the kernels' and not just their launch.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
