#!/usr/bin/env bash
# Start a private PostgreSQL server for the tests and print its SQLAlchemy URL on stdout.
#
# Uses Debian's `postgresql` package (installed here when missing). PostgreSQL refuses to run as root,
# so the server runs as the `postgres` user the package creates, on its own data folder and port,
# accepting only local TCP connections without a password (a throwaway test server, nothing else).
# Usage: URL=$(bash scripts/postgres_server.sh [PORT])       (default port 54331)
# Stop:  runuser -u postgres -- "$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/pg_ctl" -D DATA stop
set -euo pipefail
PORT="${1:-54331}"
URL="postgresql+psycopg://postgres@127.0.0.1:${PORT}/postgres"

find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ -z "$(find_bin)" ]; then
  echo "installing PostgreSQL (Debian package postgresql)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
BIN="$(find_bin)"
[ -x "$BIN/initdb" ] || { echo "no initdb under /usr/lib/postgresql/*/bin" >&2; exit 1; }
as_postgres() { if command -v runuser >/dev/null; then runuser -u postgres -- "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi; }
if [ "$(id -u)" != 0 ] && [ "$(id -un)" != postgres ]; then
  echo "run as root (it starts the server as the postgres user) or as postgres" >&2; exit 1
fi
[ "$(id -u)" = 0 ] || as_postgres() { "$@"; }

if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
  echo "a server already accepts connections on port $PORT: using it" >&2
  echo "$URL"; exit 0
fi
DATA="$(mktemp -d "${TMPDIR:-/tmp}/influence-store-pg-${PORT}.XXXXXX")"
chown postgres "$DATA"
chmod 700 "$DATA"
as_postgres "$BIN/initdb" -D "$DATA" -U postgres -A trust --no-sync -E UTF8 >/dev/null
# Socket in the data folder (the system one may not exist or be writable); fsync off: a test server.
as_postgres "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
  -o "-p $PORT -c listen_addresses=127.0.0.1 -k $DATA -c fsync=off -c synchronous_commit=off -c max_connections=200" \
  start >&2 || { cat "$DATA/server.log" >&2; exit 1; }
for _ in $(seq 1 60); do
  "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" && { echo "PostgreSQL on port $PORT, data in $DATA" >&2; echo "$URL"; exit 0; }
  sleep 1
done
cat "$DATA/server.log" >&2
echo "PostgreSQL did not accept connections on port $PORT within 60 s" >&2
exit 1
