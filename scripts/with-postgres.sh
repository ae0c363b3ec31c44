#!/usr/bin/env bash
# Run a command with a throwaway PostgreSQL for the Prefect server it starts:
#     bash scripts/with-postgres.sh .venv/bin/python -m benchmarks.admission_throughput
# Installs PostgreSQL with apt-get when missing (needs root, as `make e2e`), starts it on a free
# loopback port in a temporary directory, exports PREFECT_API_DATABASE_CONNECTION_URL (local
# Prefect servers started by the command use it instead of SQLite), runs the command, and stops
# PostgreSQL and removes its directory on exit, whatever the command did.
set -euo pipefail
(( $# )) || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
(( EUID == 0 )) || { echo "$0: needs root (apt-get, and PostgreSQL runs as user postgres)" >&2; exit 2; }

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "installing postgresql with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
WORK="$(mktemp -d /tmp/grid-pg-XXXXXX)"
PGDATA_DIR="$WORK/pg"
stop_postgres() {
    set +e  # clean up as much as can be, whatever failed
    [[ -f "$PGDATA_DIR/postmaster.pid" ]] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t 20 stop >/dev/null 2>&1
    rm -rf "$WORK"
}
trap stop_postgres EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PG_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p "$PGDATA_DIR" && chown postgres: "$WORK" "$PGDATA_DIR" && chmod 700 "$PGDATA_DIR"
runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA_DIR" -A trust -U postgres >"$WORK/initdb.log" 2>&1
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$WORK/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $WORK" start >/dev/null
"$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres prefect
echo "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT, database prefect" >&2
export PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://postgres@127.0.0.1:$PG_PORT/prefect"
"$@"
