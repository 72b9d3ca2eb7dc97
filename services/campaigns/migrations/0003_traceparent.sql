-- The trace context of the call or message that caused a send request (outbox) or started a
-- journey (journeys), so each step and its send join that trace.
ALTER TABLE outbox ADD COLUMN traceparent text;
ALTER TABLE journeys ADD COLUMN traceparent text;
