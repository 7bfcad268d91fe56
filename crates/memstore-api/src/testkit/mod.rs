//! The conformance suite: one set of async tests that every backend runs
//! unchanged, as Burn's `burn-backend-tests` does for its backends.
//!
//! A backend provides a [`Harness`] (a place where a store can be opened,
//! closed and reopened) and invokes [`conformance_suite!`](crate::conformance_suite)
//! in a test file:
//!
//! ```text
//! memstore_api::conformance_suite!(my_backend::TestHarness::new());
//! ```
//!
//! This expands to one `#[tokio::test]` per case (the test crate needs
//! `tokio` with the `macros` and `rt-multi-thread` features). The cases cover
//! every operation and error class, LRFU eviction against a brute-force model,
//! recombination arithmetic, novelty gating, filtered search, reopen
//! durability, concurrency, and property tests that run random operation
//! sequences against the backend and against [`InMemoryStore`](crate::InMemoryStore)
//! and compare every result.

use std::sync::Mutex;

use async_trait::async_trait;

use crate::{InMemoryStore, MemoryConfig, MemoryStore, Result};

pub mod cases;
pub mod crash;
pub mod util;

/// A location where a store can be opened, closed and opened again.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// The store type under test.
    type Store: MemoryStore + 'static;

    /// Opens the store at this harness's location with `config`, creating it
    /// if absent. Opening an existing store with another dimension or metric
    /// must fail with [`crate::Error::ConfigMismatch`] and change nothing.
    async fn open(&self, config: MemoryConfig) -> Result<Self::Store>;

    /// Closes a store opened here (releasing files, connections, locks).
    async fn close(&self, store: Self::Store) -> Result<()>;
}

/// The harness of the reference store: "closing" parks the store, "opening"
/// takes it back under the new configuration.
#[derive(Default)]
pub struct InMemoryHarness {
    parked: Mutex<Option<InMemoryStore>>,
}

impl InMemoryHarness {
    /// A harness with nothing parked.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Harness for InMemoryHarness {
    type Store = InMemoryStore;

    async fn open(&self, config: MemoryConfig) -> Result<InMemoryStore> {
        let mut slot = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            None => InMemoryStore::new(config),
            Some(s) => {
                if let Err(e) = config.validate().and_then(|_| config.check_compatible(s.config())) {
                    *slot = Some(s);
                    return Err(e);
                }
                s.reconfigure(config)
            }
        }
    }

    async fn close(&self, store: InMemoryStore) -> Result<()> {
        *self.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(store);
        Ok(())
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each calling the
/// case with a closure that makes a fresh harness from `$make`.
///
/// `conformance_suite!(ignore = "why", $make)` marks every case ignored: the
/// form for a suite that needs a server the machine may not have, run
/// explicitly with `--ignored` where the server is.
///
/// `conformance_suite!(approximate: $make)` is the same suite for a store
/// whose search is approximate by design (an HNSW index kind): the cases that
/// demand the exact top-k of random data are replaced by cases that measure
/// recall against brute force and check everything an approximate answer
/// must still get right (exact distances for what it returns, order, no
/// duplicates or deleted ids, filters, k results whenever k match). Every
/// other case runs unchanged.
#[macro_export]
macro_rules! conformance_suite {
    (approximate: $make:expr) => {
        $crate::__conformance_common!([] $make);
        $crate::__conformance_cases!([] $make;
            search_approximate_recall,
            search_approximate_ties_and_filters,
        );
    };
    (ignore = $why:literal, $make:expr) => {
        $crate::__conformance_exact!([#[ignore = $why]] $make);
    };
    ($make:expr) => {
        $crate::__conformance_exact!([] $make);
    };
}

/// The exact suite: the common cases and those that demand the exact top-k.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_exact {
    ($attrs:tt $make:expr) => {
        $crate::__conformance_common!($attrs $make);
        $crate::__conformance_cases!($attrs $make;
            search_l2_matches_brute_force,
            search_cosine_matches_brute_force,
            search_inner_product_matches_brute_force,
            search_large_batch_matches_brute_force,
            search_large_store_single_query,
            search_large_batch_with_ties_and_filters,
            search_large_batch_sees_changes,
            learn_large_batches_match_reference,
            learn_large_output_matches_reference,
            learn_without_recombination_matches_reference,
        );
    };
}

/// The cases that every store runs, exact or approximate.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_common {
    ($attrs:tt $make:expr) => {
        $crate::__conformance_cases!($attrs $make;
            config_is_kept,
            invalid_config_is_rejected,
            reopen_with_other_key_dim_fails,
            reopen_with_other_value_dim_fails,
            reopen_with_other_metric_fails,
            reopen_keeps_everything,
            reopen_with_new_tunables,
            insert_assigns_increasing_ids,
            get_returns_what_was_inserted,
            get_unknown_id_fails,
            insert_empty_batch,
            insert_rejects_key_dim_mismatch,
            insert_rejects_value_dim_mismatch,
            insert_rejects_row_count_mismatch,
            insert_rejects_non_finite,
            insert_rejects_bad_tag_count,
            rejected_batches_change_nothing,
            search_pads_missing_slots,
            search_empty_store,
            search_rejects_k_zero,
            unaddressable_k_is_refused,
            search_rejects_bad_queries,
            search_returns_keys_and_values,
            search_filter_any_returns_k,
            search_filter_all,
            search_filter_unknown_tag_is_empty,
            search_does_not_touch,
            search_breaks_ties_by_id,
            delete_removes_memories,
            delete_unknown_id_changes_nothing,
            update_values_adds_deltas,
            update_values_rejects_bad_input,
            touch_updates_lrfu_bookkeeping,
            touch_unknown_id_changes_nothing,
            learn_into_empty_store_inserts,
            learn_inserts_novel_observations,
            learn_touches_neighbours_between_thresholds,
            learn_merges_near_duplicates,
            learn_rows_see_earlier_rows,
            learn_rejects_bad_input,
            learn_respects_capacity,
            learn_matches_reference_on_clusters,
            evict_lru_order,
            evict_lfu_order,
            evict_matches_lrfu_model,
            evict_below_target_is_noop,
            capacity_evicts_on_insert,
            apply_equals_the_separate_operations,
            apply_rejects_bad_batches,
            apply_respects_capacity,
            apply_keeps_insert_bookkeeping,
            apply_keeps_insert_tags,
            apply_assigns_values_and_tag_counts,
            apply_all_equals_applying_in_order,
            apply_all_of_training_steps_equals_applying_in_order,
            stats_report_totals,
            ids_lists_every_memory,
            flush_keeps_state,
            concurrent_readers_and_writers,
            prop_random_ops_match_reference,
            prop_metrics_match_reference,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($attrs:tt $make:expr; $($name:ident),* $(,)?) => {
        $(
            $crate::__conformance_case!($attrs $make; $name);
        )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_case {
    ([$($attr:tt)*] $make:expr; $name:ident) => {
        $($attr)*
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $crate::testkit::cases::$name(&|| $make).await;
        }
    };
}
