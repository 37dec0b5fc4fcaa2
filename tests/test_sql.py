"""Tally SQL: the dialect, its translation to definitions (equal to the Python
DSL's), and every construct it refuses, with the message text."""
import os

import pytest
import sqlglot

from tally.core.definitions import (DefinitionError, Entity, Feature, FeatureView, Source,
                                    Window, content_hash)
from tally.core.sql import Tally, load_sql, source_to_sql, view_from_sql, view_to_sql
from tally.service.registry import load_file

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "service", "examples")

read_events = Source("read_events", "read_events",
                     schema={"user": "int64", "article": "int64", "readtime": "float64",
                             "country": "string", "ts": "int64"})
user = Entity("user", "int64")


def view(text, **kwargs):
    return view_from_sql(text, sources=[read_events], **kwargs)


def refused(text, **kwargs):
    kwargs.setdefault("name", "v")
    with pytest.raises(DefinitionError) as error:
        load_sql(text, sources=[read_events], **kwargs)
    return str(error.value)


# --------------------------------------------------------------------------
# the examples of the issue

def test_the_issue_example():
    v = view("SELECT user, SUM(readtime) AS readtime_7d, COUNT(*) AS reads_7d "
             "FROM read_events WHERE readtime > 0 GROUP BY user "
             "WINDOW SLIDING 7 DAYS HOP 1 HOUR", name="user_reading_7d")
    week = Window.sliding("7d", "1h")
    assert v == FeatureView("user_reading_7d", user, read_events, [
        Feature("readtime_7d", "sum", "readtime", week, filter="readtime > 0"),
        Feature("reads_7d", "count", window=week, filter="readtime > 0")])


def test_the_lifetime_form_and_default_names():
    v = view("SELECT user, SUM(readtime) FROM read_events GROUP BY user", name="totals")
    assert v.features == (Feature("sum_readtime", "sum", "readtime", Window.lifetime()),)
    assert v.entity == user and v.key_column == "user"


def test_dsl_equals_sql_for_the_examples():
    py = {d.name: d for d in load_file(os.path.join(EXAMPLES, "reading.py"))}
    sql = {d.name: d for d in load_file(os.path.join(EXAMPLES, "reading.sql"))}
    views = [n for n, d in py.items() if isinstance(d, FeatureView)]
    assert views == ["user_reading", "user_reading_7d", "article_popularity"]
    for name in views:
        assert py[name] == sql[name], name
        assert content_hash(py[name]) == content_hash(sql[name])
    assert py["read_events"] == sql["read_events"]


def test_dsl_equals_sql_for_the_recommendation_model():
    from tally.core.definitions import FeatureService, Source, content_hash as hash_of
    py = {d.name: d for d in load_file(os.path.join(EXAMPLES, "recommend.py"))}
    sql = {d.name: d for d in load_file(os.path.join(EXAMPLES, "recommend.sql"))}
    shared = [n for n, d in py.items() if isinstance(d, (FeatureView, FeatureService, Source))]
    assert sorted(shared) == ["article_info", "articles", "read_events", "recommend",
                              "user_history", "user_taste"]
    for name in shared:
        assert py[name] == sql[name], name
        assert hash_of(py[name]) == hash_of(sql[name])


def test_the_example_is_the_quickstart_view():
    from tally.service import quickstart
    sql = {d.name: d for d in load_file(os.path.join(EXAMPLES, "reading.sql"))}
    assert sql["user_reading"] == quickstart.user_reading


# --------------------------------------------------------------------------
# translation

