-- Daily Check counts per key and outcome (`allowed` or a deny reason code), written in batches.
CREATE TABLE key_usage (
    key_id  TEXT    NOT NULL,
    day     INTEGER NOT NULL,
    outcome TEXT    NOT NULL,
    count   INTEGER NOT NULL,
    PRIMARY KEY (key_id, day, outcome)
);

-- The audit log: admin changes, written in the transaction of the change, and denied Checks of
-- known keys, aggregated per key, reason and minute (their event_id names that triple, so every
-- replica adds to one row). key_id is '' when no key is concerned.
CREATE TABLE audit_events (
    event_id    TEXT    NOT NULL PRIMARY KEY,
    tenant_id   TEXT    NOT NULL,
    key_id      TEXT    NOT NULL,
    event_type  TEXT    NOT NULL,
    actor       TEXT    NOT NULL,
    details     TEXT    NOT NULL,
    occurred_at INTEGER NOT NULL,
    count       INTEGER NOT NULL
);
CREATE INDEX audit_events_by_tenant ON audit_events (tenant_id, occurred_at, event_id);
CREATE INDEX audit_events_by_key ON audit_events (tenant_id, key_id, occurred_at, event_id);
