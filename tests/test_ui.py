"""``tally ui``, the read-only web UI, against the talk's model applied to a
registry and a store written with the store API (``tally.service.ui.demo``),
and a real metrics endpoint (``tally.service.metrics.serve_metrics``).

Pages are checked in headless Chromium (marker ``browser``: Debian's
``chromium`` driven by Playwright; skipped, saying why, without them):
their content against pandas over the demo's events, and that no page logs
a console error or fails a request. The HTTP contract (token, read-only,
headers) and the parts under the pages (metrics parsing and rates, the
lineage graph, the rollback target, key listing) are checked without a
browser.
"""
import asyncio
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest

from tally.service.metrics import (Metrics, exposition, scrape_registry, serve_metrics,
                                   service_metrics)
from tally.service.registry import Registry
from tally.service.store.lmdb import LmdbStore
from tally.service.ui import demo
from tally.service.ui.lineage import around, lineage_graph
from tally.service.ui.metrics import MetricsHistory, parse_prometheus, per_view
from tally.service.ui.server import UiServer, ui_in_background

TOKEN = "s3cret-token"


# ---- fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    where = tmp_path_factory.mktemp("ui")
    built = demo.build(str(where / "registry.db"), str(where / "store"))
    built["registry"], built["store"] = str(where / "registry.db"), str(where / "store")
    return built


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def service_endpoint():
    """The streaming service's metrics as `tally serve` exposes them: two
    partitions of user_history@v2 (the worst freshness 0.75 s, lag 2.5 s)."""
    metrics = service_metrics()
    for partition, freshness, lag in ((0, 0.25, 1.5), (1, 0.75, 2.5)):
        labels = {"view": "user_history", "version": 2, "partition": partition}
        metrics.set("tally_events_total", 1000 * (partition + 1), **labels)
        metrics.set("tally_freshness_seconds", freshness, **labels)
        metrics.set("tally_event_time_lag_seconds", lag, **labels)
    port = free_port()
    loop = asyncio.new_event_loop()
    task = loop.create_task(serve_metrics(scrape_registry(metrics), "127.0.0.1", port))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{port}", metrics

    async def stop():
        task.cancel()
        await asyncio.wait([task])
    asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def ui(built, service_endpoint):
    history = MetricsHistory(service_endpoint[0], interval=0.2)
    with ui_in_background(UiServer(built["registry"], built["store"], history,
                                   port=0)) as server:
        yield server


@pytest.fixture(scope="module")
def guarded(built):
    with ui_in_background(UiServer(built["registry"], built["store"], port=0,
                                   token=TOKEN)) as server:
        yield server


def get(server, path, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    return response, body


# ---- the oracle: pandas over the demo's events ------------------------------------------

def reads_frame(built):
    return pd.DataFrame({k: built["reads"][k] for k in ("user", "article", "readtime", "ts",
                                                          "content_length")})


def per_user(built):
    return reads_frame(built).groupby("user").agg(total_readtime=("readtime", "sum"),
                                                  reads=("readtime", "size"),
                                                  avg_length=("content_length", "mean"))


# ---- the browser ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; scripts/test.sh does)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright for Python is not installed "
                                   "(pip install -e .[test])")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


class Visit:
    """A page loaded in Chromium, with everything that went wrong on the way."""

    def __init__(self, browser, url):
        self.problems = []
        self.page = browser.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(
            f"console: {m.text}"))
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url}"))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(
            f"{r.status}: {r.url}"))
        self.page.goto(url)

    def text(self, selector):
        return self.page.locator(selector).inner_text()

    def cells(self, table_selector):
        """{first cell: second cell} of a table's rows."""
        rows = self.page.locator(f"{table_selector} tbody tr").all()
        return {r.locator("td").nth(0).inner_text(): r.locator("td").nth(1).inner_text()
                for r in rows}

    def close(self):
        self.page.close()
        assert self.problems == []


@pytest.fixture
def visit(browser, ui):
    opened = []

    def open_page(path):
        opened.append(Visit(browser, ui.url.rstrip("/") + path))
        return opened[-1]
    yield open_page
    for page in opened:
        page.close()


@pytest.mark.browser
def test_search_finds_definitions_by_name_feature_tag_and_owner(visit):
    everything = visit("/")
    names = everything.page.locator("table.results tbody tr td:nth-child(2)").all_inner_texts()
    assert sorted(names) == sorted(["user_history@v2", "user_taste@v1", "article_info@v1",
                                    "recommend@v1", "read_events@v1", "articles@v1",
                                    "user@v1", "article@v1"])
    by_feature = visit("/?q=avg_len")              # a view's feature, a service's column
    assert by_feature.cells("table.results") == {"view": "user_taste@v1",
                                                  "service": "recommend@v1"}
    assert by_feature.page.locator("table.results td:nth-child(7)").all_inner_texts() == \
        ["avg_length", "avg_length"]
    by_owner = visit("/?owner=newsroom")
    assert by_owner.page.locator("table.results tbody tr").count() == 1
    assert "article_info" in by_owner.text("table.results")
    by_kind = visit("/?kind=entity")
    assert by_kind.page.locator("table.results tbody tr").count() == 2


