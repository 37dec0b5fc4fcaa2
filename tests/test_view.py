"""A whole view's state (filters, windows, last_n) against pandas, plus merge
and snapshot of the state through the snapshot container."""
import numpy as np
import pandas as pd
import pytest

from tally.core import snapshot
from tally.core.view import EVENT_TIME, ViewState
from tally.service.examples.reading import user_reading_7d as VIEW

HOUR = 3_600_000
START = 1_732_780_800_000


def make_events(n=60_000, users=300, seed=0):
    rng = np.random.default_rng(seed)
    ts = START + np.sort(rng.integers(0, 20 * 24 * HOUR, n))
    return {"user": rng.integers(0, users, n), "article": rng.integers(0, 1000, n),
            "readtime": np.round(rng.exponential(50, n) - 5, 2), "ts": ts}


def apply_in_batches(state, events, batch=7_000):
    for start in range(0, len(events["ts"]), batch):
        state.apply({k: v[start:start + batch] for k, v in events.items()})


def expected_at(events, as_of):
    """The view's features by their definition: hourly tiles, 168 in the window,
    readtime > 0 for all, >= 60 for long reads."""
    df = pd.DataFrame(events)
    current = as_of // HOUR
    epoch = df["ts"] // HOUR
    in_window = df[(epoch > current - 168) & (epoch <= current) & (df["readtime"] > 0)]
    grouped = in_window.groupby("user")
    result = pd.DataFrame({
        "readtime_7d": grouped["readtime"].sum(),
        "reads_7d": grouped.size(),
        "long_reads_7d": in_window[in_window["readtime"] >= 60].groupby("user").size(),
        "recent_articles": pd.Series(
            {user: g.sort_values("ts", kind="stable")["article"].iloc[::-1][:10]
             .tolist() for user, g in grouped}, dtype=object)})
    return result.reindex(np.unique(df["user"])).fillna(
        {"readtime_7d": 0.0, "reads_7d": 0, "long_reads_7d": 0})


def check_state(state, events, as_of):
    users = np.unique(events["user"])
    got = state.read_keys(users, as_of)
    expected = expected_at(events, as_of)
    np.testing.assert_allclose(got["readtime_7d"][0], expected["readtime_7d"], rtol=1e-9)
    np.testing.assert_array_equal(got["reads_7d"][0], expected["reads_7d"])
    np.testing.assert_array_equal(got["long_reads_7d"][0], expected["long_reads_7d"])
    for user, articles, want in zip(users, got["recent_articles"][0],
                                    expected["recent_articles"]):
        assert articles == (want if isinstance(want, list) else []), user
        assert all(type(a) is int for a in articles), user     # int64 ids stay ints
    assert got[EVENT_TIME][1].all()


@pytest.mark.parametrize("days_after", [0, 3, 8])
def test_filtered_windowed_view_equals_pandas(days_after):
    events = make_events()
    state = ViewState(VIEW)
    apply_in_batches(state, events)
    as_of = int(events["ts"].max()) + days_after * 24 * HOUR
    check_state(state, events, as_of)


def test_merge_of_partitions_of_history_equals_whole():
    events = make_events(seed=1)
    cut = len(events["ts"]) // 3
    first, second = ViewState(VIEW), ViewState(VIEW)
    apply_in_batches(first, {k: v[:cut] for k, v in events.items()})
    apply_in_batches(second, {k: v[cut:] for k, v in events.items()})
    first.merge(second)
    check_state(first, events, int(events["ts"].max()))


def test_snapshot_round_trip_restores_the_same_state(tmp_path):
    events = make_events(seed=2)
    state = ViewState(VIEW)
    apply_in_batches(state, events)
    snapshot.save(tmp_path / "view.snap", state.export_arrays(), {"params": state.describe()})
    arrays, meta = snapshot.load(tmp_path / "view.snap")
    restored = ViewState.from_arrays(VIEW, meta["params"], arrays)
    check_state(restored, events, int(events["ts"].max()))
    with pytest.raises(ValueError, match="other feature definitions"):
        ViewState.from_arrays(VIEW, {**meta["params"], "reads_7d": {}}, arrays)
