-- The dedup table keeps one 16-byte hash per accepted message id instead of two text
-- columns: a third of the index to maintain on every ingested event. The hash is the first
-- 16 bytes of SHA-256("<workspace_id>:<message_id>"), computed by the service.
CREATE TABLE event_ids_hashed (id uuid PRIMARY KEY);
INSERT INTO event_ids_hashed (id)
SELECT encode(substring(sha256(convert_to(workspace_id || ':' || message_id, 'UTF8')) FROM 1 FOR 16), 'hex')::uuid
FROM event_ids
ON CONFLICT DO NOTHING;
DROP TABLE event_ids;
ALTER TABLE event_ids_hashed RENAME TO event_ids;
ALTER INDEX event_ids_hashed_pkey RENAME TO event_ids_pkey;
