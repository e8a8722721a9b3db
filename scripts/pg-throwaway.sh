#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for tests and trying out `lenet sweep --storage`:
#   eval "$(scripts/pg-throwaway.sh start DIR)"   # exports LENET_TEST_POSTGRES=postgresql+psycopg://...
#   scripts/pg-throwaway.sh stop DIR
# Needs PostgreSQL's server binaries (Debian: apt-get install postgresql). Trust auth, a free
# port, data and socket in DIR; nothing outside DIR is touched. initdb refuses to run as
# root, so as root the server runs as the `postgres` user (created by the Debian package).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)

bin=""
for candidate in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
  [ -x "$candidate/initdb" ] && { bin=$candidate; break; }
done
if [ -z "$bin" ] && command -v initdb >/dev/null 2>&1; then
  bin=$(dirname "$(command -v initdb)")
fi
[ -n "$bin" ] || { echo "$0: PostgreSQL server binaries not found (apt-get install postgresql)" >&2; exit 1; }

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case $action in
  start)
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
      -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=100" start >/dev/null \
      || { cat "$dir/server.log" >&2; exit 1; }
    url="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
    echo "$url" >"$dir/url"
    echo "export LENET_TEST_POSTGRES=$url"
    ;;
  stop)
    if [ -d "$dir/data" ]; then
      as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    ;;
  *) usage ;;
esac
