"""layerpack/progress.py: on a terminal a bar, elsewhere periodic plain lines, with --quiet nothing.
The lines are driven by an injected clock (no sleeping, no timing)."""
import io

from layerpack.progress import LineProgress, progress_bar


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_lines_come_at_most_every_interval_and_close_with_a_done_line():
    clock, out = FakeClock(), io.StringIO()
    p = LineProgress(4000, "eval", "tok", interval=10, stream=out, clock=clock)
    for _ in range(3):           # 3 updates within the first 10 s: silent
        clock.t += 3
        p.update(500)
    clock.t += 3                 # 12 s: one line, with the share done and an estimate of what is left
    p.update(500)
    clock.t += 1
    p.update(500)                # 1 s later: nothing
    p.close()
    assert out.getvalue().splitlines() == [
        "eval: 2000/4000 tok (50%), 12 s elapsed, ~12 s left",
        "eval: done, 2500/4000 tok (62%), 13 s elapsed",
    ]


def test_bytes_are_shown_in_binary_units_with_the_current_item():
    clock, out = FakeClock(), io.StringIO()
    p = LineProgress(100 * 2**20, "convert", "B", interval=0, stream=out, clock=clock)
    p.set_description("block.003")
    clock.t += 150
    p.update(25 * 2**20)
    assert out.getvalue() == "convert block.003: 25.0 MiB of 100.0 MiB (25%), 2 min 30 s elapsed, ~7 min 30 s left\n"


def test_a_short_run_prints_nothing():
    out = io.StringIO()
    p = LineProgress(10, "verify", "B", interval=10, stream=out, clock=FakeClock())
    p.update(10)
    p.close()
    assert out.getvalue() == ""


def test_progress_bar_picks_lines_off_a_terminal_and_nothing_when_quiet(monkeypatch, capsys):
    monkeypatch.setenv("LAYERPACK_PROGRESS_INTERVAL", "0")
    with progress_bar(4, "calibrate", quiet=False, unit="unit") as bar:   # pytest's stderr is not a terminal
        assert isinstance(bar, LineProgress)
        bar.update(1)
    assert capsys.readouterr().err.splitlines()[0].startswith("calibrate: 1/4 unit (25%)")
    with progress_bar(4, "calibrate", quiet=True) as bar:
        bar.update(1)
    assert capsys.readouterr().err == ""


def test_no_done_line_when_the_work_fails(monkeypatch, capsys):
    monkeypatch.setenv("LAYERPACK_PROGRESS_INTERVAL", "0")
    try:
        with progress_bar(4, "eval", quiet=False, unit="tok") as bar:
            bar.update(1)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    err = capsys.readouterr().err
    assert "eval: 1/4 tok" in err and "done" not in err
