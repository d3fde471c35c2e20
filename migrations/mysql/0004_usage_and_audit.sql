-- Daily Check counts per key and outcome (`allowed` or a deny reason code), written in batches.
CREATE TABLE key_usage (
    key_id  VARCHAR(64) NOT NULL,
    day     BIGINT      NOT NULL,
    outcome VARCHAR(32) NOT NULL,
    count   BIGINT      NOT NULL,
    PRIMARY KEY (key_id, day, outcome)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The audit log: admin changes, written in the transaction of the change, and denied Checks of
-- known keys, aggregated per key, reason and minute (their event_id names that triple, so every
-- replica adds to one row). key_id is '' when no key is concerned.
CREATE TABLE audit_events (
    event_id    VARCHAR(160) NOT NULL PRIMARY KEY,
    tenant_id   VARCHAR(64)  NOT NULL,
    key_id      VARCHAR(64)  NOT NULL,
    event_type  VARCHAR(32)  NOT NULL,
    actor       VARCHAR(64)  NOT NULL,
    details     MEDIUMTEXT   NOT NULL,
    occurred_at BIGINT       NOT NULL,
    count       BIGINT       NOT NULL,
    KEY audit_events_by_tenant (tenant_id, occurred_at, event_id),
    KEY audit_events_by_key (tenant_id, key_id, occurred_at, event_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
