//! `IpcStore` runs the whole conformance suite against a `memstored` process
//! started by the test. "Close" stops the daemon gracefully (SIGTERM, which
//! must exit 0) and "open" starts it again, so every reopen in the suite also
//! checks that a daemon restart loses nothing.

mod common;

memstore_api::conformance_suite!(common::DaemonHarness::plain());
