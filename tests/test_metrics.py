"""tally.service.metrics: the one metrics implementation (the streaming
service's and the lookup server's), exposed through prometheus_client, and
its endpoint. The expected texts are written out by hand from the exposition
formats' rules."""
import asyncio
import math
import socket

import pytest

from tally.service.metrics import (Metrics, OnScrape, exposition, scrape_registry,
                                   seconds_since, serve_metrics, series)


def declared():
    metrics = Metrics()
    metrics.declare("jobs_total", "counter", "Jobs done")
    metrics.declare("queue_depth", "gauge", "Jobs waiting")
    metrics.declare("job_seconds", "histogram", "Job duration", buckets=(1.0, 0.1))
    return metrics


def text_of(metrics, accept=""):
    """The scrape of ``metrics`` alone (no process metrics), as text."""
    body, _ = exposition(metrics, accept)
    return body.decode()


def test_counters_and_gauges_render_per_label_set():
    metrics = declared()
    metrics.add("jobs_total", 2, queue="b", shard=1)
    metrics.add("jobs_total", 3, shard=1, queue="b")       # same series, labels in any order
    metrics.add("jobs_total", 1, queue="a", shard=1)
    metrics.set("queue_depth", 7)
    metrics.set("queue_depth", 4)
    metrics.set("undeclared", 1)                            # not rendered
    assert text_of(metrics).splitlines() == [
        "# HELP job_seconds Job duration", "# TYPE job_seconds histogram",
        "# HELP jobs_total Jobs done", "# TYPE jobs_total counter",
        'jobs_total{queue="a",shard="1"} 1.0', 'jobs_total{queue="b",shard="1"} 5.0',
        "# HELP queue_depth Jobs waiting", "# TYPE queue_depth gauge",
        "queue_depth 4.0"]


def test_histogram_buckets_are_cumulative_and_inclusive():
    metrics = declared()
    for seconds in (0.05, 0.1, 0.5, 1.0, 3.0):
        metrics.observe("job_seconds", seconds, queue="a")
    lines = [line for line in text_of(metrics).splitlines() if line.startswith("job_seconds_")]
    assert lines == ['job_seconds_bucket{le="0.1",queue="a"} 2.0',
                     'job_seconds_bucket{le="1.0",queue="a"} 4.0',
                     'job_seconds_bucket{le="+Inf",queue="a"} 5.0',
                     'job_seconds_count{queue="a"} 5.0',
                     'job_seconds_sum{queue="a"} 4.65']


def test_hot_path_keys_reach_the_same_series():
    metrics = declared()
    key = series("jobs_total", shard=1, queue="a")
    metrics.add_at(key, 1)
    metrics.add("jobs_total", 1, queue="a", shard=1)
    metrics.observe_at(series("job_seconds", queue="a"), 0.01)
    metrics.observe("job_seconds", 0.02, queue="a")
    text = text_of(metrics)
    assert 'jobs_total{queue="a",shard="1"} 2.0' in text
    assert 'job_seconds_count{queue="a"} 2.0' in text


def test_label_values_and_non_finite_numbers_are_escaped():
    metrics = declared()
    metrics.set("queue_depth", math.inf, queue='say "hi"\\\n')
    metrics.set("queue_depth", math.nan, queue="n")
    lines = text_of(metrics).splitlines()
    assert 'queue_depth{queue="say \\"hi\\"\\\\\\n"} +Inf' in lines
    assert 'queue_depth{queue="n"} NaN' in lines


def test_openmetrics_when_the_scraper_asks():
    metrics = declared()
    metrics.add("jobs_total", 2, queue="a")
    body, kind = exposition(metrics, "application/openmetrics-text; version=1.0.0")
    lines = body.decode().splitlines()
    assert kind.startswith("application/openmetrics-text; version=1.0.0")
    assert "# TYPE jobs counter" in lines and 'jobs_total{queue="a"} 2.0' in lines
    assert lines[-1] == "# EOF"
    assert exposition(metrics, "text/html")[1] == "text/plain; version=0.0.4; charset=utf-8"


def test_declare_checks_kinds_buckets_and_counter_names():
    metrics = Metrics()
    with pytest.raises(ValueError, match="not one of"):
        metrics.declare("x", "summary", "?")
    with pytest.raises(ValueError, match="need them"):
        metrics.declare("x", "histogram", "?")
    with pytest.raises(ValueError, match="need them"):
        metrics.declare("x_total", "counter", "?", buckets=(1,))
    with pytest.raises(ValueError, match="_total"):
        metrics.declare("jobs", "counter", "?")


def test_on_scrape_builds_the_metrics_at_each_scrape():
    built = []

    def build():
        metrics = declared()
        built.append(True)
        metrics.set("queue_depth", len(built))
        return metrics
    registry = scrape_registry(OnScrape(build))
    assert built == []                              # registering scrapes nothing
    first, second = (exposition(registry)[0].decode() for _ in range(2))
    assert "\nqueue_depth 1.0\n" in first and "\nqueue_depth 2.0\n" in second


def test_the_process_metrics_come_along():
    text = exposition(scrape_registry(declared()))[0].decode()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "python_gc_collections_total", "python_info", "# TYPE queue_depth gauge"):
        assert name in text, name


def test_endpoint_serves_metrics_health_and_404():
    metrics = declared()
    metrics.set("queue_depth", 1)

    async def scenario():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = asyncio.ensure_future(serve_metrics(scrape_registry(metrics), "127.0.0.1",
                                                     port))
        try:
            for _ in range(100):                    # until it listens
                try:
                    answers = [await get(port, path) for path in ("/metrics", "/health", "/x")]
                    break
                except ConnectionRefusedError:
                    await asyncio.sleep(0.02)
            answers.append(await get(port, "/metrics", "Accept: application/openmetrics-text"))
        finally:
            server.cancel()
        return answers

    async def get(port, path, *headers):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write("\r\n".join((f"GET {path} HTTP/1.1", "Host: x") + headers + ("", ""))
                     .encode())
        answer = await reader.read()
        writer.close()
        return answer.decode()

    metrics_answer, health, missing, openmetrics = asyncio.run(scenario())
    assert metrics_answer.startswith("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4")
    assert "\r\n\r\n" in metrics_answer and "\nqueue_depth 1.0\n" in metrics_answer
    head, body = metrics_answer.split("\r\n\r\n", 1)
    assert f"Content-Length: {len(body.encode())}\r\n" in head
    assert health.startswith("HTTP/1.1 200 OK") and health.endswith('{"status": "ok"}')
    assert missing.startswith("HTTP/1.1 404 Not Found")
    assert "Content-Type: application/openmetrics-text" in openmetrics
    assert openmetrics.endswith("# EOF\n")


def test_seconds_since():
    import time
    assert 0 <= seconds_since(time.monotonic()) < 1
