//! Finds DuckDB's C library for linking (unless the `bundled` feature compiles
//! it from source): `$DUCKDB_LIB_DIR`, else the cache that
//! `scripts/fetch-libduckdb.sh` fills (`~/.cache/memstore/libduckdb-1.4.1`).
//! The library is linked into this build's output directory and its search
//! path emitted from there, so `cargo test` / `cargo run` of this crate and of
//! crates that depend on it find it at run time without `LD_LIBRARY_PATH`
//! (Cargo adds link-search paths inside the target directory to the dynamic
//! library path); this crate's own binaries and tests also get an rpath.

use std::path::PathBuf;

const VERSION: &str = "1.4.1";

fn main() {
    println!("cargo:rerun-if-env-changed=DUCKDB_LIB_DIR");
    println!("cargo:rerun-if-env-changed=HOME");
    if std::env::var_os("CARGO_FEATURE_BUNDLED").is_some() {
        return;
    }
    let dir = match std::env::var_os("DUCKDB_LIB_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            home.join(".cache/memstore").join(format!("libduckdb-{VERSION}"))
        }
    };
    let lib = dir.join("libduckdb.so");
    println!("cargo:rerun-if-changed={}", lib.display());
    if !lib.is_file() {
        panic!(
            "memstore-duckdb links DuckDB {VERSION}'s C library and did not find {}.\n\
             Fetch the prebuilt library (about 2 seconds, from the npm registry): scripts/fetch-libduckdb.sh\n\
             or set DUCKDB_LIB_DIR to a directory holding libduckdb.so {VERSION},\n\
             or build with --features bundled (compiles DuckDB from source, ~30 CPU-minutes).",
            lib.display()
        );
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("lib");
    std::fs::create_dir_all(&out).expect("create the output lib directory");
    let target = out.join("libduckdb.so");
    let _ = std::fs::remove_file(&target);
    if std::fs::hard_link(&lib, &target).is_err() {
        std::fs::copy(&lib, &target).expect("copy libduckdb.so into the build output");
    }
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", out.display());
}
