-- The trace context of the change a message announces, so the relay publishes it in the
-- trace of the call that made the change.
ALTER TABLE outbox ADD COLUMN traceparent text;
