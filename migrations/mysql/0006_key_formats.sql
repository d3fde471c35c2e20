-- Every key shape keygate has minted with (KEYGATE_KEY_FORMAT), so that keys minted under an
-- earlier shape keep passing Check after the setting changes.
CREATE TABLE key_formats (
    notation        VARCHAR(255)    NOT NULL PRIMARY KEY,
    first_minted_at BIGINT NOT NULL
);
