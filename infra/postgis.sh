#!/usr/bin/env bash
# A throwaway PostGIS for development and tests, on loopback only.
#
#   eval "$(infra/postgis.sh start [--fast] [DIR])"
#                                             install if missing, initdb in DIR (default: a new
#                                             temporary folder), start on a free 127.0.0.1 port,
#                                             create database "crackmap" with PostGIS, apply the
#                                             migrations; prints export lines (PG* and CRACKMAP_PG_URL)
#                                             Durable by default (fsync, synchronous_commit on: a scene
#                                             reported done survives a crash). --fast turns them off,
#                                             for throwaway test clusters only (make test uses it).
#   infra/postgis.sh env DIR                  print the export lines again
#   infra/postgis.sh stop DIR                 stop the server and delete DIR
#
# The cluster's superuser is "postgres" with a random password (password auth over TCP,
# so a wrong password is refused).  Migrations run with $PYTHON (default python3) -m pipeline.stores.postgis.
set -euo pipefail

PG_VERSION=15
BIN=/usr/lib/postgresql/$PG_VERSION/bin
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}

say() { echo "postgis.sh: $*" >&2; }

as_owner() {  # initdb and the server refuse to run as root: use the postgres user then
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install_if_missing() {
    if [ -x "$BIN/initdb" ] && [ -e "/usr/share/postgresql/$PG_VERSION/extension/postgis.control" ]; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        say "PostgreSQL $PG_VERSION with PostGIS is not installed; as root: apt-get install -y postgresql postgresql-$PG_VERSION-postgis-3"
        exit 1
    fi
    say "installing postgresql and postgresql-$PG_VERSION-postgis-3 (Debian packages)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql "postgresql-$PG_VERSION-postgis-3" >&2
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

print_env() {
    local dir=$1
    [ -f "$dir/env" ] || { say "$dir has no running cluster (no $dir/env)"; exit 1; }
    cat "$dir/env"
}

start() {
    local fast=
    if [ "${1:-}" = --fast ]; then fast=1; shift; fi
    local dir=${1:-}
    install_if_missing
    [ -n "$dir" ] || dir=$(mktemp -d "${TMPDIR:-/tmp}/crackmap-postgis.XXXXXX")
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
    chmod 700 "$dir"
    local port password
    port=$(free_port)
    password=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(12))')
    echo "$password" > "$dir/pwfile"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/pwfile"; fi
    as_owner "$BIN/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" -A scram-sha-256 \
        -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    rm -f "$dir/pwfile"
    # loopback only, the socket inside DIR; --fast: no fsync, for a throwaway test cluster only
    local options="-c listen_addresses=127.0.0.1 -p $port -k $dir"
    if [ -n "$fast" ]; then
        options="$options -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        say "--fast: fsync and synchronous_commit are off; a crash can lose committed scenes"
    fi
    as_owner "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o "$options" \
        start >&2 || { cat "$dir/server.log" >&2; exit 1; }
    local url="postgresql://postgres@127.0.0.1:$port/crackmap"
    cat > "$dir/env" <<ENV
export PGHOST=127.0.0.1
export PGPORT=$port
export PGUSER=postgres
export PGPASSWORD=$password
export PGDATABASE=crackmap
export CRACKMAP_PG_URL=$url
export CRACKMAP_PG_DIR=$dir
ENV
    chmod 600 "$dir/env"
    (
        . "$dir/env"
        "$BIN/psql" -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE crackmap" >&2
        "$BIN/psql" -q -v ON_ERROR_STOP=1 -c "CREATE EXTENSION IF NOT EXISTS postgis" >&2
        cd "$ROOT" && "$PYTHON" -m pipeline.stores.postgis migrate "$url" >&2
    ) || { stop "$dir"; exit 1; }
    print_env "$dir"
}

stop() {
    local dir=${1:?usage: postgis.sh stop DIR}
    if [ ! -e "$dir/env" ] && [ ! -e "$dir/data/PG_VERSION" ]; then
        say "$dir is not a folder made by postgis.sh start; leaving it alone"; exit 1
    fi
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_owner "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    fi
    rm -rf "$dir"
}

case ${1:-} in
    start) shift; start "$@" ;;
    stop) stop "${2:-}" ;;
    env) print_env "${2:?usage: postgis.sh env DIR}" ;;
    *) echo "usage: $0 start [--fast] [DIR] | env DIR | stop DIR" >&2; exit 2 ;;
esac
