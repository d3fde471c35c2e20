-- The change feed: every admin change that can turn an allow into a deny, in commit order, so
-- every replica can drop its cached copy. `change_feed_head` hands out sequence numbers under a
-- row lock held to commit, so sequence order is commit order and the feed has no holes.
CREATE TABLE change_feed_head (
    id  BIGINT NOT NULL PRIMARY KEY,
    seq BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
INSERT INTO change_feed_head (id, seq) VALUES (1, 0);

CREATE TABLE change_feed (
    seq        BIGINT       NOT NULL PRIMARY KEY,
    kind       VARCHAR(16)  NOT NULL,
    entity_id  VARCHAR(128) NOT NULL,
    created_at BIGINT       NOT NULL,
    KEY change_feed_by_time (created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
