//! The statements that every sqlx driver runs alike, written once.
//!
//! sqlx's drivers share no trait for what differs between databases in the
//! statements below (placeholders, `rows_affected`, row decoding), so
//! [`sqlx_rows!`](crate::sqlx_rows) expands them inside a driver crate for
//! its concrete database type, as sqlx generates its own per-driver code.
//! Every statement is built with `QueryBuilder` (which writes the
//! database's placeholders) and uses only SQL that SQLite and PostgreSQL
//! both accept: multi-row `VALUES`, `WITH … UPDATE … FROM`, `IN` lists,
//! `ON CONFLICT … RETURNING`. What stays in a driver is how its key and
//! value columns are encoded and decoded, passed in as functions.
//!
//! The tables the statements assume (each driver's migrations create them):
//! `memstore_meta` (one row: `next_id`, lifetime counters, `last_batch`),
//! `memories` (`id`, `key`, `value`, `created`, `last_access`,
//! `access_count`, `crf`, `priority`), `tags` (`id`, unique `name`) and
//! `memory_tags` (`memory_id`, `tag_id`, `count`).

/// Rows per multi-row statement (at most 8 parameters a row: 8,000 per
/// statement, under SQLite's 32,766 and PostgreSQL's 65,535).
pub const CHUNK: usize = 1000;

