-- Shared request counters for rate limits and quotas. Each replica counts locally and adds its
-- counts here in batches; `subject` is `key:<key_id>` (per-minute windows) or
-- `tenant:<tenant_id>` (per-day windows); `window_start` is in microseconds since the epoch.
CREATE TABLE request_counts (
    subject      VARCHAR(80) NOT NULL,
    window_start BIGINT      NOT NULL,
    count        BIGINT      NOT NULL,
    PRIMARY KEY (subject, window_start),
    KEY request_counts_by_window (window_start)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
