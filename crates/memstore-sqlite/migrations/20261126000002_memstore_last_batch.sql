-- memstore schema v2: the sequence number of the last change batch applied
-- (`MemoryStore::apply`), written in the same transaction as the batch, so a
-- writer's journal replays exactly the batches above it.
ALTER TABLE memstore_meta ADD COLUMN last_batch INTEGER NOT NULL DEFAULT 0;
