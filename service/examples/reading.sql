-- The quick start's definitions in Tally SQL (reading.py is the same in Python).
--
--   tally apply reading.sql
--
-- Entities are implicit: the GROUP BY column is the entity key, named by its
-- alias in the SELECT list or by the column itself.

CREATE SOURCE read_events (user BIGINT, article BIGINT, readtime DOUBLE, ts BIGINT)
    WITH (topic = 'read_events', format = 'msgpack', event_time = 'ts');

-- What the quick start computes (tally quickstart): lifetime totals per user.
CREATE VIEW user_reading
    WITH (owner = 'quickstart', description = 'Lifetime reading totals per user') AS
SELECT user, SUM(readtime) AS total_readtime, COUNT(*) AS reads
FROM read_events
GROUP BY user;

-- Reading over the last 7 days, refreshed hourly, ignoring zero-length reads.
CREATE VIEW user_reading_7d
    WITH (owner = 'quickstart', description = 'Reading in the last 7 days, hop 1 hour',
          tags = 'reading, quickstart', online_expiry = '30d') AS
SELECT user,
       SUM(readtime) AS readtime_7d,
       COUNT(*) AS reads_7d,
       COUNT(*) FILTER (WHERE readtime >= 60) AS long_reads_7d,
       LAST_N(article, 10) AS recent_articles
FROM read_events
WHERE readtime > 0
GROUP BY user
WINDOW SLIDING 7 DAYS HOP 1 HOUR;

-- Per article: reads in the current hour and readers over the last day.
CREATE VIEW article_popularity
    WITH (owner = 'newsroom', description = 'How popular an article is',
          tags = 'reading, articles', online_expiry = '7d') AS
SELECT article,
       COUNT(*) OVER this_hour AS reads_1h,
       APPROX_COUNT_DISTINCT(user) OVER last_day AS readers_1d,
       AVG(readtime) AS mean_readtime
FROM read_events
GROUP BY article
WINDOW this_hour AS TUMBLING 1 HOUR, last_day AS SLIDING 1 DAY HOP 1 HOUR;
