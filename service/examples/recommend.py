"""The talk's model, "recommend the next article", in the Python DSL
(``recommend.sql`` is the same in SQL).

    tally apply recommend.py        # or: tally apply recommend.sql
    tally quickstart --model recommend

Its six input features:

=============================  ======================================================
last 5 articles read           ``user_history.last_5_articles``  (LAST_N)
current article                ``current_article``: the request's article key
top category                   ``user_taste.top_category``: TOP_VALUE of a HISTOGRAM
                               of the categories read (each read joined with its
                               article's category as of the read's time)
average content length         ``user_taste.avg_length``  (AVG over the join)
total time spent reading       ``user_history.total_readtime``  (SUM)
diversity of reading tastes    ``user_taste.reading_diversity``: ENTROPY of the
                               same histogram, in bits
=============================  ======================================================

and, for the current article, its own stored attributes (``article_info``)
and two request-time features: is it in the user's top category, and has
the user just read it. ``articles`` is a changelog topic keyed by article:
each row is a new version of an article's attributes (a re-categorisation),
valid from its time.
"""
from tally.core.definitions import (Derived, Entity, Feature, FeatureService, FeatureView, Join,
                                    Source)

user = Entity("user", "int64")
article = Entity("article", "int64")

read_events = Source(
    "read_events", "read_events",
    schema={"user": "int64", "article": "int64", "readtime": "float64", "ts": "int64"})
articles = Source(
    "articles", "articles",
    schema={"article": "int64", "category": "string", "content_length": "int64",
            "ts": "int64"})

user_history = FeatureView(
    "user_history", user, read_events,
    features=[Feature("last_5_articles", "last_n", "article", n=5),
              Feature("total_readtime", "sum", "readtime")],
    owner="recommend", description="What each user read: the last 5 articles, time spent",
    tags=("recommend",))

user_taste = FeatureView(
    "user_taste", user, read_events,
    features=[Feature("categories", "histogram", "category", k=32),
              Feature("avg_length", "mean", "content_length")],
    derived=[Derived("top_category", "TOP_VALUE(categories)"),
             Derived("reading_diversity", "ENTROPY(categories)")],
    joins=[Join(articles, on="article")],
    owner="recommend", description="Each user's tastes, from the articles read",
    tags=("recommend",))

article_info = FeatureView(
    "article_info", article, articles,
    features=[Feature("category", "last", "category"),
              Feature("content_length", "last", "content_length")],
    owner="newsroom", description="An article's current attributes", tags=("recommend",))

recommend = FeatureService(
    "recommend",
    features=["user_history:last_5_articles", "user_history:total_readtime",
              "user_taste:top_category", "user_taste:avg_length",
              "user_taste:reading_diversity",
              "article_info:category as article_category",
              "article_info:content_length as article_length"],
    computed=[Derived("current_article", "request.article"),
              Derived("in_top_category", "article_info.category = user_taste.top_category"),
              Derived("just_read", "CONTAINS(user_history.last_5_articles, request.article)")],
    owner="recommend", description="The next-article model's input vector for (user, article)",
    tags=("recommend",))
