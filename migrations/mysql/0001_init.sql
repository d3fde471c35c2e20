-- keygate schema, MySQL/MariaDB. Timestamps are microseconds since the Unix epoch (UTC) on every
-- backend; scopes, site_ids and metadata are JSON text. Binary collation keeps ids
-- case-sensitive, as on the other backends.
CREATE TABLE tenants (
    tenant_id             VARCHAR(64)  NOT NULL PRIMARY KEY,
    display_name          VARCHAR(200) NOT NULL,
    api_access_enabled    BIGINT       NOT NULL,
    max_keys              BIGINT       NOT NULL,
    rate_limit_per_minute BIGINT       NOT NULL,
    daily_request_quota   BIGINT       NOT NULL,
    created_at            BIGINT       NOT NULL,
    updated_at            BIGINT       NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE sites (
    site_id      VARCHAR(64)  NOT NULL PRIMARY KEY,
    tenant_id    VARCHAR(64)  NOT NULL,
    display_name VARCHAR(200) NOT NULL,
    created_at   BIGINT       NOT NULL,
    updated_at   BIGINT       NOT NULL,
    KEY sites_by_tenant (tenant_id, site_id),
    CONSTRAINT sites_tenant FOREIGN KEY (tenant_id) REFERENCES tenants (tenant_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE api_keys (
    key_id                VARCHAR(64)  NOT NULL PRIMARY KEY,
    tenant_id             VARCHAR(64)  NOT NULL,
    key_hash              CHAR(64)     NOT NULL,
    display_prefix        VARCHAR(32)  NOT NULL,
    name                  VARCHAR(100) NOT NULL,
    scopes                MEDIUMTEXT   NOT NULL,
    site_ids              MEDIUMTEXT   NOT NULL,
    environment           VARCHAR(8)   NOT NULL,
    metadata              MEDIUMTEXT   NOT NULL,
    rate_limit_per_minute BIGINT       NOT NULL,
    created_at            BIGINT       NOT NULL,
    expires_at            BIGINT       NULL,
    revoked_at            BIGINT       NULL,
    last_used_at          BIGINT       NULL,
    rotated_from_key_id   VARCHAR(64)  NULL,
    UNIQUE KEY api_keys_by_hash (key_hash),
    KEY api_keys_by_tenant (tenant_id, key_id),
    KEY api_keys_by_predecessor (rotated_from_key_id),
    CONSTRAINT api_keys_tenant FOREIGN KEY (tenant_id) REFERENCES tenants (tenant_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row per site a key is restricted to, for ListKeys' site filter. No foreign key to sites:
-- deleting a site must not lift the restriction of the keys that name it.
CREATE TABLE key_sites (
    key_id  VARCHAR(64) NOT NULL,
    site_id VARCHAR(64) NOT NULL,
    PRIMARY KEY (key_id, site_id),
    KEY key_sites_by_site (site_id, key_id),
    CONSTRAINT key_sites_key FOREIGN KEY (key_id) REFERENCES api_keys (key_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
