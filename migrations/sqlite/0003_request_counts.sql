-- Shared request counters for rate limits and quotas. Each replica counts locally and adds its
-- counts here in batches; `subject` is `key:<key_id>` (per-minute windows) or
-- `tenant:<tenant_id>` (per-day windows); `window_start` is in microseconds since the epoch.
CREATE TABLE request_counts (
    subject      TEXT    NOT NULL,
    window_start INTEGER NOT NULL,
    count        INTEGER NOT NULL,
    PRIMARY KEY (subject, window_start)
);
CREATE INDEX request_counts_by_window ON request_counts (window_start);
