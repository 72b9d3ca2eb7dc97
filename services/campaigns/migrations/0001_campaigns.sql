-- The campaigns service's schema: flows and their versions, journeys (durable timers),
-- broadcasts and their recipients, the guardrails' counters, the activity the flows react
-- to, the outcome of every message (for the report), and the outbox of send requests.

-- Every applied version of every flow.
CREATE TABLE flow_versions (
    workspace_id text NOT NULL,
    name text NOT NULL,
    version integer NOT NULL,
    yaml text NOT NULL,
    -- The parsed definition (domain::model::FlowDef): journeys run on exactly this.
    definition jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, name, version)
);

-- One row per flow: its newest version and where it is in its life cycle.
CREATE TABLE flows (
    workspace_id text NOT NULL,
    name text NOT NULL,
    latest_version integer NOT NULL,
    -- 1 active, 2 paused, 3 archived (relance.v1.FlowStatus).
    status smallint NOT NULL,
    -- 1 event, 2 segment entered, 3 schedule (relance.v1.FlowTriggerKind).
    trigger_kind smallint NOT NULL,
    -- The event name or segment name that starts journeys (for the consumer's lookup).
    trigger_subject text NOT NULL,
    -- For a schedule trigger: the next occurrence to run.
    next_run_at timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    paused_at timestamptz,
    archived_at timestamptz,
    PRIMARY KEY (workspace_id, name)
);
CREATE INDEX flows_schedule_due ON flows (next_run_at) WHERE next_run_at IS NOT NULL AND status = 1;

-- One customer's run through one flow version.
CREATE TABLE journeys (
    id uuid PRIMARY KEY,
    workspace_id text NOT NULL,
    flow text NOT NULL,
    flow_version integer NOT NULL,
    customer_id text NOT NULL,
    -- What started it (the event's id, the segment change's id, the schedule run): a
    -- redelivered trigger starts nothing.
    trigger_id text NOT NULL,
    -- 1 active, 2 held (paused before a send), 3 ended (relance.v1.JourneyStatus).
    status smallint NOT NULL,
    end_reason smallint,
    control boolean NOT NULL,
    -- domain::journey::JourneyState: position, phase, seq, variants.
    state jsonb NOT NULL,
    -- The event a wait step is waiting for, so that event wakes the journey at once.
    waiting_event text,
    -- When a worker next runs it; NULL when held or ended.
    next_wake_at timestamptz,
    -- Properties of the trigger event, available to templates as `data.trigger`.
    trigger_data jsonb NOT NULL DEFAULT '{}',
    entered_at timestamptz NOT NULL,
    ended_at timestamptz,
    updated_at timestamptz NOT NULL,
    UNIQUE (workspace_id, flow, trigger_id)
);
-- At most one running journey per customer and flow.
CREATE UNIQUE INDEX journeys_running ON journeys (workspace_id, flow, customer_id) WHERE status IN (1, 2);
-- The timer wheel: workers claim due journeys in wake order.
CREATE INDEX journeys_due ON journeys (next_wake_at) WHERE status = 1;
CREATE INDEX journeys_customer ON journeys (workspace_id, customer_id, entered_at);
CREATE INDEX journeys_flow ON journeys (workspace_id, flow, entered_at);
CREATE INDEX journeys_waiting ON journeys (workspace_id, customer_id, waiting_event) WHERE waiting_event IS NOT NULL;

-- Each step a journey reached (the report's `entered` per step).
CREATE TABLE step_visits (
    journey_id uuid NOT NULL,
    seq integer NOT NULL,
    workspace_id text NOT NULL,
    flow text NOT NULL,
    step text NOT NULL,
    at timestamptz NOT NULL,
    PRIMARY KEY (journey_id, seq)
);
CREATE INDEX step_visits_flow ON step_visits (workspace_id, flow, at);

-- Every send request campaigns queued, by its idempotency key: what delivery must have
-- received exactly once.
CREATE TABLE sends (
    workspace_id text NOT NULL,
    idempotency_key text NOT NULL,
    journey_id uuid,
    flow text NOT NULL DEFAULT '',
    flow_version integer NOT NULL DEFAULT 0,
    broadcast text NOT NULL DEFAULT '',
    step text NOT NULL DEFAULT '',
    variant text NOT NULL DEFAULT '',
    channel text NOT NULL,
    customer_id text NOT NULL,
    at timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, idempotency_key)
);
CREATE INDEX sends_flow ON sends (workspace_id, flow, at);
CREATE INDEX sends_broadcast ON sends (workspace_id, broadcast, at) WHERE broadcast <> '';

-- Sends the guardrails held or dropped: 1 deferred by a cap, 2 skipped by a cap,
-- 3 deferred by quiet hours.
CREATE TABLE guard_events (
    workspace_id text NOT NULL,
    flow text NOT NULL DEFAULT '',
    broadcast text NOT NULL DEFAULT '',
    step text NOT NULL DEFAULT '',
    journey_id text NOT NULL,
    customer_id text NOT NULL,
    kind smallint NOT NULL,
    channel text NOT NULL,
    at timestamptz NOT NULL
);
CREATE INDEX guard_events_campaign ON guard_events (workspace_id, flow, broadcast, at);

-- Frequency-cap counters: marketing messages per customer, scope (`all` or a channel) and
-- local period (`d2026-11-30`, `w2026-11-30`).
CREATE TABLE cap_counters (
    workspace_id text NOT NULL,
    customer_id text NOT NULL,
    scope text NOT NULL,
    period_key text NOT NULL,
    count integer NOT NULL,
    -- Past this, the counter can no longer matter and is purged.
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, customer_id, scope, period_key)
);
CREATE INDEX cap_counters_expiry ON cap_counters (expires_at);

