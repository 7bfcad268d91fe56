#!/usr/bin/env bash
# Checks the crates' layering with `cargo tree`: each workspace crate may
# depend (normal dependencies, every feature on) only on crates of a lower
# layer, burn-dmt names no backend crate in its manifest, and the IPC client
# alone pulls in no database. Exits non-zero, naming the offending edge.
#
#   layer 0  memstore-api         the trait, types, errors, reference store
#   layer 1  memstore-engine      the index planner, kernels, SQL store core
#   layer 2  memstore-sqlite, memstore-duckdb, memstore-postgres, memstore-index
#            the drivers and HNSW
#   layer 3  memstore-ipc         the daemon and its client
#   layer 4  memstore-any         a store from a URL
#   layer 5  burn-dmt             the model
#   layer 6  memstore             the facade (and the examples)
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A layer=(
    [memstore-api]=0
    [memstore-engine]=1
    [memstore-sqlite]=2 [memstore-duckdb]=2 [memstore-postgres]=2 [memstore-index]=2
    [memstore-ipc]=3
    [memstore-any]=4
    [burn-dmt]=5
    [memstore]=6
)

fail=0
# memstore-duckdb is its own workspace; the edges into it are checked from
# the crates that depend on it (memstore-ipc, memstore-any, the facade).
for crate in memstore-api memstore-engine memstore-sqlite memstore-postgres memstore-index memstore-ipc memstore-any burn-dmt memstore; do
    # Direct normal dependencies with every feature of the crate on.
    deps=$(cargo tree -p "$crate" --all-features -e normal --depth 1 --prefix none --format '{p}' |
        awk 'NR > 1 { print $1 }' | sort -u)
    for dep in $deps; do
        [ -n "${layer[$dep]:-}" ] || continue
        if [ "${layer[$dep]}" -ge "${layer[$crate]}" ]; then
            echo "layering: $crate (layer ${layer[$crate]}) depends on $dep (layer ${layer[$dep]})"
            fail=1
        fi
    done
done

# burn-dmt reaches stores only through memstore-any.
for backend in memstore-sqlite memstore-duckdb memstore-postgres memstore-ipc; do
    if cargo tree -p burn-dmt -e normal --depth 1 --prefix none --format '{p}' | awk 'NR > 1 { print $1 }' | grep -qx "$backend"; then
        echo "layering: burn-dmt names the backend crate $backend"
        fail=1
    fi
done

# The IPC client alone needs no database.
client=$(cargo tree -p memstore-ipc --no-default-features --features client -e normal --prefix none --format '{p}' |
    awk '{ print $1 }' | sort -u)
for db in memstore-sqlite memstore-duckdb memstore-postgres memstore-engine sqlx libsqlite3-sys duckdb; do
    if grep -qx "$db" <<<"$client"; then
        echo "layering: memstore-ipc with only the client feature depends on $db"
        fail=1
    fi
done

if [ "$fail" = 0 ]; then
    echo "layering: every crate depends only on lower layers"
fi
exit "$fail"
