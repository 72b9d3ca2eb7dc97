-- The catalog. A deleted item keeps its row (deleted_at set) so that a model version that
-- still knows it never recommends it, and so that a late catalog event cannot revive it.
CREATE TABLE items (
    workspace_id   text             NOT NULL,
    id             text             NOT NULL,
    title          text             NOT NULL,
    category_path  text[]           NOT NULL,
    brand          text             NOT NULL,
    price          double precision NOT NULL,
    currency       text             NOT NULL,
    in_stock       boolean          NOT NULL,
    stock          bigint,
    tags           text[]           NOT NULL,
    created_at     timestamptz      NOT NULL,
    url            text             NOT NULL,
    image_url      text             NOT NULL,
    replenishable  boolean          NOT NULL,
    attributes     jsonb            NOT NULL,
    updated_at     timestamptz      NOT NULL,
    deleted_at     timestamptz,
    PRIMARY KEY (workspace_id, id)
);

-- Bumped by every catalog write: replicas reload a workspace's catalog when it moves.
CREATE TABLE catalog_versions (
    workspace_id  text   PRIMARY KEY,
    version       bigint NOT NULL
);

-- Model snapshots: the encoded models and what training measured.
CREATE TABLE models (
    workspace_id       text        NOT NULL,
    version            bigint      NOT NULL,
    kinds              text[]      NOT NULL,
    trained_at         timestamptz NOT NULL,
    training_ms        bigint      NOT NULL,
    data_until         timestamptz NOT NULL,
    item_count         bigint      NOT NULL,
    customer_count     bigint      NOT NULL,
    interaction_count  bigint      NOT NULL,
    algorithm          text        NOT NULL,
    memory_bytes       bigint      NOT NULL,
    metrics            jsonb       NOT NULL,
    body               bytea       NOT NULL,
    PRIMARY KEY (workspace_id, version)
);

-- Which version serves each workspace, and the one before it (Rollback's default).
CREATE TABLE current_models (
    workspace_id  text        PRIMARY KEY,
    version       bigint      NOT NULL,
    previous      bigint,
    changed_at    timestamptz NOT NULL
);

-- Sampled answers, so that clicks carrying a recommendation_id can be attributed.
CREATE TABLE impressions (
    recommendation_id  uuid        PRIMARY KEY,
    workspace_id       text        NOT NULL,
    customer_id        text,
    anonymous_id       text,
    placement          text        NOT NULL,
    model_version      bigint      NOT NULL,
    items              text[]      NOT NULL,
    reasons            text[]      NOT NULL,
    served_at          timestamptz NOT NULL
);
CREATE INDEX impressions_served ON impressions (workspace_id, served_at);
