"""A dependency-free progress bar on stderr, shared by training and benchmarks."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Optional, Sized


class Progress:
    """Wrap an iterable and redraw ``label [#####     ] i/n eta Ns  postfix`` on stderr.

    ``enabled=False`` (other ranks, ``--quiet``) makes it a plain pass-through.
    """

    def __init__(self, items: Iterable, label: str, total: Optional[int] = None, enabled: bool = True,
                 stream=None, log_every: float = 60.0) -> None:
        self.items = items
        self.label = label
        self.total = total if total is not None else (len(items) if isinstance(items, Sized) else 0)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.postfix = ""
        self._start = self._drawn = time.perf_counter()
        # a terminal gets at most ~10 redraws a second; a log file a line a minute
        # (a 20-minute benchmark must not look hung) and the final line
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.1 if self.live else log_every

    def set_postfix(self, text: str) -> None:
        self.postfix = text

    def _draw(self, done: int, final: bool = False) -> None:
        elapsed = time.perf_counter() - self._start
        total = max(self.total, 1)
        bar = "#" * (20 * min(done, total) // total)
        if final:
            tail = f"in {elapsed:.0f}s"
        else:
            tail = f"eta {elapsed / done * (self.total - done):4.0f}s" if done else "eta    ?s"
        text = f"{chr(13) if self.live else ''}{self.label} [{bar:<20}] {done}/{self.total} {tail} {self.postfix}"
        print(text, end="\n" if final or not self.live else "", file=self.stream, flush=True)

    def __iter__(self):
        self._start = self._drawn = time.perf_counter()
        done = 0
        for item in self.items:
            now = time.perf_counter()
            if self.enabled and ((self.live and done == 0) or now - self._drawn > self.every):
                self._drawn = now
                self._draw(done)
            yield item
            done += 1
        if self.enabled:
            self._draw(done, final=True)