def test_all_aggregates():
    v = view("""SELECT user, COUNT(*), COUNT(country), SUM(readtime), AVG(readtime),
                       MEAN(readtime) AS m2, MIN(readtime), MAX(readtime), FIRST(readtime),
                       LAST(readtime), LAST_N(article, 5), LAST(readtime, 3) AS l3,
                       APPROX_COUNT_DISTINCT(article), DISTINCT_COUNT(readtime) AS dc,
                       APPROX_TOP_K(article, 3), TOP_K(article, 2) AS tk
                FROM read_events GROUP BY user""", name="all")
    got = [(f.name, f.aggregation, f.column, f.param, f.filter) for f in v.features]
    assert got == [
        ("count", "count", None, None, None),
        ("count_country", "count", None, None, "country IS NOT NULL"),
        ("sum_readtime", "sum", "readtime", None, None),
        ("mean_readtime", "mean", "readtime", None, None),
        ("m2", "mean", "readtime", None, None),
        ("min_readtime", "min", "readtime", None, None),
        ("max_readtime", "max", "readtime", None, None),
        ("first_readtime", "first", "readtime", None, None),
        ("last_readtime", "last", "readtime", None, None),
        ("last_n_article", "last_n", "article", 5, None),
        ("l3", "last_n", "readtime", 3, None),
        ("distinct_count_article", "distinct_count", "article", None, None),
        ("dc", "distinct_count", "readtime", None, None),
        ("top_k_article", "top_k", "article", 3, None),
        ("tk", "top_k", "article", 2, None),
    ]
    assert v.feature("last_n_article").n == 5 and v.feature("tk").k == 2


def test_filters_where_and_per_aggregate():
    v = view("""SELECT user, COUNT(*) AS reads,
                       COUNT(*) FILTER (WHERE readtime >= 60 OR country = 'de') AS long_reads,
                       COUNT(country) FILTER (WHERE readtime > 1) AS with_country
                FROM read_events WHERE readtime > 0 GROUP BY user""", name="f")
    assert [f.filter for f in v.features] == [
        "readtime > 0",
        "readtime > 0 AND (readtime >= 60 OR country = 'de')",
        "readtime > 0 AND readtime > 1 AND country IS NOT NULL"]


def test_named_windows_and_lateness():
    v = view("""SELECT user, SUM(readtime) AS week, COUNT(*) OVER hourly AS hour,
                       MAX(readtime) OVER forever AS longest
                FROM read_events GROUP BY user
                WINDOW SLIDING 7 DAYS HOP 1 HOUR LATENESS 10 MINUTES,
                       hourly AS TUMBLING 1 HOUR, forever AS LIFETIME""", name="w")
    assert [(f.window, f.lateness_ms) for f in v.features] == [
        (Window.sliding("7d", "1h"), 600_000), (Window.tumbling("1h"), 0),
        (Window.lifetime(), 0)]


@pytest.mark.parametrize("clause, window", [
    ("SLIDING 30 MINUTES HOP 5 MINUTES", Window.sliding("30m", "5m")),
    ("SLIDING 1 DAY HOP 1 HOUR", Window.sliding("1d", "1h")),
    ("SLIDING 2 WEEKS HOP 1 DAY", Window.sliding("14d", "1d")),
    ("TUMBLING 10 SECONDS", Window.tumbling("10s")),
    ("tumbling 250 milliseconds", Window.tumbling("250ms")),
    ("LIFETIME", Window.lifetime()),
])
def test_window_units(clause, window):
    v = view(f"SELECT user, COUNT(*) AS n FROM read_events GROUP BY user WINDOW {clause}",
             name="w")
    assert v.features[0].window == window


def test_the_key_alias_names_the_entity():
    v = view("SELECT article AS story, COUNT(*) AS reads FROM read_events GROUP BY article",
             name="s")
    assert v.entity == Entity("story", "int64") and v.key_column == "article"
    # GROUP BY the alias works too
    assert view("SELECT article AS story, COUNT(*) AS reads FROM read_events GROUP BY story",
                name="s") == v
    # and the key may be left out of the select list
    assert view("SELECT COUNT(*) AS reads FROM read_events GROUP BY user", name="s").entity \
        == user


