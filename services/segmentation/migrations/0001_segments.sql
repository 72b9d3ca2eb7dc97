-- Segment definitions. `answering_version` is the version whose membership reads return
-- (0 before the first build completes); `building_version` is set while a newer version's
-- membership is being computed. Switching is one UPDATE of this row.
CREATE TABLE segments (
    id                 bigserial PRIMARY KEY,
    workspace_id       text        NOT NULL,
    name               text        NOT NULL,
    status             text        NOT NULL CHECK (status IN ('building', 'active', 'archived')),
    latest_version     integer     NOT NULL,
    answering_version  integer     NOT NULL DEFAULT 0,
    building_version   integer,
    build_started_at   timestamptz,
    member_count       bigint      NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    ready_at           timestamptz,
    archived_at        timestamptz,
    UNIQUE (workspace_id, name)
);
CREATE INDEX segments_building ON segments (id) WHERE building_version IS NOT NULL;

-- Every applied document, exactly as written.
CREATE TABLE segment_versions (
    segment_id      bigint      NOT NULL REFERENCES segments (id) ON DELETE CASCADE,
    version         integer     NOT NULL,
    yaml            text        NOT NULL,
    description     text        NOT NULL,
    event_names     text[]      NOT NULL,
    depends_on      text[]      NOT NULL,
    time_dependent  boolean     NOT NULL,
    created_at      timestamptz NOT NULL,
    ready_at        timestamptz,
    PRIMARY KEY (segment_id, version)
);

-- Event selectors (event name + property filters + summed value) that some segment reads.
-- A selector's aggregates are first backfilled from the event log ('backfilling'), then
-- kept current by the event consumer ('ready').
CREATE TABLE selectors (
    workspace_id  text        NOT NULL,
    id            bigint      NOT NULL,
    event_name    text        NOT NULL,
    definition    jsonb       NOT NULL,
    status        text        NOT NULL CHECK (status IN ('backfilling', 'ready')),
    created_at    timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, id)
);

-- Per customer and selector, the daily series: one entry per UTC day with matching events
-- (day number since 1970-01-01, event count, sum of the selector's value), and the time of
-- the latest matching event. A window is a sum over days, never a scan of raw events.
CREATE TABLE aggregates (
    workspace_id  text               NOT NULL,
    selector_id   bigint             NOT NULL,
    person        text               NOT NULL,
    days          integer[]          NOT NULL,
    counts        integer[]          NOT NULL,
    sums          double precision[] NOT NULL,
    last_at       timestamptz,
    PRIMARY KEY (workspace_id, person, selector_id)
);

-- Everyone segmentation knows (from events or profile updates): the profile's attributes
-- and traits as last announced, and when time alone could next change a membership.
CREATE TABLE people (
    workspace_id  text        NOT NULL,
    person        text        NOT NULL,
    attributes    jsonb       NOT NULL DEFAULT '{}',
    traits        jsonb       NOT NULL DEFAULT '{}',
    profile_at    timestamptz,
    wake_at       timestamptz,
    touched_at    timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, person)
);
CREATE INDEX people_wake ON people (wake_at) WHERE wake_at IS NOT NULL;
CREATE INDEX people_touched ON people (workspace_id, touched_at);

-- Members per segment version. A new version is filled beside the answering one and
-- replaces it at the switch; the old version's rows are deleted afterwards.
CREATE TABLE memberships (
    segment_id  bigint      NOT NULL,
    version     integer     NOT NULL,
    person      text        NOT NULL,
    entered_at  timestamptz NOT NULL,
    PRIMARY KEY (segment_id, version, person)
);

-- Events the consumer has applied (dedup of redeliveries; the backfill of a new selector
-- counts exactly these, so that no event is counted twice or missed).
CREATE TABLE seen_events (
    workspace_id  text        NOT NULL,
    message_id    text        NOT NULL,
    received_at   timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, message_id)
);

-- Transactional outbox of segment.entered / segment.exited.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL,
    message_id   text        NOT NULL,
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
