//! `IpcStore` runs the conformance suite for approximate stores against a
//! `memstored --index hnsw` process started by the test, through a named store
//! of a daemon serving a directory of them (`--stores DIR`, as
//! `distill_gpt2 --store ipc:SOCKET` uses it). "Close" stops the daemon
//! gracefully (SIGTERM, which must exit 0; it saves the graph) and "open"
//! starts it again (which loads the graph or rebuilds it from the rows).

mod common;

memstore_api::conformance_suite!(approximate: common::DaemonHarness::named_hnsw());
