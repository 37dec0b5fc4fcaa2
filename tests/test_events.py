"""The validity rules of tally.core.events: one set of rules for every path.

The stream (payloads), the bootstrap's archive reader (Parquet rows) and
training sets (tables) must refuse exactly the same events; each path is
checked here against a brute-force list of the events that break a rule.
"""
import msgpack
import numpy as np
import pyarrow as pa
import pytest

from tally.core import events as rules
from tally.core.archive import write_archive
from tally.core.definitions import Entity, Feature, FeatureView, Source
from tally.core.events import MAX_KEY_BYTES
from tally.core.snapshot import load

# small synthetic times: the range rules are tested apart, below
SOURCE = Source("reads", "reads", {"user": "string", "readtime": "float64", "ts": "int64"},
                earliest_event_time=-2**62, max_event_time_ahead=2**62)
VIEW = FeatureView("by_user", Entity("user", "string"), SOURCE,
                   [Feature("n", "count"), Feature("total", "sum", "readtime")])

# (user, ts, why it is refused or None)
ROWS = [("a", 1, None), ("", 2, "key"), ("b", 2**62 + 1, "time"), ("x" * (MAX_KEY_BYTES + 1), 3, "key"),
        ("x" * MAX_KEY_BYTES, 4, None), ("é" * 256, 5, "key"), ("c", -2**62, None),
        ("\ud800", 6, "key"), ("d", 2**62, None)]


# Arrow strings cannot hold a lone surrogate: tables test the other rows
TABLE_ROWS = [row for row in ROWS if row[0] != "\ud800"]


def _good(rows):
    return [(user, ts) for user, ts, why in rows if why is None]


def test_payloads_with_an_invalid_event_are_refused_with_the_reason():
    payloads = [msgpack.packb({"user": u, "readtime": 1.0, "ts": t}, unicode_errors="surrogatepass")
                for u, t, _ in ROWS]
    got = rules.decode_payloads(payloads, SOURCE, key_column="user", key_type="string")
    refused = {i: why for i, (_, _, why) in enumerate(ROWS) if why}
    assert [i for i, _ in got.rejects] == sorted(refused)
    for index, reason in got.rejects:
        # the msgpack decoder itself refuses the lone surrogate (not UTF-8)
        expected = {"key": ("entity key must be 1 to 511 bytes", "not valid utf-8"),
                    "time": ("event time 4611686018427387905 is outside",)}[refused[index]]
        assert any(text in reason for text in expected), reason
    assert list(zip(got.columns["user"].tolist(), got.columns["ts"].tolist())) == _good(ROWS)


def test_table_rows_that_break_a_rule_are_dropped_and_counted():
    table = pa.table({"user": [u for u, _, _ in TABLE_ROWS], "readtime": [1.0] * len(TABLE_ROWS),
                      "ts": [t for _, t, _ in TABLE_ROWS]})
    columns, dropped = rules.drop_invalid(rules.table_columns(table, SOURCE, ["user", "ts"]),
                                          SOURCE, "user", "string")
    assert list(zip(columns["user"].tolist(), columns["ts"].tolist())) == _good(TABLE_ROWS)
    assert sum(dropped.values()) == sum(1 for *_, why in TABLE_ROWS if why)


def test_null_times_and_keys_in_a_table_are_dropped():
    table = pa.table({"user": ["a", None, "b", "c"], "readtime": [1.0, 2.0, 3.0, 4.0],
                      "ts": pa.array([1, 2, None, 4], pa.int64())})
    columns, dropped = rules.drop_invalid(
        rules.table_columns(table, SOURCE, ["user", "readtime", "ts"]), SOURCE, "user", "string")
    assert columns["user"].tolist() == ["a", "c"]
    assert columns["ts"].dtype == np.int64 and columns["ts"].tolist() == [1, 4]
    assert dropped == {"field 'ts' is null": 1, "field 'user' is null": 1}


def test_the_archive_reader_refuses_unstorable_keys(tmp_path):
    """Once, an empty string key passed the archive path and the bootstrap's
    handover died with lmdb.BadValsizeError: the archive reader now applies
    the stream's rules."""
    from tally.service.history.bootstrap import read_archive_unit
    from tally.service.history.plan import plan_archive
    table = pa.table({"user": [u for u, _, _ in TABLE_ROWS], "readtime": [1.0] * len(TABLE_ROWS),
                      "ts": [t for _, t, _ in TABLE_ROWS]})
    write_archive(table, str(tmp_path / "archive"), events_before_ms=2**62 + 2)
    (unit,) = plan_archive(str(tmp_path / "archive"), readers=1, units_per_reader=1)
    report = read_archive_unit(VIEW, str(tmp_path / "archive"), unit, 1,
                               str(tmp_path / "unit.state"), 2**62 + 2)
    assert report["events"] == len(_good(TABLE_ROWS))
    assert report["rejected"] == len(TABLE_ROWS) - len(_good(TABLE_ROWS))
    arrays, meta = load(str(tmp_path / "unit.state"))
    keys = [k for k in arrays if k.startswith("0/index.")]
    assert keys, "the partition's state was saved"


