"""tally.service.metrics: the one metrics implementation (the streaming
service's and the lookup server's), its text rendering and its endpoint."""
import asyncio
import math
import socket

import pytest

from tally.service.metrics import Metrics, seconds_since, serve_metrics, series


def declared():
    metrics = Metrics()
    metrics.declare("jobs_total", "counter", "Jobs done")
    metrics.declare("queue_depth", "gauge", "Jobs waiting")
    metrics.declare("job_seconds", "histogram", "Job duration", buckets=(1.0, 0.1))
    return metrics


def test_counters_and_gauges_render_per_label_set():
    metrics = declared()
    metrics.add("jobs_total", 2, queue="b", shard=1)
    metrics.add("jobs_total", 3, shard=1, queue="b")       # same series, labels in any order
    metrics.add("jobs_total", 1, queue="a", shard=1)
    metrics.set("queue_depth", 7)
    metrics.set("queue_depth", 4)
    metrics.set("undeclared", 1)                            # not rendered
    assert metrics.render().splitlines() == [
        "# HELP job_seconds Job duration", "# TYPE job_seconds histogram",
        "# HELP jobs_total Jobs done", "# TYPE jobs_total counter",
        'jobs_total{queue="a",shard="1"} 1', 'jobs_total{queue="b",shard="1"} 5',
        "# HELP queue_depth Jobs waiting", "# TYPE queue_depth gauge",
        "queue_depth 4"]


def test_histogram_buckets_are_cumulative_and_inclusive():
    metrics = declared()
    for seconds in (0.05, 0.1, 0.5, 1.0, 3.0):
        metrics.observe("job_seconds", seconds, queue="a")
    lines = [line for line in metrics.render().splitlines() if line.startswith("job_seconds_")]
    assert lines == ['job_seconds_bucket{queue="a",le="0.1"} 2',
                     'job_seconds_bucket{queue="a",le="1.0"} 4',
                     'job_seconds_bucket{queue="a",le="+Inf"} 5',
                     'job_seconds_sum{queue="a"} 4.65',
                     'job_seconds_count{queue="a"} 5']


def test_hot_path_keys_reach_the_same_series():
    metrics = declared()
    key = series("jobs_total", shard=1, queue="a")
    metrics.add_at(key, 1)
    metrics.add("jobs_total", 1, queue="a", shard=1)
    metrics.observe_at(series("job_seconds", queue="a"), 0.01)
    metrics.observe("job_seconds", 0.02, queue="a")
    text = metrics.render()
    assert 'jobs_total{queue="a",shard="1"} 2' in text
    assert 'job_seconds_count{queue="a"} 2' in text


def test_label_values_and_non_finite_numbers_are_escaped():
    metrics = declared()
    metrics.set("queue_depth", math.inf, queue='say "hi"\\\n')
    metrics.set("queue_depth", math.nan, queue="n")
    lines = metrics.render().splitlines()
    assert 'queue_depth{queue="say \\"hi\\"\\\\\\n"} +Inf' in lines
    assert 'queue_depth{queue="n"} NaN' in lines


def test_declare_checks_kinds_and_buckets():
    metrics = Metrics()
    with pytest.raises(ValueError, match="not one of"):
        metrics.declare("x", "summary", "?")
    with pytest.raises(ValueError, match="need them"):
        metrics.declare("x", "histogram", "?")
    with pytest.raises(ValueError, match="need them"):
        metrics.declare("x", "counter", "?", buckets=(1,))


def test_endpoint_serves_metrics_health_and_404():
    metrics = declared()
    refreshed = []

    def refresh():
        refreshed.append(True)
        metrics.set("queue_depth", len(refreshed))

    async def scenario():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = asyncio.ensure_future(serve_metrics(metrics, "127.0.0.1", port, refresh))
        try:
            for _ in range(100):                    # until it listens
                try:
                    answers = [await get(port, path) for path in ("/metrics", "/health", "/x")]
                    break
                except ConnectionRefusedError:
                    await asyncio.sleep(0.02)
        finally:
            server.cancel()
        return answers

    async def get(port, path):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = await reader.read()
        writer.close()
        return answer.decode()

    metrics_answer, health, missing = asyncio.run(scenario())
    assert metrics_answer.startswith("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4")
    assert metrics_answer.endswith("queue_depth 1\n") and refreshed == [True]
    assert health.startswith("HTTP/1.1 200 OK") and health.endswith('{"status": "ok"}')
    assert missing.startswith("HTTP/1.1 404 Not Found")


def test_seconds_since():
    import time
    assert 0 <= seconds_since(time.monotonic()) < 1
