//! The reference store runs the whole conformance suite.

memstore_api::conformance_suite!(memstore_api::testkit::InMemoryHarness::new());