@pytest.mark.browser
def test_a_views_page_shows_features_types_sql_versions_and_deployments(visit):
    page = visit("/view/user_history?a=1&b=2")
    features = page.page.locator("table.features tbody tr").all()
    rows = [[c.inner_text() for c in r.locator("td").all()] for r in features]
    assert rows == [
        ["last_5_articles", "last_n(article, 5) lifetime", "lifetime", "", "list<int64>",
         "list<item: int64>"],
        ["total_readtime", "sum(readtime) lifetime", "lifetime", "", "float64", "double"],
        ["reads", "count(*) lifetime", "lifetime", "", "int64", "int64"]]
    assert "COUNT(*) AS reads" in page.text("pre.sql")
    versions = page.cells("table.versions")
    assert set(versions) == {"v1 rollback target", "v2"}
    assert "would make v1 current" in page.text("#versions")
    diff = page.page.locator("ul.diff li").all_inner_texts()
    assert "+ features.reads: count(*) lifetime" in diff
    events = page.page.locator("table.changes tbody tr td:nth-child(4)").all_inner_texts()
    assert events == ["promoted", "retired", "created", "promoted", "created"]


@pytest.mark.browser
def test_derived_and_joined_features_have_their_types(visit):
    page = visit("/view/user_taste")
    types = {r.locator("td").nth(0).inner_text(): (r.locator("td").nth(4).inner_text(),
                                                  r.locator("td").nth(5).inner_text())
             for r in page.page.locator("table.features tbody tr").all()}
    assert types == {"categories": ("top_k<string>",
                                    "list<item: struct<value: string, count: int64>>"),
                     "avg_length": ("float64", "double"),
                     "top_category": ("string", "string"),
                     "reading_diversity": ("float64", "double")}
    assert "articles on article = article" in page.text("dl")


@pytest.mark.browser
def test_online_values_are_the_lookup_paths_and_match_pandas(visit, built):
    expected = per_user(built)
    user = int(expected.index[5])
    page = visit(f"/view/user_history?key={user}")
    record = page.cells("#online table.record")
    assert float(record["total_readtime"]) == pytest.approx(expected.total_readtime[user])
    assert int(record["reads"]) == expected.reads[user]
    assert int(record["_view_version"]) == 2
    missing = visit("/view/user_history?key=999999")
    assert "no record for 999999" in missing.text("#online")
    bad = visit("/view/user_history?key=abc")
    assert "int64 keys" in bad.text("#online .error")


@pytest.mark.browser
def test_a_feature_services_vector_has_its_computed_columns(visit, built):
    expected = per_user(built)
    user = int(expected.index[3])
    frame = reads_frame(built)
    mine = frame[frame.user == user].sort_values("ts", kind="stable")
    article = int(mine.article.iloc[-1])                 # the one just read
    page = visit(f"/service/recommend?user={user}&article={article}")
    vector = page.cells("#online table.record")
    assert float(vector["total_readtime"]) == pytest.approx(expected.total_readtime[user])
    assert float(vector["avg_length"]) == pytest.approx(expected.avg_length[user])
    category = built["articles"]["category"][article]
    assert vector["article_category"] == f'"{category}"'
    assert int(vector["current_article"]) == article
    assert int(vector["just_read"]) == 1
    columns = page.page.locator("table.features tbody tr td:nth-child(1)").all_inner_texts()
    assert columns[-3:] == ["current_article", "in_top_category", "just_read"]


@pytest.mark.browser
def test_the_distribution_is_numpys_histogram_of_every_entity(visit, built):
    expected = per_user(built).total_readtime.to_numpy()
    page = visit("/view/user_history?feature=total_readtime&n=10000#distribution")
    bars = page.page.locator("#distribution rect.bar").all()
    counts = [int(bar.get_attribute("data-count")) for bar in bars]
    assert counts == np.histogram(expected, bins=20)[0].tolist()


@pytest.mark.browser
def test_freshness_and_lag_come_from_the_services_metrics(visit, ui):
    deadline = 50
    while len(ui.history.samples) < 2 and deadline:      # two scrapes make a rate
        threading.Event().wait(0.2)
        deadline -= 1
    page = visit("/view/user_history#freshness")
    numbers = page.page.locator("#freshness dd").all_inner_texts()
    assert numbers[:2] == ["0.750", "2.500"]          # the worst partition's
    assert page.page.locator("#freshness svg").count() == 3


