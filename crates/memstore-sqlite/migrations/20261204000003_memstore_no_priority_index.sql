-- memstore schema v3: no index on `memories.priority`. Eviction is planned
-- by the store's in-process index, never by SQL, and every access rewrites
-- a memory's priority: keeping the index cost a fifth of the time of
-- writing a training step's accesses and value updates (65,536 rows). The
-- column stays, so `ORDER BY priority, id` still lists the LRFU eviction
-- order (by a scan).
DROP INDEX IF EXISTS memories_by_priority;