def test_string_keys_and_catalog_entities():
    events = Source("e", "e", {"country": "string", "ts": "int64"})
    v = view_from_sql("SELECT country, COUNT(*) AS n FROM e GROUP BY country", sources=[events],
                      name="c")
    assert v.entity == Entity("country", "string")
    with pytest.raises(DefinitionError) as error:
        view_from_sql("SELECT country, COUNT(*) AS n FROM e GROUP BY country", sources=[events],
                      entities=[Entity("country", "int64")], name="c")
    assert str(error.value) == (
        "view 'c': key_column 'country' is string in source 'e', but entity 'country' has "
        "int64 keys; set key_column to a int64 field, or declare the entity with "
        "key_type='string'")


def test_qualified_columns_and_a_table_alias():
    v = view("SELECT e.user, SUM(e.readtime) AS total FROM read_events AS e "
             "WHERE e.readtime > 0 GROUP BY e.user", name="q")
    assert v.features[0].filter == "readtime > 0" and v.key_column == "user"


def test_create_source_and_view_metadata():
    defs = load_sql("""
        CREATE SOURCE clicks (user_id BIGINT, url VARCHAR, page BIGINT, dwell FLOAT64,
                              ok BOOLEAN, at BIGINT)
            WITH (topic = 'persistent://public/web/clicks', format = 'json',
                  event_time = 'at', archive = 's3://lake/clicks/');
        CREATE VIEW clicks_by_user WITH (owner = 'web', description = 'Clicks',
                                         tags = 'web, clicks', online_expiry = '30 days') AS
        SELECT user_id AS user, COUNT(*) AS clicks, APPROX_TOP_K(page, 5) AS top_pages
        FROM clicks GROUP BY user_id WINDOW TUMBLING 1 DAY""")
    clicks, v = defs
    assert clicks == Source("clicks", "persistent://public/web/clicks",
                            (("user_id", "int64"), ("url", "string"), ("page", "int64"),
                             ("dwell", "float64"), ("ok", "bool"), ("at", "int64")),
                            timestamp_field="at", format="json", archive="s3://lake/clicks/")
    assert (v.owner, v.description, v.tags, v.online_expiry) == \
        ("web", "Clicks", ("clicks", "web"), 30 * 86_400_000)
    # tags also as a tuple of strings
    v2 = load_sql("""CREATE VIEW x WITH (tags = ('web', 'clicks')) AS
                     SELECT user, COUNT(*) AS n FROM read_events GROUP BY user""",
                  sources=[read_events])[0]
    assert v2.tags == ("clicks", "web")


def test_source_defaults():
    (s,) = load_sql("CREATE SOURCE ev (k BIGINT, ts BIGINT)")
    assert (s.topic, s.format, s.timestamp_field, s.archive) == ("ev", "msgpack", "ts", None)


def test_round_trip_through_sql():
    py = {d.name: d for d in load_file(os.path.join(EXAMPLES, "reading.py"))}
    for d in py.values():
        if isinstance(d, FeatureView):
            text = source_to_sql(d.source) + ";\n" + view_to_sql(d)
            assert view_from_sql(text) == d, text
    odd = FeatureView("odd", Entity("select", "int64"), Source(
        "from_", "t", {"key": "int64", "ts": "int64", "order": "float64"}),
        [Feature("count", "count", filter="\"order\" > 1"),
         Feature("sum", "sum", "order", Window.sliding("1h", "1m"), lateness_ms="5m",
                 filter="key = 2")], key_column="key", description="it's odd")
    text = source_to_sql(odd.source) + ";\n" + view_to_sql(odd)
    assert view_from_sql(text) == odd, text


def test_routing_and_message_times_round_trip_through_sql():
    (s,) = load_sql("CREATE SOURCE ev (user BIGINT, x DOUBLE) WITH (routing = "
                    "'java_string_hash', event_time = '@event_time')")
    assert s == Source("ev", "ev", {"user": "int64", "x": "float64"},
                       timestamp_field="@event_time", routing="java_string_hash")
    assert s.schema[-1] == ("@event_time", "int64") and s.payload_schema == s.schema[:-1]
    for source in (s, Source("p", "p", {"user": "string", "@publish_time": "int64", "x":
                                        "float64"}, timestamp_field="@publish_time")):
        view = FeatureView("v", Entity("user", source.field_type("user")), source,
                           [Feature("n", "count")])
        text = source_to_sql(source) + ";\n" + view_to_sql(view)
        assert view_from_sql(text) == view, text
    assert "routing" not in source_to_sql(read_events)
    with pytest.raises(DefinitionError, match="BoostHash"):
        load_sql("CREATE SOURCE ev (user BIGINT, ts BIGINT) WITH (routing = 'boost_hash')")


