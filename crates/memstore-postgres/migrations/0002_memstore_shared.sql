-- memstore schema v2: many clients, one store. Every write of a client
-- takes the meta row's lock and raises `memstore_meta.version` by one (the
-- store's version counts commits) and sets the transaction-local setting
-- `memstore.version` to the new value; the triggers below stamp every row
-- it inserts or updates with that version and log every row it deletes, so
-- that another client brings its in-process index up to date by reading
-- only what changed since the version its index reflects.

ALTER TABLE memstore_meta
    ADD COLUMN version   bigint NOT NULL DEFAULT 0,
    -- Deletions logged at versions up to `log_floor` may have been pruned:
    -- a client whose index is older reloads the store whole.
    ADD COLUMN log_floor bigint NOT NULL DEFAULT 0;

ALTER TABLE memories ADD COLUMN version bigint NOT NULL DEFAULT 0;
CREATE INDEX memories_by_version ON memories (version);

CREATE TABLE memstore_deleted (
    id      bigint NOT NULL,
    version bigint NOT NULL
);
CREATE INDEX memstore_deleted_by_version ON memstore_deleted (version);

-- The version of the write in progress; a write that did not go through
-- memstore (no version set) is refused, since no client's index would see it.
CREATE FUNCTION memstore_write_version() RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v text := current_setting('memstore.version', true);
BEGIN
    IF v IS NULL OR v = '' THEN
        RAISE EXCEPTION 'memstore rows are written through memstore (memstore.version is not set)';
    END IF;
    RETURN v::bigint;
END $$;

-- Per row, so inlined (no function call, no search_path switch).
CREATE FUNCTION memstore_stamp() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v text := current_setting('memstore.version', true);
BEGIN
    IF v IS NULL OR v = '' THEN
        RAISE EXCEPTION 'memstore rows are written through memstore (memstore.version is not set)';
    END IF;
    NEW.version := v::bigint;
    RETURN NEW;
END $$;

CREATE TRIGGER memories_stamp BEFORE INSERT OR UPDATE ON memories
    FOR EACH ROW EXECUTE FUNCTION memstore_stamp();

CREATE FUNCTION memstore_log_deleted() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO memstore_deleted (id, version)
        SELECT id, memstore_write_version() FROM gone;
    RETURN NULL;
END $$;

CREATE TRIGGER memories_deleted AFTER DELETE ON memories
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION memstore_log_deleted();

-- A memory whose tag rows change (without a change of its own row) is
-- stamped too, so that clients re-read its tags.
CREATE FUNCTION memstore_stamp_tagged() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v bigint := memstore_write_version();
BEGIN
    UPDATE memories SET version = v
        WHERE id IN (SELECT memory_id FROM changed) AND version <> v;
    RETURN NULL;
END $$;

CREATE TRIGGER memory_tags_added AFTER INSERT ON memory_tags
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION memstore_stamp_tagged();

CREATE TRIGGER memory_tags_removed AFTER DELETE ON memory_tags
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION memstore_stamp_tagged();
