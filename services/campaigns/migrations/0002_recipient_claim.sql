-- Due recipients are claimed per broadcast run in due order: an index with the run's key
-- first answers that claim directly (the due_at-only index left the planner to choose the
-- primary key and sort a whole run when its statistics lagged behind a fresh snapshot).
DROP INDEX IF EXISTS broadcast_recipients_due;
CREATE INDEX broadcast_recipients_claim ON broadcast_recipients (workspace_id, broadcast, run, due_at) WHERE state = 0;