def test_comments_and_several_statements():
    defs = load_sql("""-- a comment
        CREATE VIEW a AS SELECT user, COUNT(*) AS n FROM read_events GROUP BY user; /* b */
        CREATE VIEW b AS SELECT article, COUNT(*) AS n FROM read_events GROUP BY article;
        """, sources=[read_events])
    assert [d.name for d in defs] == ["a", "b"]


def test_the_dialect_extends_sqlglot_without_patching_it():
    text = "SELECT user, COUNT(*) FROM e GROUP BY user WINDOW SLIDING 7 DAYS HOP 1 HOUR"
    with pytest.raises(sqlglot.errors.ParseError):
        sqlglot.parse_one(text)                      # the stock dialect refuses it
    ast = sqlglot.parse_one(text, read=Tally)
    assert ast.sql(dialect=Tally) == text


def test_from_sql_on_feature_view():
    v = view_from_sql("SELECT user, COUNT(*) AS n FROM read_events GROUP BY user",
                             sources=[read_events], name="n", owner="me", tags=("t",))
    assert (v.name, v.owner, v.tags) == ("n", "me", ("t",))


# --------------------------------------------------------------------------
# constructs outside the dialect, and validation through SQL

GOOD = "SELECT user, COUNT(*) AS n FROM read_events"


