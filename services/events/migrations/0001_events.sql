-- The event log. Partitioned by month of the event's own time, so old months can be
-- detached or dropped by retention and a time window reads only its months.
--
-- The table is also the outbox of the `relance.events` exchange: every row gets the id of
-- the transaction that wrote it (`xid`), and the relay publishes rows in (xid, seq) order
-- only below the oldest transaction still running, so a row that commits late is never
-- skipped (sequence numbers alone commit out of order).
CREATE SEQUENCE event_seq;

CREATE TABLE events (
    workspace_id  text        NOT NULL,
    seq           bigint      NOT NULL DEFAULT nextval('event_seq'),
    xid           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    message_id    text        NOT NULL,
    name          text        NOT NULL,
    customer_id   text,
    anonymous_id  text,
    ts            timestamptz NOT NULL,
    received_at   timestamptz NOT NULL,
    properties    jsonb       NOT NULL,
    context       jsonb       NOT NULL
) PARTITION BY RANGE (ts);

CREATE INDEX events_relay ON events (xid, seq);
CREATE INDEX events_customer ON events (workspace_id, customer_id, ts DESC) WHERE customer_id IS NOT NULL;
CREATE INDEX events_anonymous ON events (workspace_id, anonymous_id) WHERE anonymous_id IS NOT NULL;

-- Dedup: one row per message id ever accepted. A unique key on the partitioned table would
-- have to include the event time, and a retry without a timestamp would not match.
CREATE TABLE event_ids (
    workspace_id  text        NOT NULL,
    message_id    text        NOT NULL,
    ts            timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, message_id)
);

-- Anonymous ids known to belong to a customer (from profile.merged): events arriving later
-- with only the anonymous id get the customer id at once.
CREATE TABLE identity_links (
    workspace_id  text NOT NULL,
    anonymous_id  text NOT NULL,
    customer_id   text NOT NULL,
    linked_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, anonymous_id)
);
CREATE INDEX identity_links_customer ON identity_links (workspace_id, customer_id);

-- Where the relay stands: the (xid, seq) of the last event it published.
CREATE TABLE relay_cursor (
    id   smallint PRIMARY KEY CHECK (id = 1),
    xid  xid8   NOT NULL,
    seq  bigint NOT NULL
);
INSERT INTO relay_cursor VALUES (1, '0', 0);
