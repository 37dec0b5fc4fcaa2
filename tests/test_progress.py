"""tally.service.progress: tqdm bars on a terminal, nothing elsewhere."""
import io

from tally.service.progress import (advance, bootstrap_bar, bootstrap_progress, progress_bar,
                                    until_read)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_draws_on_a_terminal_and_nothing_on_a_pipe():
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        with progress_bar("rows", file=stream) as bar:
            advance(bar, 40, 100)
            advance(bar, 100, 100)
        text = stream.getvalue()
        assert ("100/100" in text and "rows" in text) == drawn, text
        assert text == "" or drawn


def test_quiet_hides_the_bar_on_a_terminal_too():
    stream = Terminal()
    with bootstrap_bar(quiet=True, file=stream) as bar:
        bootstrap_progress(bar)(1, 2, 10, 1.0)
    assert stream.getvalue() == ""


def test_the_bootstrap_bar_shows_units_events_and_the_bootstraps_eta():
    stream = Terminal()
    with bootstrap_bar(file=stream) as bar:
        update = bootstrap_progress(bar)
        update(1, 4, 1_500, None)
        update(4, 4, 12_345, 0.0)
    last = stream.getvalue().split("\r")[-1]
    assert "4/4 units" in last and "events=12,345" in last and "ETA=0.0 s" in last, last


def test_until_read_moves_the_bar_and_stops_at_the_count():
    class Ingestion:
        class stats:
            messages = 0
    stream = Terminal()
    with progress_bar("events", file=stream) as bar:
        until = until_read(bar, 10)
        assert until(Ingestion) is False
        Ingestion.stats.messages = 10
        assert until(Ingestion) is True
        assert (bar.n, bar.total) == (10, 10)