@pytest.mark.parametrize("text, message", [
    (GOOD + " JOIN other ON other.user = read_events.user GROUP BY user",
     "view 'v': JOIN 'other' is not a known source; declare it with CREATE SOURCE"),
    (GOOD + " CROSS JOIN read_events b GROUP BY user",
     "view 'v': CROSS JOIN is outside the Tally SQL dialect; write JOIN dimension d ON"),
    ("SELECT user, COUNT(*) AS n FROM (SELECT * FROM read_events) GROUP BY user",
     "view 'v': a subquery is outside the Tally SQL dialect; select FROM a source directly "
     "and filter with WHERE"),
    (GOOD + " WHERE user IN (SELECT user FROM read_events) GROUP BY user",
     "view 'v': a subquery is outside the Tally SQL dialect"),
    (GOOD + " GROUP BY user HAVING COUNT(*) > 1",
     "view 'v': HAVING is outside the Tally SQL dialect; filter events with WHERE or FILTER "
     "(WHERE ...); filter feature values when you read them"),
    (GOOD + " GROUP BY user ORDER BY user",
     "view 'v': ORDER BY is outside the Tally SQL dialect; drop it: a view has no order"),
    (GOOD + " GROUP BY user LIMIT 10",
     "view 'v': LIMIT is outside the Tally SQL dialect; drop it: a view holds every entity"),
    ("SELECT DISTINCT user, COUNT(*) AS n FROM read_events GROUP BY user",
     "view 'v': DISTINCT is outside the Tally SQL dialect; drop DISTINCT: a view has one row "
     "per entity already"),
    ("SELECT user, SUM(readtime) OVER (PARTITION BY user ORDER BY ts) AS s FROM read_events "
     "GROUP BY user",
     "view 'v': 'SUM(readtime) OVER (PARTITION BY user ORDER BY ts)': window functions (OVER "
     "(...)) are outside the Tally SQL dialect; name a window in the WINDOW clause and write "
     "OVER <name>, e.g. SUM(x) OVER w ... WINDOW w AS SLIDING 7 DAYS HOP 1 HOUR"),
    ("WITH r AS (SELECT * FROM read_events) SELECT user, COUNT(*) AS n FROM r GROUP BY user",
     "view 'v': WITH (a common table expression) is outside the Tally SQL dialect; select "
     "FROM a source directly"),
    (GOOD + " GROUP BY user UNION ALL " + GOOD + " GROUP BY user",
     "SQL statement at line 1: UNION is outside the Tally SQL dialect; define one view per "
     "SELECT"),
    (GOOD + " GROUP BY user, article",
     "view 'v': GROUP BY must name exactly one column, the entity key (found 'GROUP BY user, "
     "article'); e.g. GROUP BY user"),
    (GOOD,
     "view 'v': GROUP BY is missing; group by the entity key column, e.g. GROUP BY user"),
    ("SELECT * FROM read_events GROUP BY user",
     "view 'v': SELECT * is outside the Tally SQL dialect; select the key and aggregates"),
    ("SELECT user, article, COUNT(*) AS n FROM read_events GROUP BY user",
     "view 'v': select item 'article' is neither the GROUP BY key ('user') nor an aggregate; "
     "remove it, or aggregate it, e.g. LAST(article) AS last_article"),
    ("SELECT user, SUM(readtime * 2) AS s FROM read_events GROUP BY user",
     "view 'v': 'SUM(readtime * 2)': an expression inside an aggregate is outside the Tally "
     "SQL dialect; aggregate a source column (SUM(col)), and compute derived values in the "
     "producer"),
    ("SELECT user, COUNT(DISTINCT article) AS a FROM read_events GROUP BY user",
     "view 'v': 'COUNT(DISTINCT article)': COUNT(DISTINCT ...) is outside the Tally SQL "
     "dialect (exact distinct counts are not kept); use APPROX_COUNT_DISTINCT(article)"),
    ("SELECT user, STDDEV(readtime) AS s FROM read_events GROUP BY user",
     "view 'v': 'STDDEV(readtime)': aggregate STDDEV() is not an aggregate of the Tally SQL "
     "dialect; use COUNT(*), COUNT(col), SUM, AVG, MIN, MAX, FIRST, LAST, LAST_N(col, n), "
     "APPROX_COUNT_DISTINCT(col), APPROX_TOP_K(col, k)"),
    ("SELECT user, readtime + 1 AS s FROM read_events GROUP BY user",
     "view 'v': 'readtime + 1' is neither the GROUP BY key nor an aggregate"),
    ("SELECT user, LAST_N(article) AS s FROM read_events GROUP BY user",
     "view 'v': 'LAST_N(article)' takes 2 arguments; write LAST_N(col, n)"),
    ("SELECT user, LAST_N(article, '3') AS s FROM read_events GROUP BY user",
     "view 'v': 'LAST_N(article, '3')': n must be a whole number, e.g. LAST_N(article, 10)"),
    ("SELECT user, COUNT(*) AS n FROM clicks GROUP BY user",
     "view 'v': FROM 'clicks' is not a known source; declare it first with CREATE SOURCE "
     "clicks (...) WITH (topic = '...'), or apply it from a Python file (known sources: "
     "read_events)"),
    ("SELECT user, COUNT(*) AS n FROM read_event GROUP BY user",
     "view 'v': FROM 'read_event' is not a known source; did you mean 'read_events'?"),
    ("SELECT user, COUNT(*) AS n FROM db.read_events GROUP BY user",
     "view 'v': FROM db.read_events: qualified names are outside the Tally SQL dialect; "
     "write FROM read_events"),
    ("SELECT user, COUNT(*) OVER w2 AS n FROM read_events GROUP BY user WINDOW w AS LIFETIME",
     "view 'v': 'COUNT(*) OVER w2': window 'w2' is not defined; add WINDOW w2 AS SLIDING ... "
     "(named windows: w)"),
    ("SELECT user, COUNT(*) AS n FROM read_events GROUP BY user WINDOW w AS (PARTITION BY "
     "user)",
     "SQL syntax error at line 1, col 71: Standard SQL window specifications (WINDOW w AS "
     "(...)) are outside the Tally dialect; write WINDOW w AS SLIDING 7 DAYS HOP 1 HOUR"),
    ("SELECT user, COUNT(*) AS n FROM read_events GROUP BY user WINDOW SLIDING 7 DAYS",
     "SQL syntax error at line 1, col"),
    ("SELECT user, COUNT(*) AS n FROM read_events GROUP BY user WINDOW SLIDING 7 FORTNIGHTS "
     "HOP 1 DAY",
     "Expected a time unit (MILLISECONDS, SECONDS, MINUTES, HOURS, DAYS or WEEKS)"),
    ("SELECT user, COUNT(*) AS n FROM read_events GROUP BY user WINDOW TUMBLING 1 HOUR, "
     "TUMBLING 1 DAY",
     "view 'v': the unnamed window is defined twice in WINDOW; name each extra window"),
    ("INSERT INTO read_events VALUES (1, 2, 3.0, 'de', 4)",
     "SQL statement at line 1: INSERT is outside the Tally SQL dialect; write CREATE SOURCE "
     "..., CREATE VIEW ... AS SELECT ... or SELECT ..."),
    ("DROP TABLE read_events", "DROP is outside the Tally SQL dialect"),
    ("CREATE TABLE t (a BIGINT)",
     "SQL statement at line 1: CREATE TABLE is outside the Tally SQL dialect; use CREATE "
     "SOURCE, CREATE VIEW or CREATE FEATURE SERVICE"),
    ("CREATE ENTITY user KEY BIGINT",
     "The statement 'CREATE ENTITY user KEY BIGINT' is outside the Tally SQL dialect; write "
     "CREATE SOURCE ..., CREATE VIEW ... AS SELECT ..., CREATE FEATURE SERVICE ... AS SELECT "
     "... or SELECT ..."),
    ("CREATE OR REPLACE VIEW v AS " + GOOD + " GROUP BY user",
     "view 'v': CREATE OR REPLACE is outside the Tally SQL dialect; drop it: applying a "
     "changed definition creates a new version, an unchanged one creates nothing"),
    ("CREATE VIEW v WITH (colour = 'red') AS " + GOOD + " GROUP BY user",
     "view 'v': property 'colour' is unknown; use owner, description, tags, online_expiry"),
    ("CREATE VIEW v WITH (online_expiry = 30) AS " + GOOD + " GROUP BY user",
     "view 'v': property online_expiry = 30 is not a quoted string; write online_expiry = "
     "'...'"),
    ("CREATE SOURCE s (k BIGINT, ts TIMESTAMP)",
     "source 's', field 'ts': type TIMESTAMP is not supported; use BIGINT (also for event "
     "times: epoch milliseconds), DOUBLE, VARCHAR or BOOLEAN"),
    ("CREATE SOURCE s (k BIGINT NOT NULL, ts BIGINT)",
     "source 's', field 'k': column constraints are outside the Tally SQL dialect; drop them"),
    ("CREATE SOURCE s (k BIGINT, ts BIGINT) WITH (partitions = 4)",
     "source 's': property 'partitions' is unknown; use topic, format, event_time, archive"),
    ("SELEKT user FROM read_events",
     "SQL syntax error at line 1, col 16: Invalid expression / Unexpected token"),
    ("SELECT user, COUNT(*) AS n FROM read_events GROUP BY user; SELECT 1",
     "name='v' names one view, but the text has several SELECTs"),
    ("CREATE VIEW a AS " + GOOD + " GROUP BY user; CREATE VIEW a AS " + GOOD + " GROUP BY user",
     "view 'a': the name is defined twice; give each view a distinct name"),
    ("SELECT user, COUNT(*) FILTER (WHERE country LIKE 'd%') AS n FROM read_events "
     "GROUP BY user",
     "view 'v', feature 'n': filter: LIKE is not supported in filters"),
])
def test_constructs_outside_the_dialect_are_refused(text, message):
    assert message in refused(text)


