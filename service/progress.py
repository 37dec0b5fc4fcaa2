"""Progress bars of the long commands (bootstrap, training sets, the quick
starts), drawn by tqdm on stderr: redrawn in place on a terminal, a widget in
a notebook, and nothing at all when stderr is neither -- a CI log or a pipe
gets no bar (a line per redraw would fill it)."""
import sys

from tqdm.auto import tqdm


def progress_bar(unit, iterable=None, total=None, quiet=False, file=None, unit_scale=True,
                 **options):
    """A tqdm bar counting ``unit`` (the items of ``iterable``, if given;
    ``unit_scale``: 123k, not 123456); ``quiet`` hides it everywhere. Use it
    as a context manager, or iterate it: the end closes the bar (and ends
    its line)."""
    return tqdm(iterable, total=total, unit=unit, file=file or sys.stderr,
                disable=True if quiet else None, dynamic_ncols=True, unit_scale=unit_scale,
                **options)


def advance(bar, done, total, **postfix):
    """Move ``bar`` to ``done`` of ``total``: the progress callbacks report
    counts so far, tqdm takes increments (and throttles the redraws)."""
    bar.total = total
    if postfix:
        bar.set_postfix(postfix, refresh=False)
    bar.update(done - bar.n)


def bootstrap_bar(quiet=False, file=None):
    """A bar for a bootstrap's units, with its events, their rate and the
    bootstrap's own ETA (a unit's size varies, so tqdm's estimate would not do)."""
    return progress_bar("units", quiet=quiet, file=file, unit_scale=False,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} units [{elapsed}{postfix}]")


def bootstrap_progress(bar):
    """A bootstrap's ``progress(done, total, events, eta_s)`` callback moving ``bar``."""
    def update(done, total, events, eta_s):
        rate = events / max(bar.format_dict["elapsed"], 1e-9)
        advance(bar, done, total, events=f"{events:,}", rate=f"{rate:,.0f}/s",
                ETA="--" if eta_s is None else f"{eta_s:.1f} s")
    return update



def until_read(bar, n_messages):
    """An Ingestion's ``until``: moves ``bar`` to the messages read, and
    stops once ``n_messages`` are."""
    def done(ingestion):
        advance(bar, ingestion.stats.messages, n_messages)
        return ingestion.stats.messages >= n_messages
    return done
