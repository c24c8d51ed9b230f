#!/usr/bin/env bash
# Install Debian's PostgreSQL if needed and start a throw-away cluster on 127.0.0.1:55432.
# The tests find it through MEMCONTROL_TEST_POSTGRES (written to .ci/postgres.url).
set -euo pipefail
cd "$(dirname "$0")"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || exit 1
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
DATA=/tmp/memcontrol-pg
RUN="runuser -u postgres --"
id postgres >/dev/null 2>&1 || RUN=""
# A cluster left by an earlier run (same machine) would hold the port: stop it before starting afresh.
[ -f "$DATA/postmaster.pid" ] && $RUN "$BIN/pg_ctl" -D "$DATA" -m immediate stop >/dev/null 2>&1 || true
rm -rf "$DATA"; mkdir -p "$DATA"; chown postgres "$DATA" 2>/dev/null || true
$RUN "$BIN/initdb" -D "$DATA" -A trust -U memcontrol >/dev/null
$RUN "$BIN/pg_ctl" -D "$DATA" -o "-p 55432 -k /tmp -c listen_addresses=127.0.0.1" -l "$DATA/log" -w start >/dev/null
$RUN "$BIN/createdb" -h 127.0.0.1 -p 55432 -U memcontrol memcontrol
echo "postgresql://memcontrol@127.0.0.1:55432/memcontrol" > postgres.url
echo "ci: PostgreSQL running at $(cat postgres.url)"
