-- memstore schema v1 (SQLite). Applied by sqlx's migrator from memstore-sqlite.
-- Keys and values are little-endian f32 blobs; integers that are u64 in Rust
-- (ids, ticks, counts) are stored bit-for-bit as SQLite's signed 64-bit INTEGER.
-- The key-dimension-specific vec0 table (`memory_keys`, for ad-hoc SQL kNN)
-- is created by the backend on first open, since its dimension is a parameter.

CREATE TABLE memstore_config (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    key_dim     INTEGER NOT NULL,
    value_dim   INTEGER NOT NULL,
    metric      TEXT    NOT NULL,
    capacity    INTEGER,
    lrfu_lambda REAL    NOT NULL,
    novelty     REAL    NOT NULL,
    recombine   REAL    NOT NULL,
    sql_knn     INTEGER NOT NULL
);

CREATE TABLE memstore_meta (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    next_id  INTEGER NOT NULL,
    inserted INTEGER NOT NULL,
    merged   INTEGER NOT NULL,
    evicted  INTEGER NOT NULL,
    deleted  INTEGER NOT NULL
);

CREATE TABLE memories (
    id           INTEGER PRIMARY KEY,
    key          BLOB    NOT NULL,
    value        BLOB    NOT NULL,
    created      INTEGER NOT NULL,
    last_access  INTEGER NOT NULL,
    access_count INTEGER NOT NULL,
    crf          REAL    NOT NULL,
    -- log2(crf) + lambda * last_access: its order is the LRFU eviction order
    -- at any "now", so eviction is a scan of this index.
    priority     REAL    NOT NULL
);
CREATE INDEX memories_by_priority ON memories (priority, id);

CREATE TABLE tags (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

CREATE TABLE memory_tags (
    memory_id INTEGER NOT NULL REFERENCES memories (id) ON DELETE CASCADE,
    tag_id    INTEGER NOT NULL REFERENCES tags (id),
    count     INTEGER NOT NULL CHECK (count > 0),
    PRIMARY KEY (memory_id, tag_id)
) WITHOUT ROWID;
CREATE INDEX memory_tags_by_tag ON memory_tags (tag_id);
