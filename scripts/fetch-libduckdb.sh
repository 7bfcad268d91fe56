#!/usr/bin/env bash
# Fetches DuckDB's prebuilt C library (libduckdb.so, MIT licence) from the npm
# registry package @duckdb/node-bindings-linux-<arch> (the build DuckDB's own
# Node.js bindings ship), so that the `duckdb` crate (without its `bundled`
# feature) links to it instead of compiling the bundled DuckDB (measured here:
# ~30 CPU-minutes bundled; 2m28 for a release build of duckdb 1.4.1 + arrow
# linked to this library on 2 cores).
#
# Usage: scripts/fetch-libduckdb.sh   (memstore-duckdb's build.rs finds the cache)
#    or: eval "$(scripts/fetch-libduckdb.sh)"   # also sets DUCKDB_LIB_DIR and LD_LIBRARY_PATH
# The crate version must match the library: duckdb = "=1.4.1" <-> 1.4.1 here.
set -euo pipefail
version="${DUCKDB_VERSION:-1.4.1}"
rev="${DUCKDB_NPM_REV:-r.5}"
dest="${DUCKDB_CACHE:-$HOME/.cache/memstore/libduckdb-$version}"
case "$(uname -m)" in
    x86_64) arch=x64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) echo "no prebuilt libduckdb for $(uname -m); use the bundled build" >&2; exit 1 ;;
esac
if [ ! -s "$dest/libduckdb.so" ]; then
    command -v npm >/dev/null || { echo "npm is needed to fetch libduckdb" >&2; exit 1; }
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent "@duckdb/node-bindings-linux-$arch@$version-$rev" >/dev/null && tar xzf ./*.tgz)
    # The library of the pinned default version must be the one measured here.
    if [ "$version-$rev-$arch" = "1.4.1-r.5-x64" ]; then
        echo "8ab19b64526771019eeb2173a5243116ce7678ff13a1aba61a2e54b61865c0c9  $tmp/package/libduckdb.so" |
            sha256sum --check --quiet - >&2 || { echo "libduckdb.so checksum mismatch" >&2; exit 1; }
    fi
    mkdir -p "$dest"
    cp "$tmp/package/libduckdb.so" "$tmp/package/LICENSE" "$dest/"
fi
echo "export DUCKDB_LIB_DIR=$dest"
echo "export LD_LIBRARY_PATH=$dest\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
