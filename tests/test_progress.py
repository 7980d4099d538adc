"""The progress bar: redraws on a terminal, a line a minute and a final line in a log file."""

import io

import freetickets_kernels.app.progress as progress_module
from freetickets_kernels.app.progress import Progress


class FakeClock:
    """perf_counter that reads `now`; `ticking(items)` advances it `step` seconds per item."""

    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self):
        return self.now

    def ticking(self, items):
        for item in items:
            self.now += self.step
            yield item


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run(stream, items, step, monkeypatch, **kwargs):
    clock = FakeClock(step)
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    assert list(Progress(clock.ticking(items), "job", total=len(items), stream=stream, **kwargs)) == list(items)
    return stream.getvalue()


def test_log_file_gets_a_line_a_minute_and_the_final_line(monkeypatch):
    # 25 s per item: a line when the 3rd and the 6th start (over 60 s since the last), then the final one
    lines = run(io.StringIO(), range(7), 25.0, monkeypatch).splitlines()
    assert [line.split("]")[1].split()[0] for line in lines] == ["2/7", "5/7", "7/7"]
    assert all("\r" not in line for line in lines)
    assert lines[0] == "job [#####               ] 2/7 eta  188s "
    assert lines[-1] == "job [####################] 7/7 in 175s "


def test_quick_run_logs_the_final_line_only(monkeypatch):
    assert run(io.StringIO(), range(6), 0.01, monkeypatch) == "job [####################] 6/6 in 0s \n"


def test_terminal_redraws_in_place(monkeypatch):
    text = run(Terminal(), range(3), 1.0, monkeypatch)
    assert text.count("\n") == 1 and text.endswith("\n")
    assert [part.split("]")[1].split()[0] for part in text.strip().split("\r") if part] == ["0/3", "1/3", "2/3", "3/3"]


def test_disabled_prints_nothing(monkeypatch):
    assert run(io.StringIO(), range(3), 100.0, monkeypatch, enabled=False) == ""