@pytest.mark.parametrize("key_type", ["int64", "string"])
def test_valid_keys(key_type):
    if key_type == "int64":
        assert rules.valid_keys(np.array([1, -5, 0]), "int64").tolist() == [True] * 3
        assert rules.valid_keys(np.array([1.0, np.nan]), "int64").tolist() == [True, False]
    else:
        keys = np.array(["a", "", None, "é" * 255, "é" * 256], dtype=object)
        assert rules.valid_keys(keys, "string").tolist() == [True, False, False, True, False]


# --------------------------------------------------------------------------
# Plausible values: the defaults of a Source

DEFAULT = Source("plain", "plain", {"user": "int64", "readtime": "float64", "ts": "int64"})
NOW = 1_764_000_000_000                     # 2025-11-24


@pytest.mark.parametrize("event, reason", [
    # readtime +inf made sums +Infinity for ever (+inf then -inf served NaN)
    ({"user": 1, "readtime": float("inf"), "ts": NOW}, "field 'readtime' value inf is not a "
                                                       "finite number"),
    ({"user": 1, "readtime": float("-inf"), "ts": NOW}, "value -inf is not a finite number"),
    # year 3000 froze the entity's windows and moved _event_time
    ({"user": 1, "readtime": 1.0, "ts": 32_503_680_000_000}, "h ahead of the clock"),
    ({"user": 1, "readtime": 1.0, "ts": 2**62}, "h ahead of the clock"),
    # seconds, and negative times, were folded into lifetime sums
    ({"user": 1, "readtime": 1.0, "ts": NOW // 1000}, "a time in seconds? send milliseconds"),
    ({"user": 1, "readtime": 1.0, "ts": -5}, "before the source's earliest_event_time"),
])
def test_implausible_values_are_refused_with_the_reason(event, reason):
    got = rules.decode_payloads([msgpack.packb(event)], DEFAULT, now_ms=NOW)
    assert len(got.rejects) == 1 and reason in got.rejects[0][1], got.rejects
    assert got.n_events == 0


def test_plausible_values_pass_and_the_bounds_are_the_sources():
    events = [{"user": 1, "readtime": 1.0, "ts": NOW + 86_400_000},      # a day ahead: fine
              {"user": 1, "readtime": float("nan"), "ts": 100_000_000_000}]   # NaN is a null
    got = rules.decode_payloads([msgpack.packb(e) for e in events], DEFAULT, now_ms=NOW)
    assert got.rejects == [] and got.n_events == 2
    loose = Source("loose", "loose", {"user": "int64", "readtime": "float64", "ts": "int64"},
                   earliest_event_time=0, max_event_time_ahead="7d")
    late = {"user": 1, "readtime": 1.0, "ts": NOW + 3 * 86_400_000}
    assert rules.decode_payloads([msgpack.packb(late)], loose, now_ms=NOW).rejects == []
    table = pa.table({"user": [1, 2], "readtime": [float("inf"), 1.0], "ts": [NOW, NOW]})
    columns, dropped = rules.drop_invalid(
        rules.table_columns(table, DEFAULT, ["user", "readtime", "ts"]), DEFAULT, now_ms=NOW)
    assert columns["user"].tolist() == [2]
    assert list(dropped.values()) == [1]


def test_message_times_are_the_event_time_of_every_event_of_their_message():
    from tally.core.formats import encode_columns
    source = Source("s", "s", {"user": "int64", "x": "float64"}, timestamp_field="@event_time",
                    format="msgpack-columnar")
    payloads = [encode_columns({"user": np.array([1, 2]), "x": np.array([0.5, 1.5])},
                               "msgpack-columnar"),
                encode_columns({"user": np.array([3]), "x": np.array([2.5])}, "msgpack-columnar"),
                encode_columns({"user": np.array([4]), "x": np.array([3.5])}, "msgpack-columnar")]
    now = 1_732_780_800_000
    events = rules.decode_payloads(payloads, source, key_column="user", key_type="int64",
                                   now_ms=now, message_times={"@event_time":
                                                              np.array([now - 5, now - 1, 0])})
    assert events.columns["@event_time"].tolist() == [now - 5, now - 5, now - 1]
    assert events.columns["user"].tolist() == [1, 2, 3]
    assert events.rejects == [(2, "field '@event_time': the message has no event time (its "
                                  "producer set none)")]
    with pytest.raises(ValueError, match="message_times"):
        rules.decode_payloads(payloads, source)


def test_only_the_messages_times_may_begin_with_an_at_sign():
    from tally.core.definitions import DefinitionError
    with pytest.raises(DefinitionError, match="'@' are the message's own times"):
        Source("s", "s", {"user": "int64", "@ts": "int64"}, timestamp_field="@ts")