@pytest.mark.browser
def test_lineage_is_a_picture_both_ways_with_joins(visit):
    whole = visit("/lineage")
    titles = set(whole.page.locator("svg .node title").all_text_contents())
    assert {"topic:read_events", "topic:articles", "source:articles", "view:user_taste",
            "feature:user_taste.top_category", "service:recommend"} <= titles
    assert whole.page.locator("svg path.edge.join").count() == 1
    source = visit("/source/articles")
    titles = set(source.page.locator("#lineage svg .node title").all_text_contents())
    # downstream: the view joining it and the one keyed by it, their features, the service
    assert {"topic:articles", "view:user_taste", "view:article_info",
            "feature:user_taste.avg_length", "service:recommend"} <= titles
    assert "source:read_events" not in titles         # another input of user_taste
    readers = source.page.locator("main table").nth(1).locator("td:nth-child(1)")
    assert set(readers.all_inner_texts()) == {    # derived ones read what their inputs read
        "user_taste.categories", "user_taste.avg_length", "user_taste.top_category",
        "user_taste.reading_diversity", "article_info.category", "article_info.content_length"}
    page = visit("/view/user_taste")
    page.page.locator('#lineage svg a[href="/source/articles"]').click()   # boxes are links
    page.page.wait_for_url("**/source/articles")


@pytest.mark.browser
def test_entity_and_source_pages(visit):
    entity = visit("/entity/user")
    assert "int64" in entity.text("dl")
    assert set(entity.page.locator("table tbody td:nth-child(1)").all_inner_texts()) == \
        {"user_history@v2", "user_taste@v1"}
    source = visit("/source/read_events")
    assert source.cells("section table")["readtime"] == "float64"


# ---- HTTP: the token, read-only, headers -------------------------------------------------

def test_pages_need_the_token_which_a_browser_keeps_in_a_cookie(guarded):
    response, _ = get(guarded, "/view/user_history")
    assert response.status == 401
    assert get(guarded, "/health")[0].status == 200
    response, _ = get(guarded, "/view/user_history?token=wrong")
    assert response.status == 401
    response, _ = get(guarded, "/view/user_history?token=" + TOKEN + "&key=3")
    assert response.status == 303
    assert response.getheader("Location") == "/view/user_history?key=3"
    cookie = response.getheader("Set-Cookie")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    response, body = get(guarded, "/view/user_history?key=3",
                         {"Cookie": cookie.split(";")[0]})
    assert response.status == 200 and "user_history@v2" in body
    assert get(guarded, "/", {"Authorization": f"Bearer {TOKEN}"})[0].status == 200
    assert get(guarded, "/", {"Cookie": "tally_token=wrong"})[0].status == 401


def test_the_ui_is_read_only_and_loads_nothing_from_elsewhere(ui):
    connection = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=30)
    connection.request("POST", "/view/user_history", body=b"")
    assert connection.getresponse().status == 405
    response, body = get(ui, "/view/user_history")
    assert "default-src 'none'" in response.getheader("Content-Security-Policy")
    assert not re.search(r'(src|href)="(https?:)?//', body)
    assert "<script" not in body


def test_unknown_names_are_404_pages_naming_close_ones(ui):
    response, body = get(ui, "/view/user_histry")
    assert response.status == 404 and "did you mean" in body
    assert get(ui, "/nowhere")[0].status == 404
    assert get(ui, "/lineage?node=view:nope")[0].status == 404


def test_a_description_cannot_inject_markup(tmp_path):
    view = demo.dataclasses.replace(demo.model.article_info,
                                    description='<img src=x onerror="alert(1)">')
    with Registry(str(tmp_path / "r.db")) as registry:
        registry.apply([demo.model.article, demo.model.articles, view])
    with ui_in_background(UiServer(str(tmp_path / "r.db"), str(tmp_path / "none"),
                                   port=0)) as server:
        _, body = get(server, "/view/article_info")
        assert "<img" not in body and "&lt;img src=x" in body
        assert "the online store" in body               # no store: said, not a crash


def test_a_pending_candidate_and_its_promotion_are_shown(tmp_path):
    path = str(tmp_path / "r.db")
    with Registry(path) as registry:
        registry.apply(demo.DEFINITIONS)
        registry.set_deploy_mode("managed")            # as tally serve sets it
        registry.apply([demo.USER_HISTORY_V2])
    with ui_in_background(UiServer(path, str(tmp_path / "none"), port=0)) as server:
        _, body = get(server, "/view/user_history")
        assert "user_history@v1" in body and "v2 is deploying (candidate)" in body
        assert '<span class="state candidate">candidate</span>' in body
        with Registry(path) as registry:
            registry.promote("user_history", 2)
        _, body = get(server, "/view/user_history")
        assert "user_history@v2" in body and "deploying" not in body
        assert "caught up" in body                      # the promotion's log line