def test_a_bare_select_needs_a_name():
    assert refused(GOOD + " GROUP BY user", name=None) == (
        "SQL statement at line 1: the view has no name; write CREATE VIEW <name> AS SELECT "
        "..., or pass name=")


def test_errors_name_the_file():
    message = refused("SELECT user, COUNT(*) AS n FROM nope GROUP BY user", origin="x.sql")
    assert message.startswith("x.sql: view 'v': FROM 'nope' is not a known source")


@pytest.mark.parametrize("text, message", [
    ("SELECT user, SUM(readtme) AS s FROM read_events GROUP BY user",
     "view 'v', feature 's': column 'readtme' is not a field of source 'read_events'; did you "
     "mean 'readtime'? use one of user, article, readtime, country, ts"),
    ("SELECT user, SUM(country) AS s FROM read_events GROUP BY user",
     "view 'v', feature 's': aggregation sum needs a numeric column, but column 'country' is "
     "string; aggregate a numeric column, or use count, first, last, last_n, distinct_count, "
     "top_k, histogram for a string column"),
    ("SELECT user, COUNT(*) AS n FROM read_events GROUP BY user "
     "WINDOW SLIDING 1 HOUR HOP 25 MINUTES",
     "view 'v', feature 'n': window hop 25m does not divide the window size 1h; use a hop "
     "that divides it, e.g. 20m or 30m"),
    ("SELECT user, COUNT(*) AS n, SUM(readtime) AS n FROM read_events GROUP BY user",
     "view 'v': feature name 'n' is used twice; give each feature a distinct name"),
    ("SELECT uid, COUNT(*) AS n FROM read_events GROUP BY uid",
     "view 'v': key_column 'uid' (the key of entity 'uid') is not a field of source "
     "'read_events'; add it to the source's schema, or set key_column to the field holding "
     "the uid key (fields: user, article, readtime, country, ts)"),
    ("SELECT readtime, COUNT(*) AS n FROM read_events GROUP BY readtime",
     "view 'v': GROUP BY 'readtime' is a float64 column; the entity key must be an int64 or "
     "string column of the source"),
    ("SELECT user, COUNT(*) AS n FROM read_events WHERE readtme > 0 GROUP BY user",
     "view 'v', feature 'n': filter 'readtme > 0': column 'readtme' is not a field of the "
     "source; did you mean 'readtime'?"),
    ("SELECT user, LAST_N(article, 0) AS a FROM read_events GROUP BY user",
     "view 'v', feature 'a': n=0 is out of range; use an integer from 1 to 4096"),
])
def test_validation_errors_through_sql(text, message):
    assert message in refused(text)


