"""Wall-clock timing the way every figure of this project is measured: median of repeats
(of a function, of functions in turn, of the inference of models and ensembles), and on a GPU
the device-only time of a call beside its eager time."""

from __future__ import annotations

import functools
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2,
                   device: Union[str, torch.device] = "cpu") -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    On a CUDA ``device`` each run is timed with CUDA events on the current
    stream, so the time is the kernels' and not their launch.
    """
    _warm(fn, repeats, warmup)
    if torch.device(device).type == "cuda":
        return _median_cuda_seconds(fn, repeats)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 2) -> List[float]:
    """Median wall time of each CPU function, the functions called in turn.

    Each round runs every function once, so a drift of the machine's speed
    during the measurement (another process, the heap's state) reaches all
    of them alike and their ratios stay fair, where timing one after the
    other would charge the drift to whichever ran during it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, own in zip(fns, times):
            start = time.perf_counter()
            fn()
            own.append(time.perf_counter() - start)
    return [statistics.median(own) for own in times]


def _warm(fn: Callable[[], object], repeats: int, warmup: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()


def _timed_calls(fn: Callable[[], object], repeats: int) -> List[tuple]:
    """``repeats`` calls of ``fn``, each between two CUDA events on the current stream (not synchronized)."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    return events


def _median_event_seconds(events: List[tuple]) -> float:
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3


def _median_cuda_seconds(fn: Callable[[], object], repeats: int) -> float:
    torch.cuda.synchronize()
    events = _timed_calls(fn, repeats)
    torch.cuda.synchronize()
    return _median_event_seconds(events)


@functools.lru_cache(maxsize=None)
def _sleep_cycles_per_second(device: int) -> float:
    """How many ``torch.cuda._sleep`` cycles one second of device time holds (measured once)."""
    with torch.cuda.device(device):
        torch.cuda._sleep(1_000_000)  # warm
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(20_000_000)
        end.record()
        end.synchronize()
        return 20_000_000 / (start.elapsed_time(end) / 1e3)


def device_median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> Optional[float]:
    """Median device time of ``fn()`` on the current CUDA device, without its host overhead.

    Every call is queued behind a busy kernel (``torch.cuda._sleep``) long enough to hide the host's
    enqueueing of all of them, so the CUDA events around each call see only its kernels running back
    to back: for a forward of ~50 us or less, eager timing measures validation and dispatch instead.
    Returns None when the busy kernel ran out before the calls were all queued even after growing it
    (``fn`` synchronizes with the host, so there is no device-only time to take).
    """
    _warm(fn, repeats, warmup)
    torch.cuda.synchronize()
    began = time.perf_counter()
    fn()
    host = time.perf_counter() - began  # the enqueue of one call (the device may still be running it)
    torch.cuda.synchronize()
    per_second = _sleep_cycles_per_second(torch.cuda.current_device())
    hide = 2 * host * repeats + 1e-3
    for _ in range(3):
        busy_done = torch.cuda.Event()
        torch.cuda._sleep(int(hide * per_second))
        busy_done.record()
        events = _timed_calls(fn, repeats)
        held = not busy_done.query()  # still busy: every call was queued before the device reached it
        torch.cuda.synchronize()
        if held:
            return _median_event_seconds(events)
        hide *= 4
    return None


def inference_latency(models: Dict[str, Sequence[nn.Module]], batch: torch.Tensor, repeats: int = 20,
                      warmup: int = 3) -> Dict[str, float]:
    """Median seconds of one forward of ``batch`` through each entry's models, one after another
    (an ensemble entry runs all of its members), measured in this one run."""
    device = batch.device
    out = {}
    for name, group in models.items():
        for m in group:
            m.eval()

        @torch.inference_mode()
        def forward(group=group):
            for m in group:
                m(batch)

        out[name] = median_seconds(forward, repeats, warmup, device)
    return out
