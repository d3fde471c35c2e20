-- The change feed: every admin change that can turn an allow into a deny, in commit order, so
-- every replica can drop its cached copy. `change_feed_head` hands out sequence numbers under a
-- row lock held to commit, so sequence order is commit order and the feed has no holes.
CREATE TABLE change_feed_head (
    id  INTEGER NOT NULL PRIMARY KEY,
    seq INTEGER NOT NULL
);
INSERT INTO change_feed_head (id, seq) VALUES (1, 0);

CREATE TABLE change_feed (
    seq        INTEGER NOT NULL PRIMARY KEY,
    kind       TEXT    NOT NULL,
    entity_id  TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX change_feed_by_time ON change_feed (created_at);