# ---- under the pages ---------------------------------------------------------------------

def test_metrics_are_parsed_as_the_service_renders_them():
    metrics = Metrics()
    metrics.declare("tally_freshness_seconds", "gauge", "x")
    metrics.declare("tally_events_total", "counter", "x")
    metrics.set("tally_freshness_seconds", 0.5, view='we"ird\\', version=3, partition=0)
    metrics.set("tally_freshness_seconds", 1.25, view='we"ird\\', version=3, partition=1)
    metrics.set("tally_events_total", 7, view="v", version=1, partition=0)
    metrics.set("tally_events_total", 5, view="v", version=1, partition=1)
    samples = parse_prometheus(exposition(scrape_registry(metrics))[0].decode())
    assert ("tally_freshness_seconds", {"view": 'we"ird\\', "version": "3", "partition": "1"},
            1.25) in samples
    assert per_view(samples) == {('we"ird\\', 3): {"freshness": 1.25},
                                 ("v", 1): {"events": 12.0}}


def test_the_event_rate_is_the_counters_growth_per_second():
    history = MetricsHistory("unused", span=3600)
    for when, events in ((1000.0, 100), (1010.0, 300), (1030.0, 50), (1040.0, 250)):
        history.add(when, {("v", 1): {"events": events, "freshness": when / 1000}})
    series = history.series("v", 1, now=1040.0)
    # 20/s, then a restart (the counter fell: no point), then 20/s
    assert series["rate"] == [(30.0, 20.0), (0.0, 20.0)]
    assert series["freshness"][-1] == (0.0, 1.04)
    history.add(1040.0 + 3600, {})
    assert len(history.samples) == 2                 # an hour kept, no more


def test_the_lineage_graph_follows_the_registrys_lineage(built):
    with Registry(built["registry"]) as registry:
        graph = lineage_graph(registry)
    edges = {(a, b) for a, b, _ in graph.edges}
    assert {("topic:articles", "source:articles"), ("source:articles", "view:user_taste"),
            ("source:read_events", "view:user_taste"), ("source:articles", "view:article_info"),
            ("view:user_taste", "feature:user_taste.top_category"),
            ("feature:user_taste.top_category", "service:recommend")} <= edges
    joins = [(a, b) for a, b, role in graph.edges if role == "join"]
    assert joins == [("source:articles", "view:user_taste")]
    # a feature reads only the sources it uses: count(*) never touches the join
    reads = around(graph, "feature:user_history.reads").nodes
    assert set(reads) == {"feature:user_history.reads", "view:user_history",
                          "source:read_events", "topic:read_events"}
    taste = around(graph, "feature:user_taste.avg_length").nodes
    assert {"source:articles", "source:read_events", "service:recommend"} <= set(taste)


def test_the_rollback_target_is_where_rollback_goes(built, tmp_path):
    path = tmp_path / "r.db"
    with Registry(str(path)) as registry:
        registry.apply(demo.DEFINITIONS)
        assert registry.rollback_target("user_history") is None
        registry.apply([demo.USER_HISTORY_V2])
        assert registry.rollback_target("user_history") == 1
        target = registry.rollback_target("user_history")
        assert registry.rollback("user_history").version == target


def test_the_store_lists_keys_in_order(tmp_path):
    reads, _ = demo.events(users=50, articles=5, reads=400, seed=3)
    reads["user"] -= 25                                  # negative keys sort first too
    with LmdbStore(str(tmp_path / "store")) as store:
        demo.write_view(store, demo.model.user_history, 1, reads, int(reads["ts"].max()) + 1)
        keys = store.keys("user_history", 10_000)
        assert keys == sorted(set(reads["user"].tolist()))
        assert store.keys("user_history", 3) == keys[:3]


def test_tally_ui_serves_on_loopback_with_the_token_from_the_environment(built):
    command = [sys.executable, "-m", "tally.service.cli", "ui", "--registry",
               built["registry"], "--store", built["store"], "--metrics", "off",
               "--port", "0"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ, TALLY_TOKEN=TOKEN))
    try:
        line = child.stdout.readline()
        match = re.search(r"tally ui: http://127\.0\.0\.1:(\d+)/ .*token required", line)
        assert match, (line, child.stderr.read() if child.poll() is not None else "")
        server = type("Server", (), {"port": int(match.group(1))})
        assert get(server, "/")[0].status == 401
        response, body = get(server, "/view/user_taste",
                             {"Authorization": f"Bearer {TOKEN}"})
        assert response.status == 200 and "top_category" in body
    finally:
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