@pytest.mark.parametrize("text, message", [
    # a window of zero size once became a lifetime window, silently
    ("SELECT user, COUNT(*) AS n FROM read_events GROUP BY user "
     "WINDOW SLIDING 0 DAYS HOP 0 HOURS", "zero size or hop"),
    ("SELECT user, COUNT(*) AS n FROM read_events GROUP BY user WINDOW TUMBLING 0 HOURS",
     "zero size or hop"),
    # 1 hour tiles kept for 100 weeks of lateness: 16,801 tiles per entity and feature
    ("SELECT user, COUNT(*) AS n FROM read_events GROUP BY user "
     "WINDOW TUMBLING 1 HOUR LATENESS 100 WEEKS", "keeps 16,801 tiles per entity; the limit "
     "is 10,000: use a larger hop or less lateness"),
])
def test_windows_that_cannot_be_meant_are_refused(text, message):
    with pytest.raises(DefinitionError, match=message):
        view_from_sql(text, sources=[SOURCE_FOR_LIMITS], name="v")


SOURCE_FOR_LIMITS = Source("read_events", "read_events",
                           {"user": "int64", "readtime": "float64", "ts": "int64"})


def test_names_too_long_for_the_stores_are_refused():
    """A 601-character view name once passed apply and killed serve with
    MDB_BAD_VALSIZE."""
    with pytest.raises(DefinitionError, match="has 601 characters; the limit is 48"):
        view_from_sql("SELECT user, COUNT(*) AS n FROM read_events GROUP BY user",
                      sources=[SOURCE_FOR_LIMITS], name="v" * 601)
    with pytest.raises(DefinitionError, match="a sliding window's size is 0"):
        Window.sliding("0d", "0h")


