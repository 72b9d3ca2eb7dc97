-- Customer profiles. A profile is either a known customer (customer_id set) or an
-- anonymous visitor (customer_id NULL, reached through its anonymous id in `identities`).
CREATE TABLE profiles (
    id                 bigserial PRIMARY KEY,
    workspace_id       text        NOT NULL,
    customer_id        text,
    attributes         jsonb       NOT NULL DEFAULT '{}',
    email              text,
    phone              text,
    timezone           text,
    locale             text,
    -- Computed traits, kept current from order_completed / order_refunded events.
    orders_count       bigint           NOT NULL DEFAULT 0,
    revenue            double precision NOT NULL DEFAULT 0,
    refunded           double precision NOT NULL DEFAULT 0,
    first_purchase_at  timestamptz,
    last_purchase_at   timestamptz,
    rfm_recency        smallint    NOT NULL DEFAULT 0,
    rfm_frequency      smallint    NOT NULL DEFAULT 0,
    rfm_monetary       smallint    NOT NULL DEFAULT 0,
    rfm_scored_at      timestamptz,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    UNIQUE (workspace_id, customer_id)
);
CREATE INDEX profiles_buyers ON profiles (workspace_id) WHERE orders_count > 0;

-- Anonymous ids (devices, browsers) and the profile they belong to.
CREATE TABLE identities (
    workspace_id  text        NOT NULL,
    anonymous_id  text        NOT NULL,
    profile_id    bigint      NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    created_at    timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, anonymous_id)
);
CREATE INDEX identities_profile ON identities (profile_id);

-- A push token belongs to one device, so to one profile at a time.
CREATE TABLE push_tokens (
    workspace_id  text        NOT NULL,
    token         text        NOT NULL,
    profile_id    bigint      NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    platform      text        NOT NULL,
    app_id        text        NOT NULL DEFAULT '',
    updated_at    timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, token)
);
CREATE INDEX push_tokens_profile ON push_tokens (profile_id);

-- The latest decision per channel and topic ('' = every topic of the channel) ...
CREATE TABLE consents (
    profile_id  bigint      NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    channel     text        NOT NULL,
    topic       text        NOT NULL,
    status      text        NOT NULL,
    decided_at  timestamptz NOT NULL,
    source      text        NOT NULL,
    PRIMARY KEY (profile_id, channel, topic)
);

-- ... and every decision ever recorded, for the export (proof of consent).
CREATE TABLE consent_history (
    profile_id   bigint      NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    channel      text        NOT NULL,
    topic        text        NOT NULL,
    status       text        NOT NULL,
    decided_at   timestamptz NOT NULL,
    source       text        NOT NULL,
    recorded_at  timestamptz NOT NULL
);
CREATE INDEX consent_history_profile ON consent_history (profile_id);

-- Quintile thresholds of the last RFM scoring, per workspace, so a purchase is scored at
-- once against the same scale.
CREATE TABLE rfm_thresholds (
    workspace_id  text PRIMARY KEY,
    recency_days  double precision[] NOT NULL,
    frequency     double precision[] NOT NULL,
    monetary      double precision[] NOT NULL,
    buyers        bigint      NOT NULL,
    computed_at   timestamptz NOT NULL
);

-- Erasures, without the personal data: a hash of the erased id and when.
CREATE TABLE erasures (
    workspace_id  text        NOT NULL,
    subject_hash  text        NOT NULL,
    erased_at     timestamptz NOT NULL
);

-- Messages already handled (bus message id), so a redelivery changes nothing.
CREATE TABLE processed_messages (
    consumer      text        NOT NULL,
    message_id    text        NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Transactional outbox of profile.* messages.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL,
    message_id   text        NOT NULL,
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
