-- API keys, one set per workspace. Only a SHA-256 of each key is stored: a leaked table
-- gives no usable key.
CREATE TABLE workspaces (
    id          text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    key_hash      text PRIMARY KEY,
    -- The first characters of the key, to tell keys apart in listings without revealing them.
    key_prefix    text NOT NULL,
    workspace_id  text NOT NULL REFERENCES workspaces (id),
    scopes        text[] NOT NULL,
    name          text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);

CREATE INDEX api_keys_workspace ON api_keys (workspace_id);
