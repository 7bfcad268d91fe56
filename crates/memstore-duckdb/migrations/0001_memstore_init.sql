-- memstore schema v1 (DuckDB). Applied by memstore-duckdb when it creates a
-- store; {key_dim} and {value_dim} are replaced by the store's dimensions
-- (integers) before it runs. (sqlx's migrator, which applies the SQLite schema
-- in the parent directory, ignores this subdirectory.)
-- Keys and values are fixed-size FLOAT arrays, so exact kNN works in plain SQL:
--   SELECT id, array_distance(key, ?::FLOAT[{key_dim}]) AS d FROM memories ORDER BY d LIMIT 8
-- Integers that are u64 in Rust (ids, ticks, counts) are stored bit for bit as
-- BIGINT. There are no foreign keys or cascades (DuckDB checks constraints
-- eagerly within a transaction); the backend deletes tag rows with their memory.

CREATE TABLE memstore_schema (version INTEGER NOT NULL);
INSERT INTO memstore_schema VALUES (1);

CREATE TABLE memstore_config (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    key_dim     BIGINT  NOT NULL,
    value_dim   BIGINT  NOT NULL,
    metric      VARCHAR NOT NULL,
    capacity    BIGINT,
    lrfu_lambda DOUBLE  NOT NULL,
    novelty     DOUBLE  NOT NULL,
    recombine   DOUBLE  NOT NULL
);

CREATE TABLE memstore_meta (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    next_id    BIGINT NOT NULL,
    inserted   BIGINT NOT NULL,
    merged     BIGINT NOT NULL,
    evicted    BIGINT NOT NULL,
    deleted    BIGINT NOT NULL,
    last_batch BIGINT NOT NULL
);

CREATE TABLE memories (
    id           BIGINT  NOT NULL,
    key          FLOAT[{key_dim}]   NOT NULL,
    value        FLOAT[{value_dim}] NOT NULL,
    created      BIGINT  NOT NULL,
    last_access  BIGINT  NOT NULL,
    access_count BIGINT  NOT NULL,
    crf          DOUBLE  NOT NULL,
    -- log2(crf) + lambda * last_access: its order is the LRFU eviction order.
    priority     DOUBLE  NOT NULL
);

CREATE TABLE tags (
    id   BIGINT  PRIMARY KEY,
    name VARCHAR NOT NULL UNIQUE
);

CREATE TABLE memory_tags (
    memory_id BIGINT NOT NULL,
    tag_id    BIGINT NOT NULL,
    count     BIGINT NOT NULL CHECK (count > 0)
);

-- Staging tables for batched updates: filled by the Appender inside a write
-- transaction, joined by one UPDATE, emptied before the commit (always empty
-- in a committed state).
CREATE TABLE memstore_stage_access (
    id           BIGINT NOT NULL,
    last_access  BIGINT NOT NULL,
    access_count BIGINT NOT NULL,
    crf          DOUBLE NOT NULL,
    priority     DOUBLE NOT NULL
);
CREATE TABLE memstore_stage_values (
    id    BIGINT NOT NULL,
    value FLOAT[{value_dim}] NOT NULL
);
CREATE TABLE memstore_stage_ids (id BIGINT NOT NULL);

INSERT INTO memstore_meta VALUES (1, 1, 0, 0, 0, 0, 0);
