-- The delivery service's schema: templates, the message ledger, the in-app inbox, the outbox.

-- Every saved version of every template; the current one is the highest version.
CREATE TABLE templates (
    workspace_id text NOT NULL,
    name text NOT NULL,
    version integer NOT NULL,
    -- The template as saved (protobuf `relance.v1.Template`).
    body bytea NOT NULL,
    -- Channels with content in any variant (Channel numbers), for ListTemplates' filter.
    channels smallint[] NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, name, version)
);

-- The message ledger: one row per idempotency key. Its unique key makes a redelivered or
-- retried request a no-op that finds the first outcome.
CREATE TABLE messages (
    id uuid PRIMARY KEY,
    workspace_id text NOT NULL,
    idempotency_key text NOT NULL,
    customer_id text,
    anonymous_id text,
    -- relance.v1.Channel; 0 until one is chosen.
    channel smallint NOT NULL DEFAULT 0,
    -- relance.v1.MessageStatus, plus 100 = being sent (leased by a worker until lease_until).
    status smallint NOT NULL,
    reason smallint NOT NULL DEFAULT 0,
    reason_detail text NOT NULL DEFAULT '',
    kind smallint NOT NULL,
    topic text NOT NULL,
    template text NOT NULL DEFAULT '',
    template_version integer NOT NULL DEFAULT 0,
    locale text NOT NULL DEFAULT '',
    flow text NOT NULL DEFAULT '',
    flow_version integer NOT NULL DEFAULT 0,
    step text NOT NULL DEFAULT '',
    variant text NOT NULL DEFAULT '',
    broadcast text NOT NULL DEFAULT '',
    journey_id text NOT NULL DEFAULT '',
    address text NOT NULL DEFAULT '',
    provider text NOT NULL DEFAULT '',
    provider_message_id text NOT NULL DEFAULT '',
    attempts integer NOT NULL DEFAULT 0,
    -- The request as accepted (protobuf `relance.v1.SendRequest`): a retry sends it again.
    request bytea NOT NULL,
    -- The chosen channel's rendered content (protobuf `relance.v1.MessageContent`).
    rendered bytea,
    lease_until timestamptz,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    sent_at timestamptz,
    delivered_at timestamptz,
    opened_at timestamptz,
    clicked_at timestamptz,
    ended_at timestamptz,
    next_attempt_at timestamptz,
    UNIQUE (workspace_id, idempotency_key)
);
CREATE INDEX messages_by_customer ON messages (workspace_id, customer_id, created_at DESC);
CREATE INDEX messages_by_anonymous ON messages (workspace_id, anonymous_id, created_at DESC)
    WHERE anonymous_id IS NOT NULL;
-- The sweeper's view: messages whose retry or lease is overdue.
CREATE INDEX messages_unfinished ON messages (status, next_attempt_at) WHERE status IN (6, 100);
CREATE INDEX messages_by_age ON messages (created_at);

-- In-app messages, as rendered, per customer.
CREATE TABLE inbox (
    message_id uuid PRIMARY KEY,
    workspace_id text NOT NULL,
    -- `c:<customer_id>` or `a:<anonymous_id>`.
    recipient text NOT NULL,
    title text NOT NULL,
    body text NOT NULL,
    image_url text NOT NULL DEFAULT '',
    url text NOT NULL DEFAULT '',
    data jsonb NOT NULL DEFAULT '{}',
    direction smallint NOT NULL,
    locale text NOT NULL DEFAULT '',
    origin jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL,
    read_at timestamptz,
    expires_at timestamptz NOT NULL
);
CREATE INDEX inbox_by_recipient ON inbox (workspace_id, recipient, created_at DESC);

CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    exchange text NOT NULL,
    routing_key text NOT NULL,
    message_id text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
