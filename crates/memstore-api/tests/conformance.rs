//! The reference store runs the whole conformance suite, and the cases of its
//! `approximate` form too (an exact store must pass them with recall 1).

memstore_api::conformance_suite!(memstore_api::testkit::InMemoryHarness::new());

mod approximate_cases {
    use memstore_api::testkit::{InMemoryHarness, cases};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn search_approximate_recall() {
        cases::search_approximate_recall(&InMemoryHarness::new).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn search_approximate_ties_and_filters() {
        cases::search_approximate_ties_and_filters(&InMemoryHarness::new).await;
    }
}
