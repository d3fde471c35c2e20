-- A tenant with no active-key limit at all, and a rate limit shared by all of a tenant's keys
-- over a sliding window of 1, 60, 3 600 or 86 400 seconds (0 requests: none).
ALTER TABLE tenants ADD COLUMN unlimited_keys BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tenants ADD COLUMN shared_rate_limit BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tenants ADD COLUMN shared_rate_limit_window_seconds BIGINT NOT NULL DEFAULT 60;