# -- JOIN: events enriched with a dimension as of their time ------------------

articles = Source("articles", "articles", schema={
    "article": "int64", "category": "string", "content_length": "int64",
    "readtime": "float64", "ts": "int64"})


def joined(text, **kwargs):
    return view_from_sql(text, sources=[read_events, articles], **kwargs)


def test_a_join_in_sql_equals_the_python_join():
    from tally.core.definitions import Join
    got = joined("""CREATE VIEW user_taste AS
        SELECT r.user, TOP_K(a.category, 1) AS top_category,
               AVG(a.content_length) AS avg_length,
               COUNT(*) FILTER (WHERE category = 'sports') AS sports
        FROM read_events r JOIN articles a ON r.article = a.article GROUP BY r.user""")
    expected = FeatureView("user_taste", user, read_events, [
        Feature("top_category", "top_k", "category", k=1),
        Feature("avg_length", "mean", "content_length"),
        Feature("sports", "count", filter="category = 'sports'")],
        joins=[Join(articles, on="article")])
    assert got == expected
    assert got.joins[0].columns == ("category", "content_length")
    # LEFT JOIN and USING mean the same: every event keeps its place
    left = joined("""CREATE VIEW user_taste AS
        SELECT user, TOP_K(category, 1) AS top_category, AVG(content_length) AS avg_length,
               COUNT(*) FILTER (WHERE a.category = 'sports') AS sports
        FROM read_events LEFT JOIN articles a USING (article) GROUP BY user""")
    assert left == expected


def test_a_joined_column_named_like_an_event_field_gets_the_alias_as_prefix():
    v = joined("""CREATE VIEW v AS SELECT user, SUM(a.readtime) AS theirs,
                  SUM(readtime) AS ours FROM read_events JOIN articles a
                  ON read_events.article = a.article GROUP BY user""")
    assert v.joins[0].prefix == "a_" and v.feature("theirs").column == "a_readtime"
    assert v.feature("ours").column == "readtime"


def test_joined_views_round_trip_through_sql():
    from tally.core.definitions import Join
    for prefix, column in (("", "content_length"), ("a_", "a_readtime")):
        v = FeatureView("v", user, read_events, [
            Feature("total", "sum", column, filter=f"{prefix}category = 'news'"),
            Feature("n", "count", filter=f"{prefix}category IS NOT NULL")],
            joins=[Join(articles, on="article", prefix=prefix)])
        text = ";\n".join([source_to_sql(read_events), source_to_sql(articles), view_to_sql(v)])
        assert view_from_sql(text) == v, text


def test_joins_outside_the_dialect_are_refused_with_the_fix():
    def refused_join(text):
        with pytest.raises(DefinitionError) as error:
            load_sql(text, sources=[read_events, articles], name="v")
        return str(error.value)
    assert "RIGHT JOIN is outside" in refused_join(
        "CREATE VIEW v AS SELECT user, SUM(content_length) AS s FROM read_events "
        "RIGHT JOIN articles ON read_events.article = articles.article GROUP BY user")
    assert "join on one key equality" in refused_join(
        "CREATE VIEW v AS SELECT user, SUM(content_length) AS s FROM read_events "
        "JOIN articles ON read_events.article > articles.article GROUP BY user")
    assert "'authors' is not a known source" in refused_join(
        "CREATE VIEW v AS SELECT user, COUNT(*) AS n FROM read_events "
        "JOIN authors ON read_events.article = authors.article GROUP BY user")
    assert "uses none of its attributes" in refused_join(
        "CREATE VIEW v AS SELECT user, COUNT(*) AS n FROM read_events "
        "JOIN articles ON read_events.article = articles.article GROUP BY user")
    assert "neither the FROM source nor a JOIN" in refused_join(
        "CREATE VIEW v AS SELECT user, SUM(x.content_length) AS s FROM read_events "
        "JOIN articles ON read_events.article = articles.article GROUP BY user")
