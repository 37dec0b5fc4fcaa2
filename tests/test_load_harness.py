"""The load harness (``python -m tally.bench load``, issue 9): a test-sized run
against the session's broker, with its own ``tally serve`` and lookup server,
checked for what the report claims -- the rate it held, lookups that
succeeded, freshness that was measured, charts that are PNGs, and a scale
model whose arithmetic adds up."""
import json
import math

import numpy as np
import pytest

from tally.bench import load, scale_model

EVENTS_PER_S = 500
LOOKUPS_PER_S = 100
DURATION_S = 12
WARMUP_S = 2


@pytest.fixture(scope="module")
def report(pulsar_broker, tmp_path_factory):
    out = tmp_path_factory.mktemp("load") / "load.json"
    summary = load.run(argv=[
        "--pulsar", pulsar_broker.service_url, "--admin", pulsar_broker.admin_url,
        "--topic", "t-load-harness", "--events-per-s", str(EVENTS_PER_S),
        "--lookups-per-s", str(LOOKUPS_PER_S), "--entities", "20000",
        "--duration", str(DURATION_S), "--warmup", str(WARMUP_S), "--out", str(out)])
    return summary, json.loads(out.read_text()), out


pytestmark = pytest.mark.pulsar


@pytest.mark.timeout(240)
def test_the_event_rate_is_held_and_folded(report):
    _, document, _ = report
    overall, series = document["overall"], document["series"]
    assert len(series["t_s"]) == DURATION_S
    for name in ("events_sent_per_s", "events_folded_per_s", "backlog_messages",
                 "unfolded_events", "event_time_lag_s", "freshness_p50_ms",
                 "lookup_service_p99_ms", "service_cpu_percent", "service_rss_mb"):
        assert len(series[name]) == DURATION_S, name
    assert overall["produce_error"] is None
    assert overall["events_achieved_per_s"] == pytest.approx(EVENTS_PER_S, rel=0.05)
    assert sum(series["events_sent_per_s"]) == overall["events_sent"]
    assert overall["events_sent"] == pytest.approx(EVENTS_PER_S * DURATION_S, rel=0.02)
    # the service kept up: it folded about what was produced, with little lag
    assert overall["events_folded_per_s_mean"] == pytest.approx(EVENTS_PER_S, rel=0.25)
    assert overall["event_time_lag_s_max"] < 10
    assert overall["drain_s_after_load"] is not None
    # psutil saw the service process work
    assert overall["service_cpu_percent_mean"] > 0
    assert overall["service_rss_mb_max"] > 10


@pytest.mark.timeout(240)
def test_lookups_succeed_and_are_timed_from_their_schedule(report):
    _, document, _ = report
    lookups = document["overall"]["lookups_service"]
    steady_seconds = DURATION_S - WARMUP_S
    assert lookups["requests"] == pytest.approx(LOOKUPS_PER_S * steady_seconds, abs=2)
    assert lookups["errors"] == 0 and lookups["error_kinds"] == {}
    assert 0 < lookups["found_share"] <= 1           # Zipf users: the popular ones exist
    quantiles = [lookups[f"latency_ms_{q}"] for q in ("p50", "p99", "p999", "max")]
    assert all(math.isfinite(q) and q > 0 for q in quantiles)
    assert quantiles == sorted(quantiles)
    per_second = document["series"]["lookup_service_per_s"]
    assert per_second[WARMUP_S:] == [LOOKUPS_PER_S] * steady_seconds


@pytest.mark.timeout(240)
def test_freshness_is_measured(report):
    _, document, _ = report
    fresh = document["overall"]["freshness"]
    assert fresh["probes_sent"] == DURATION_S * 10            # one every 100 ms
    assert fresh["probes_unseen"] == 0
    assert fresh["poll_errors"] == 0
    assert 0 < fresh["ms_p50"] <= fresh["ms_p99"] <= fresh["ms_max"] < 10_000
    assert any(v is not None for v in document["series"]["freshness_p50_ms"])


@pytest.mark.timeout(240)
def test_the_chart_is_a_png(report):
    _, document, out = report
    png = out.with_suffix(".png")
    assert document["charts"] == [png.name]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt
    image = plt.imread(png)
    assert image.shape[0] > 400 and image.shape[1] > 300
    assert np.ptp(image) > 0                                  # not a blank canvas


@pytest.mark.timeout(240)
def test_sizes_are_measured_after_the_last_checkpoint(report):
    _, document, _ = report
    storage = document["storage"]
    assert storage["features"] == 2                           # SUM(readtime), COUNT(*)
    # every user folded has both a state slot and an online record
    assert storage["state_entities"] == storage["store_records"] > 100
    # a lifetime sum or count is 8 bytes per entity (README's table)
    assert storage["ram_bytes_per_entity_feature"] >= 8
    assert storage["snapshot_bytes_per_entity_feature"] == pytest.approx(8, abs=0.5)
    # service/record.py: 32-byte header, one 8-byte bitmap word, 8 bytes a feature
    assert storage["record_bytes"] == 32 + 8 + 2 * 8
    # LMDB adds the 8-byte key, its node header and page slack
    assert storage["record_bytes"] + 8 < storage["lmdb_bytes_per_record"] < 4 * 56


@pytest.mark.timeout(240)
def test_the_scale_model_adds_up(report):
    summary, document, _ = report
    model = document["scale_model"]
    a, m = model["assumptions"], model["measured"]
    rows = {row["quantity"]: row["value"] for row in model["rows"]}
    assert m["events_per_core"] == document["overall"]["events_per_core"] > 0
    # recompute the ingest cores independently
    peak = a["monthly_active_users"] * a["events_per_mau_per_day"] / 86_400 * a["peak_to_average"]
    seconds_per_event = (1 / m["events_per_core"] + (a["features_per_user"] - 2)
                         * a["fold_ns_per_feature_event"] * 1e-9)
    cores = math.ceil(peak * seconds_per_event / a["cpu_utilisation_target"])
    assert rows["ingest cores (tally serve)"] == cores
    assert rows["topic partitions"] >= 2 * cores
    # and the state memory
    views = math.ceil(a["features_per_user"] / a["features_per_view"])
    per_user = (a["features_per_user"] * m["ram_bytes_per_entity_feature"]
                + views * m["ram_bytes_per_entity_view"])
    assert rows["state memory, all partitions"] == pytest.approx(
        a["monthly_active_users"] * per_user / 2**30)
    assert rows["Aerospike records"] == a["monthly_active_users"] * views
    table = scale_model.markdown(model)
    assert table.count("\n| ") == len(model["rows"])
    assert summary["out"].endswith("load.json")


def test_the_scale_model_refuses_missing_measurements():
    with pytest.raises(ValueError, match="lookups_per_core"):
        scale_model.build({"events_per_core": 1000, "features_measured": 2})
