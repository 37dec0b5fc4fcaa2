"""The quick start's definitions in the Python DSL (``reading.sql`` is the same in SQL).

    tally apply reading.py        # or: tally apply reading.sql
    tally list
    tally lineage --topic read_events

Users read articles; each read is an event ``{"user", "article", "readtime",
"ts"}`` on the topic ``read_events``.
"""
from tally.core.definitions import Entity, Feature, FeatureView, Source, Window

user = Entity("user", "int64")
article = Entity("article", "int64")

read_events = Source(
    "read_events", "read_events",
    schema={"user": "int64", "article": "int64", "readtime": "float64", "ts": "int64"},
    timestamp_field="ts")

# What the quick start computes (tally quickstart): lifetime totals per user.
user_reading = FeatureView(
    "user_reading", user, read_events,
    features=[Feature("total_readtime", "sum", "readtime"),
              Feature("reads", "count")],
    owner="quickstart", description="Lifetime reading totals per user")

# Reading over the last 7 days, refreshed hourly, ignoring zero-length reads.
last_7_days = Window.sliding("7d", "1h")
user_reading_7d = FeatureView(
    "user_reading_7d", user, read_events,
    features=[Feature("readtime_7d", "sum", "readtime", last_7_days, filter="readtime > 0"),
              Feature("reads_7d", "count", window=last_7_days, filter="readtime > 0"),
              Feature("long_reads_7d", "count", window=last_7_days,
                      filter="readtime > 0 AND readtime >= 60"),
              Feature("recent_articles", "last_n", "article", last_7_days,
                      filter="readtime > 0", n=10)],
    owner="quickstart", description="Reading in the last 7 days, hop 1 hour",
    tags=("reading", "quickstart"), online_expiry="30d")

# Per article: reads in the current hour and readers over the last day.
article_popularity = FeatureView(
    "article_popularity", article, read_events,
    features=[Feature("reads_1h", "count", window=Window.tumbling("1h")),
              Feature("readers_1d", "distinct_count", "user", Window.sliding("1d", "1h")),
              Feature("mean_readtime", "mean", "readtime")],
    owner="newsroom", description="How popular an article is",
    tags=("reading", "articles"), online_expiry="7d")
