-- keygate schema, SQLite. Timestamps are microseconds since the Unix epoch (UTC) on every
-- backend; scopes, site_ids and metadata are JSON text.
CREATE TABLE tenants (
    tenant_id             TEXT    NOT NULL PRIMARY KEY,
    display_name          TEXT    NOT NULL,
    api_access_enabled    INTEGER NOT NULL,
    max_keys              INTEGER NOT NULL,
    rate_limit_per_minute INTEGER NOT NULL,
    daily_request_quota   INTEGER NOT NULL,
    created_at            INTEGER NOT NULL,
    updated_at            INTEGER NOT NULL
);

CREATE TABLE sites (
    site_id      TEXT    NOT NULL PRIMARY KEY,
    tenant_id    TEXT    NOT NULL REFERENCES tenants (tenant_id),
    display_name TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE INDEX sites_by_tenant ON sites (tenant_id, site_id);

CREATE TABLE api_keys (
    key_id                TEXT    NOT NULL PRIMARY KEY,
    tenant_id             TEXT    NOT NULL REFERENCES tenants (tenant_id),
    key_hash              TEXT    NOT NULL UNIQUE,
    display_prefix        TEXT    NOT NULL,
    name                  TEXT    NOT NULL,
    scopes                TEXT    NOT NULL,
    site_ids              TEXT    NOT NULL,
    environment           TEXT    NOT NULL,
    metadata              TEXT    NOT NULL,
    rate_limit_per_minute INTEGER NOT NULL,
    created_at            INTEGER NOT NULL,
    expires_at            INTEGER,
    revoked_at            INTEGER,
    last_used_at          INTEGER,
    rotated_from_key_id   TEXT
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, key_id);
CREATE INDEX api_keys_by_predecessor ON api_keys (rotated_from_key_id);

-- One row per site a key is restricted to, for ListKeys' site filter. No foreign key to sites:
-- deleting a site must not lift the restriction of the keys that name it.
CREATE TABLE key_sites (
    key_id  TEXT NOT NULL REFERENCES api_keys (key_id),
    site_id TEXT NOT NULL,
    PRIMARY KEY (key_id, site_id)
);
CREATE INDEX key_sites_by_site ON key_sites (site_id, key_id);