-- Per workspace: frequency caps and quiet hours (JSON of domain::guard types).
CREATE TABLE workspace_settings (
    workspace_id text PRIMARY KEY,
    caps jsonb,
    caps_updated_at timestamptz,
    quiet_hours jsonb,
    quiet_hours_updated_at timestamptz
);

-- What customers did that flows react to (triggers, goals, waits, branches, conversions,
-- best time), kept from the event stream.
CREATE TABLE activity (
    workspace_id text NOT NULL,
    event_id text NOT NULL,
    customer_id text NOT NULL,
    name text NOT NULL,
    at timestamptz NOT NULL,
    properties jsonb NOT NULL,
    revenue double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, event_id)
);
CREATE INDEX activity_customer ON activity (workspace_id, customer_id, at);
CREATE INDEX activity_name ON activity (workspace_id, name, at);

-- The outcome of each campaign message, from delivery's message_* events.
CREATE TABLE messages (
    workspace_id text NOT NULL,
    message_id text NOT NULL,
    journey_id text NOT NULL DEFAULT '',
    flow text NOT NULL DEFAULT '',
    flow_version integer NOT NULL DEFAULT 0,
    broadcast text NOT NULL DEFAULT '',
    step text NOT NULL DEFAULT '',
    variant text NOT NULL DEFAULT '',
    channel text NOT NULL DEFAULT '',
    customer_id text NOT NULL DEFAULT '',
    -- 1 sent, 2 skipped, 3 failed; NULL until the outcome arrives (an open can come first).
    status smallint,
    at timestamptz,
    delivered boolean NOT NULL DEFAULT false,
    opened boolean NOT NULL DEFAULT false,
    clicked boolean NOT NULL DEFAULT false,
    PRIMARY KEY (workspace_id, message_id)
);
CREATE INDEX messages_flow ON messages (workspace_id, flow, at) WHERE flow <> '';
CREATE INDEX messages_broadcast ON messages (workspace_id, broadcast, at) WHERE broadcast <> '';

-- Broadcasts: one row each, its current version's definition.
CREATE TABLE broadcasts (
    workspace_id text NOT NULL,
    name text NOT NULL,
    version integer NOT NULL,
    -- domain::model::BroadcastDef
    definition jsonb NOT NULL,
    yaml text NOT NULL DEFAULT '',
    -- 1 scheduled, 2 sending, 3 completed, 4 cancelled (relance.v1.BroadcastStatus).
    status smallint NOT NULL,
    -- When the next run (or its first wave) starts; NULL when none is left.
    next_run_at timestamptz,
    -- The run being sent (0 before the first).
    run integer NOT NULL DEFAULT 0,
    -- The run's nominal time (for local-time runs: the occurrence at UTC+14).
    run_at timestamptz,
    -- 0: the run's audience is being taken; 1: its recipients are being sent.
    run_state smallint NOT NULL DEFAULT 0,
    audience_size bigint NOT NULL DEFAULT 0,
    queued bigint NOT NULL DEFAULT 0,
    control bigint NOT NULL DEFAULT 0,
    capped bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL,
    started_at timestamptz,
    ended_at timestamptz,
    PRIMARY KEY (workspace_id, name)
);
CREATE INDEX broadcasts_due ON broadcasts (next_run_at) WHERE next_run_at IS NOT NULL AND status IN (1, 2);

-- One row per customer of a broadcast run: when it is due (its wave) and what became of it.
CREATE TABLE broadcast_recipients (
    workspace_id text NOT NULL,
    broadcast text NOT NULL,
    run integer NOT NULL,
    customer_id text NOT NULL,
    due_at timestamptz NOT NULL,
    -- When first due (a deferral keeps it).
    first_due_at timestamptz NOT NULL,
    -- 0 pending, 1 queued, 2 control, 3 skipped by a cap, 4 skipped (past its local time),
    -- 5 cancelled.
    state smallint NOT NULL DEFAULT 0,
    variant text NOT NULL DEFAULT '',
    PRIMARY KEY (workspace_id, broadcast, run, customer_id)
);
CREATE INDEX broadcast_recipients_due ON broadcast_recipients (due_at) WHERE state = 0;

CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    exchange text NOT NULL,
    routing_key text NOT NULL,
    message_id text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
