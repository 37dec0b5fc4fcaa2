-- The talk's model, "recommend the next article", in Tally SQL (recommend.py is
-- the same in Python): tally apply recommend.sql
CREATE SOURCE read_events (user BIGINT, article BIGINT, readtime DOUBLE, ts BIGINT)
    WITH (topic = 'read_events');

CREATE SOURCE articles (article BIGINT, category VARCHAR, content_length BIGINT, ts BIGINT)
    WITH (topic = 'articles');

CREATE VIEW user_history
    WITH (owner = 'recommend', description = 'What each user read: the last 5 articles, time spent',
          tags = 'recommend') AS
SELECT user, LAST_N(article, 5) AS last_5_articles, SUM(readtime) AS total_readtime
FROM read_events
GROUP BY user;

CREATE VIEW user_taste
    WITH (owner = 'recommend', description = 'Each user''s tastes, from the articles read',
          tags = 'recommend') AS
SELECT r.user,
       HISTOGRAM(a.category, 32) AS categories,
       AVG(a.content_length) AS avg_length,
       TOP_VALUE(categories) AS top_category,
       ENTROPY(categories) AS reading_diversity
FROM read_events r JOIN articles a ON r.article = a.article
GROUP BY r.user;

CREATE VIEW article_info
    WITH (owner = 'newsroom', description = 'An article''s current attributes',
          tags = 'recommend') AS
SELECT article, LAST(category) AS category, LAST(content_length) AS content_length
FROM articles
GROUP BY article;

CREATE FEATURE SERVICE recommend
    WITH (owner = 'recommend',
          description = 'The next-article model''s input vector for (user, article)',
          tags = 'recommend') AS
SELECT user_history.last_5_articles, user_history.total_readtime,
       user_taste.top_category, user_taste.avg_length, user_taste.reading_diversity,
       article_info.category AS article_category,
       article_info.content_length AS article_length,
       request.article AS current_article,
       article_info.category = user_taste.top_category AS in_top_category,
       CONTAINS(user_history.last_5_articles, request.article) AS just_read;