/// Expands, in a driver crate that depends on sqlx, the shared statements
/// for database `$db`, mapping sqlx errors with `$sql` (a
/// `fn(sqlx::Error) -> memstore_api::Error`):
///
/// - `read_config(tx, extra)` and `write_config(tx, config, create, extra)`:
///   the configuration row, with one driver-specific integer column.
/// - `load_store(tx, config, values, lambda_changed, key, value)`: the
///   index (counters, tags and memories through a
///   [`Loader`](crate::driver::Loader)) and the tag map; `key` and `value`
///   decode column 1 and column 6 of a row of `memories`.
/// - `fetch_values(conn, ids, value)`: the values of `ids` (rows that are
///   not there are left out).
/// - `update_access(tx, updates)`: access bookkeeping and priorities.
/// - `persist(tx, lambda, tag_ids, changes, key, value)`: a plan's changes,
///   returning the tags it created; `key` and `value` encode a column.
#[macro_export]
macro_rules! sqlx_rows {
    ($db:ty, $sql:path) => {
        /// The stored configuration (`None` before the store is created)
        /// and, when `extra` names an integer column of `memstore_config`,
        /// its value.
        async fn read_config(
            tx: &mut sqlx::Transaction<'_, $db>,
            extra: Option<&'static str>,
        ) -> ::memstore_api::Result<Option<(::memstore_api::MemoryConfig, Option<i64>)>> {
            use sqlx::Row as _;
            let mut q = sqlx::QueryBuilder::<$db>::new(
                "SELECT key_dim, value_dim, metric, capacity, lrfu_lambda, novelty, recombine",
            );
            if let Some(column) = extra {
                q.push(", ").push(column);
            }
            q.push(" FROM memstore_config");
            let Some(r) = q.build().fetch_optional(&mut **tx).await.map_err($sql)? else {
                return Ok(None);
            };
            let config = $crate::driver::StoredConfig {
                key_dim: r.try_get(0).map_err($sql)?,
                value_dim: r.try_get(1).map_err($sql)?,
                metric: r.try_get(2).map_err($sql)?,
                capacity: r.try_get(3).map_err($sql)?,
                lrfu_lambda: r.try_get(4).map_err($sql)?,
                novelty: r.try_get(5).map_err($sql)?,
                recombine: r.try_get(6).map_err($sql)?,
            }
            .decode()?;
            let extra = match extra {
                Some(_) => Some(r.try_get::<i64, _>(7).map_err($sql)?),
                None => None,
            };
            Ok(Some((config, extra)))
        }

        /// Writes the configuration row (`create`: inserts it), with
        /// `extra` = (integer column, value) when the driver keeps one more.
        async fn write_config(
            tx: &mut sqlx::Transaction<'_, $db>,
            c: &::memstore_api::MemoryConfig,
            create: bool,
            extra: Option<(&'static str, i64)>,
        ) -> ::memstore_api::Result<()> {
            let row = $crate::driver::StoredConfig::new(c);
            let mut q = sqlx::QueryBuilder::<$db>::new("");
            if create {
                q.push("INSERT INTO memstore_config (key_dim, value_dim, metric, capacity, lrfu_lambda, novelty, recombine");
                if let Some((column, _)) = extra {
                    q.push(", ").push(column);
                }
                q.push(", id) VALUES (");
                let mut sep = q.separated(", ");
                sep.push_bind(row.key_dim)
                    .push_bind(row.value_dim)
                    .push_bind(row.metric)
                    .push_bind(row.capacity)
                    .push_bind(row.lrfu_lambda)
                    .push_bind(row.novelty)
                    .push_bind(row.recombine);
                if let Some((_, v)) = extra {
                    sep.push_bind(v);
                }
                q.push(", 1)");
            } else {
                q.push("UPDATE memstore_config SET key_dim = ").push_bind(row.key_dim);
                q.push(", value_dim = ").push_bind(row.value_dim);
                q.push(", metric = ").push_bind(row.metric);
                q.push(", capacity = ").push_bind(row.capacity);
                q.push(", lrfu_lambda = ").push_bind(row.lrfu_lambda);
                q.push(", novelty = ").push_bind(row.novelty);
                q.push(", recombine = ").push_bind(row.recombine);
                if let Some((column, v)) = extra {
                    q.push(", ").push(column).push(" = ").push_bind(v);
                }
                q.push(" WHERE id = 1");
            }
            q.build().execute(&mut **tx).await.map_err($sql)?;
            Ok(())
        }

        /// Loads the index (with values when `values`) and the tag map, and
        /// rewrites the priorities when `lambda_changed` (they depend on λ).
        async fn load_store(
            tx: &mut sqlx::Transaction<'_, $db>,
            config: &::memstore_api::MemoryConfig,
            values: bool,
            lambda_changed: bool,
            key: impl Fn(&<$db as sqlx::Database>::Row, i64) -> ::memstore_api::Result<Vec<f32>>,
            value: impl Fn(&<$db as sqlx::Database>::Row, i64) -> ::memstore_api::Result<Vec<f32>>,
        ) -> ::memstore_api::Result<($crate::MemoryIndex, std::collections::HashMap<String, i64>)> {
            let index = load_rows(tx, config, values, key, value).await?;
            if lambda_changed {
                update_access(tx, &$crate::driver::reprioritised(&index)).await?;
            }
            Ok((index, load_tag_ids(tx).await?))
        }

        /// Reads the counters, tags and memories of the store into an index.
        async fn load_rows(
            tx: &mut sqlx::Transaction<'_, $db>,
            config: &::memstore_api::MemoryConfig,
            values: bool,
            key: impl Fn(&<$db as sqlx::Database>::Row, i64) -> ::memstore_api::Result<Vec<f32>>,
            value: impl Fn(&<$db as sqlx::Database>::Row, i64) -> ::memstore_api::Result<Vec<f32>>,
        ) -> ::memstore_api::Result<$crate::MemoryIndex> {
            use sqlx::Row as _;
            let mut loader = $crate::driver::Loader::new(config, values);
            let meta = sqlx::query(
                "SELECT next_id, inserted, merged, evicted, deleted, last_batch FROM memstore_meta WHERE id = 1",
            )
            .fetch_optional(&mut **tx)
            .await
            .map_err($sql)?
            .ok_or_else(|| ::memstore_api::Error::Corrupt("memstore_meta row is missing".into()))?;
            let g = |i: usize| -> ::memstore_api::Result<u64> { Ok(meta.try_get::<i64, _>(i).map_err($sql)? as u64) };
            let counters = ::memstore_api::Counters {
                inserted: g(1)?,
                merged: g(2)?,
                evicted: g(3)?,
                deleted: g(4)?,
                last_batch: g(5)?,
            };
            let next_id: i64 = meta.try_get(0).map_err($sql)?;
            let rows = sqlx::query(
                "SELECT mt.memory_id, t.name, mt.count FROM memory_tags mt JOIN tags t ON t.id = mt.tag_id",
            )
            .fetch_all(&mut **tx)
            .await
            .map_err($sql)?;
            for r in rows {
                loader.tag(
                    r.try_get(0).map_err($sql)?,
                    r.try_get(1).map_err($sql)?,
                    r.try_get(2).map_err($sql)?,
                );
            }
            let select = if values {
                "SELECT id, key, created, last_access, access_count, crf, value FROM memories"
            } else {
                "SELECT id, key, created, last_access, access_count, crf FROM memories"
            };
            for r in sqlx::query(select).fetch_all(&mut **tx).await.map_err($sql)? {
                let id: i64 = r.try_get(0).map_err($sql)?;
                let k = key(&r, id)?;
                let v = if values { Some(value(&r, id)?) } else { None };
                loader.memory(
                    id,
                    &k,
                    v.as_deref(),
                    r.try_get(2).map_err($sql)?,
                    r.try_get(3).map_err($sql)?,
                    r.try_get(4).map_err($sql)?,
                    r.try_get(5).map_err($sql)?,
                )?;
            }
            loader.finish(next_id, counters)
        }

        /// The committed tags' names and row ids.
        async fn load_tag_ids(
            tx: &mut sqlx::Transaction<'_, $db>,
        ) -> ::memstore_api::Result<std::collections::HashMap<String, i64>> {
            use sqlx::Row as _;
            let mut tags = std::collections::HashMap::new();
            for row in sqlx::query("SELECT id, name FROM tags")
                .fetch_all(&mut **tx)
                .await
                .map_err($sql)?
            {
                tags.insert(
                    row.try_get::<String, _>(1).map_err($sql)?,
                    row.try_get::<i64, _>(0).map_err($sql)?,
                );
            }
            Ok(tags)
        }

        /// The committed values of `ids`; `value` decodes column 1 of a row.
        async fn fetch_values<'c, E>(
            conn: E,
            ids: &[::memstore_api::MemoryId],
            value: impl Fn(&<$db as sqlx::Database>::Row, i64) -> ::memstore_api::Result<Vec<f32>>,
        ) -> ::memstore_api::Result<std::collections::HashMap<::memstore_api::MemoryId, Vec<f32>>>
        where
            E: sqlx::Executor<'c, Database = $db> + Copy,
        {
            use sqlx::Row as _;
            let mut out = std::collections::HashMap::with_capacity(ids.len());
            for chunk in ids.chunks($crate::sqlx_rows::CHUNK) {
                let mut q = sqlx::QueryBuilder::<$db>::new("SELECT id, value FROM memories WHERE id IN (");
                let mut sep = q.separated(", ");
                for id in chunk {
                    sep.push_bind(*id as i64);
                }
                q.push(")");
                for r in q.build().fetch_all(conn).await.map_err($sql)? {
                    let id: i64 = r.try_get(0).map_err($sql)?;
                    out.insert(id as u64, value(&r, id)?);
                }
            }
            Ok(out)
        }

        /// Rewrites access rows (bookkeeping and priority), one statement a chunk.
        async fn update_access(
            tx: &mut sqlx::Transaction<'_, $db>,
            updates: &[$crate::index::AccessUpdate],
        ) -> ::memstore_api::Result<()> {
            for chunk in updates.chunks($crate::sqlx_rows::CHUNK) {
                let mut q =
                    sqlx::QueryBuilder::<$db>::new("WITH v (id, last_access, access_count, crf, priority) AS (");
                q.push_values(chunk, |mut b, u| {
                    b.push_bind(u.id as i64)
                        .push_bind(u.last_access as i64)
                        .push_bind(u.access_count as i64)
                        .push_bind(u.crf)
                        .push_bind(u.priority);
                });
                q.push(
                    ") UPDATE memories SET last_access = v.last_access, access_count = v.access_count, crf = v.crf, \
                     priority = v.priority FROM v WHERE memories.id = v.id",
                );
                let done = q.build().execute(&mut **tx).await.map_err($sql)?;
                $crate::driver::expect_rows(done.rows_affected(), "access update", chunk.len())?;
            }
            Ok(())
        }

        /// `DELETE FROM {table} WHERE {column} IN (ids)`; returns the rows deleted.
        async fn delete_in(
            tx: &mut sqlx::Transaction<'_, $db>,
            table_column: &'static str,
            ids: &[i64],
        ) -> ::memstore_api::Result<u64> {
            let mut deleted = 0;
            for chunk in ids.chunks($crate::sqlx_rows::CHUNK) {
                let mut q = sqlx::QueryBuilder::<$db>::new("DELETE FROM ");
                q.push(table_column).push(" IN (");
                let mut sep = q.separated(", ");
                for id in chunk {
                    sep.push_bind(*id);
                }
                q.push(")");
                deleted += q.build().execute(&mut **tx).await.map_err($sql)?.rows_affected();
            }
            Ok(deleted)
        }

        /// Writes a plan's changes inside `tx`; `key` and `value` encode the
        /// key and value columns. Returns the tags created (their ids become
        /// valid only once the transaction commits).
        async fn persist<K, V>(
            tx: &mut sqlx::Transaction<'_, $db>,
            lambda: f64,
            tag_ids: &std::collections::HashMap<String, i64>,
            ch: &$crate::index::Changes,
            key: impl Fn(&[f32]) -> K,
            value: impl Fn(&[f32]) -> V,
        ) -> ::memstore_api::Result<std::collections::HashMap<String, i64>>
        where
            K: for<'q> sqlx::Encode<'q, $db> + sqlx::Type<$db>,
            V: for<'q> sqlx::Encode<'q, $db> + sqlx::Type<$db>,
        {
            let removed: Vec<i64> = ch.removed.iter().map(|&id| id as i64).collect();
            let done = delete_in(tx, "memories WHERE id", &removed).await?;
            $crate::driver::expect_rows(done, "delete", removed.len())?;
            // A memory whose access and value both changed is rewritten by
            // one statement, not two (a training step changes both for
            // most of the memories it touches, and each rewrite of a row
            // costs its whole record).
            let new_value: std::collections::HashMap<u64, &[f32]> =
                ch.values.iter().map(|(id, v)| (*id, v.as_slice())).collect();
            let (both, access_only): (Vec<$crate::index::AccessUpdate>, Vec<$crate::index::AccessUpdate>) =
                ch.accessed.iter().partition(|u| new_value.contains_key(&u.id));
            update_access(tx, &access_only).await?;
            for chunk in both.chunks($crate::sqlx_rows::CHUNK) {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "WITH v (id, last_access, access_count, crf, priority, value) AS (",
                );
                q.push_values(chunk, |mut b, u| {
                    b.push_bind(u.id as i64)
                        .push_bind(u.last_access as i64)
                        .push_bind(u.access_count as i64)
                        .push_bind(u.crf)
                        .push_bind(u.priority)
                        .push_bind(value(new_value.get(&u.id).copied().unwrap_or_default()));
                });
                q.push(
                    ") UPDATE memories SET last_access = v.last_access, access_count = v.access_count, crf = v.crf, \
                     priority = v.priority, value = v.value FROM v WHERE memories.id = v.id",
                );
                let done = q.build().execute(&mut **tx).await.map_err($sql)?;
                $crate::driver::expect_rows(done.rows_affected(), "access and value update", chunk.len())?;
            }
            let accessed: std::collections::HashSet<u64> = both.iter().map(|u| u.id).collect();
            let values_only: Vec<&(u64, Vec<f32>)> =
                ch.values.iter().filter(|(id, _)| !accessed.contains(id)).collect();
            for chunk in values_only.chunks($crate::sqlx_rows::CHUNK) {
                let mut q = sqlx::QueryBuilder::<$db>::new("WITH v (id, value) AS (");
                q.push_values(chunk, |mut b, (id, v)| {
                    b.push_bind(*id as i64).push_bind(value(v));
                });
                q.push(") UPDATE memories SET value = v.value FROM v WHERE memories.id = v.id");
                let done = q.build().execute(&mut **tx).await.map_err($sql)?;
                $crate::driver::expect_rows(done.rows_affected(), "value update", chunk.len())?;
            }
            // Retagged memories get their tag rows rewritten whole.
            let retagged: Vec<i64> = ch.retagged.iter().map(|(id, _)| *id as i64).collect();
            delete_in(tx, "memory_tags WHERE memory_id", &retagged).await?;
            let mut new_tags: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
            let mut tag_rows: Vec<(i64, i64, i64)> = Vec::new();
            for (id, tags) in ch.tag_rows() {
                for (t, c) in tags {
                    let tid = match tag_ids.get(t).or_else(|| new_tags.get(t)) {
                        Some(&tid) => tid,
                        None => {
                            let mut q = sqlx::QueryBuilder::<$db>::new("INSERT INTO tags (name) VALUES (");
                            q.push_bind(t.as_str());
                            q.push(") ON CONFLICT (name) DO UPDATE SET name = excluded.name RETURNING id");
                            let tid: i64 = q.build_query_scalar().fetch_one(&mut **tx).await.map_err($sql)?;
                            new_tags.insert(t.clone(), tid);
                            tid
                        }
                    };
                    tag_rows.push((id as i64, tid, *c as i64));
                }
            }
            for chunk in ch.inserted.chunks($crate::sqlx_rows::CHUNK) {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO memories (id, key, value, created, last_access, access_count, crf, priority) ",
                );
                q.push_values(chunk, |mut b, m: &::memstore_api::Memory| {
                    b.push_bind(m.id as i64)
                        .push_bind(key(&m.key))
                        .push_bind(value(&m.value))
                        .push_bind(m.created as i64)
                        .push_bind(m.last_access as i64)
                        .push_bind(m.access_count as i64)
                        .push_bind(m.crf)
                        .push_bind(::memstore_api::math::priority(lambda, m.crf, m.last_access));
                });
                q.build().execute(&mut **tx).await.map_err($sql)?;
            }
            for chunk in tag_rows.chunks($crate::sqlx_rows::CHUNK * 2) {
                let mut q = sqlx::QueryBuilder::<$db>::new("INSERT INTO memory_tags (memory_id, tag_id, count) ");
                q.push_values(chunk, |mut b, r| {
                    b.push_bind(r.0).push_bind(r.1).push_bind(r.2);
                });
                q.build().execute(&mut **tx).await.map_err($sql)?;
            }
            let c = ch.counters;
            let mut q = sqlx::QueryBuilder::<$db>::new("UPDATE memstore_meta SET next_id = ");
            q.push_bind(ch.next_id as i64);
            q.push(", inserted = ").push_bind(c.inserted as i64);
            q.push(", merged = ").push_bind(c.merged as i64);
            q.push(", evicted = ").push_bind(c.evicted as i64);
            q.push(", deleted = ").push_bind(c.deleted as i64);
            q.push(", last_batch = ").push_bind(c.last_batch as i64);
            q.push(" WHERE id = 1");
            q.build().execute(&mut **tx).await.map_err($sql)?;
            Ok(new_tags)
        }
    };
}
