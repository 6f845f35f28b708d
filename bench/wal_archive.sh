#!/usr/bin/env bash
# WAL archiving under write load: serialized (one upload per archive_command call, as a plain
# `cp`-style command does) against pgwarden's parallel upload-ahead archiver, with a fixed
# added latency per request to the object store.
#
# Builds pgwarden (release), starts s3s-fs (a real S3-protocol server) behind a delaying TCP
# proxy (bench/wal_archive.py proxy), then for each mode: a fresh instance, pgbench writing as
# fast as it can for BENCH_SECONDS, then the drain. Prints WAL made and archived per second,
# the peak ready backlog and the drain time, and draws both backlogs into one SVG.
#
# Environment:
#   BENCH_SECONDS        load duration (default 60)
#   BENCH_LATENCY_MS     added latency per request to the store (default 200)
#   BENCH_WORKERS        pgwarden's wal.parallelism (default 4)
#   BENCH_CLIENTS        pgbench clients (default 4)
#   BENCH_ROWS           rows per pgbench transaction (default 2000, ~150 kB of WAL)
#   BENCH_DRAIN_TIMEOUT  longest wait for the backlog to drain, seconds (default 300)
#   BENCH_OUT            where the SVG goes (default bench/wal_archive.svg)
#   BENCH_USER           OS user for Postgres when run as root (default postgres)
#   PG_BIN_DIR           PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#   S3S_FS               the s3s-fs binary (default: PATH, then ~/.cache/pgwarden/tools/bin)
#   CARGO_TARGET_DIR     honoured by the build
#
# Everything runs in a private temporary directory on loopback ports; every process and file
# it makes is removed on exit.
set -euo pipefail

LOAD=${BENCH_SECONDS:-60}
LATENCY=${BENCH_LATENCY_MS:-200}
WORKERS=${BENCH_WORKERS:-4}
CLIENTS=${BENCH_CLIENTS:-4}
ROWS=${BENCH_ROWS:-2000}
DRAIN_TIMEOUT=${BENCH_DRAIN_TIMEOUT:-300}
PG_BIN=${PG_BIN_DIR:-/usr/lib/postgresql/15/bin}
BENCH_USER=${BENCH_USER:-postgres}

die() { echo "wal_archive.sh: $*" >&2; exit 1; }
log() { echo "-- $*" >&2; }
for v in LOAD LATENCY WORKERS CLIENTS ROWS DRAIN_TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number (got ${!v})"
done
[ -x "$PG_BIN/pgbench" ] || die "$PG_BIN/pgbench not found (set PG_BIN_DIR)"
command -v python3 >/dev/null || die "needs python3"
command -v curl >/dev/null || die "needs curl"

cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${BENCH_OUT:-$REPO/bench/wal_archive.svg}
S3S=${S3S_FS:-$(command -v s3s-fs || echo "${XDG_CACHE_HOME:-$HOME/.cache}/pgwarden/tools/bin/s3s-fs")}
[ -x "$S3S" ] || die "s3s-fs not found (.ci/run installs it; or set S3S_FS)"
while read -r v; do unset "$v"; done < <(compgen -e | grep -E '^(PGWARDEN_|AWS_)' || true)

TMP=""
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ -n "$TMP" ] && rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "building pgwarden (release)"
cargo build --release --no-default-features --quiet
BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/pgwarden"
[ -x "$BIN" ] || die "no binary at $BIN"

TMP=$(mktemp -d /tmp/pgwarden-walbench.XXXXXX)
chmod 755 "$TMP"
AS=()
if [ "$(id -u)" -eq 0 ]; then
  id "$BENCH_USER" >/dev/null 2>&1 || die "user $BENCH_USER missing"
  AS=(setpriv --reuid="$BENCH_USER" --regid="$BENCH_USER" --init-groups)
fi
mkdir -p "$TMP/bin" "$TMP/s3/bench" "$TMP/creds"
cp "$BIN" "$TMP/bin/pgwarden"
printf 'bench-key' >"$TMP/creds/AWS_ACCESS_KEY_ID"
printf 'bench-secret-0123456789' >"$TMP/creds/AWS_SECRET_ACCESS_KEY"
[ "$(id -u)" -eq 0 ] && chown -R "$BENCH_USER" "$TMP/bin" "$TMP/creds"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
S3_PORT=$(port)
PROXY_PORT=$(port)
"$S3S" --host 127.0.0.1 --port "$S3_PORT" --access-key bench-key --secret-key bench-secret-0123456789 \
  "$TMP/s3" >/dev/null 2>&1 &
PIDS+=($!)
python3 "$REPO/bench/wal_archive.py" proxy --listen "$PROXY_PORT" --target "$S3_PORT" \
  --delay-ms "$LATENCY" &
PIDS+=($!)
sleep 1

status_json() { curl -sf --max-time 2 "http://127.0.0.1:$1/pg/status" || echo '{}'; }
ready_count() {
  status_json "$1" | python3 -c 'import json,sys
d=json.load(sys.stdin); a=(d.get("postgres") or {}).get("archiver") or {}
print(a.get("ready_count", -1))'
}
wait_drained() { # port timeout -> 0 when drained
  local deadline=$((SECONDS + $2))
  while [ $SECONDS -lt $deadline ]; do
    [ "$(ready_count "$1")" = "0" ] && return 0
    sleep 0.5
  done
  return 1
}

echo "INSERT INTO bulk SELECT g, md5(g::text) || md5((g + 1)::text) FROM generate_series(1, $ROWS) g;" \
  >"$TMP/bulk.sql"

STARTS=()
ENDS=()
RUNS=()
run() { # name upload_ahead
  local name=$1 ahead=$2 dir="$TMP/$1"
  mkdir -p "$dir"
  [ "$(id -u)" -eq 0 ] && chown "$BENCH_USER" "$dir"
  local pg_port status_port metrics_port
  pg_port=$(port); status_port=$(port); metrics_port=$(port)
  cat >"$dir/pgwarden.toml" <<EOF
instance_name = "bench"
[postgres]
data_dir = "$dir/data"
run_dir = "$dir/run"
port = $pg_port
listen_addresses = "127.0.0.1"
[postgres.parameters]
max_wal_size = "8GB"
synchronous_commit = "off"
[http]
status_listen = "127.0.0.1:$status_port"
metrics_listen = "127.0.0.1:$metrics_port"
[monitor]
interval = "500ms"
[wal]
destination = "s3://bench/$name"
parallelism = $WORKERS
upload_ahead = $ahead
drain_timeout = "1s"
[wal.s3]
endpoint = "http://127.0.0.1:$PROXY_PORT"
allow_http = true
credentials_dir = "$TMP/creds"
EOF
  chmod 644 "$dir/pgwarden.toml"
  log "$name: starting pgwarden"
  "${AS[@]}" "$TMP/bin/pgwarden" run --config "$dir/pgwarden.toml" >"$dir/pgwarden.log" 2>&1 &
  local pid=$!
  PIDS+=($pid)
  local deadline=$((SECONDS + 60))
  until curl -sf --max-time 1 "http://127.0.0.1:$status_port/readyz" >/dev/null; do
    [ $SECONDS -lt $deadline ] || die "$name: pgwarden not ready (see $dir/pgwarden.log)"
    sleep 0.2
  done
  "${AS[@]}" "$PG_BIN/psql" -qX -h "$dir/run" -p "$pg_port" -U postgres -d postgres \
    -c "CREATE TABLE bulk (id int, payload text)" >/dev/null
  wait_drained "$status_port" 60 || die "$name: the initial WAL did not drain"
  python3 "$REPO/bench/wal_archive.py" sample --status-port "$status_port" \
    --out "$dir/samples.csv" --stop-file "$dir/stop" &
  local sampler=$!
  sleep 2
  log "$name: pgbench for ${LOAD}s ($CLIENTS clients, $ROWS rows per transaction)"
  local start end
  start=$(date +%s.%N)
  "${AS[@]}" "$PG_BIN/pgbench" -n -h "$dir/run" -p "$pg_port" -U postgres -c "$CLIENTS" -j 2 \
    -T "$LOAD" -f "$TMP/bulk.sql" postgres >"$dir/pgbench.log" 2>&1 || die "$name: pgbench failed"
  end=$(date +%s.%N)
  log "$name: load done; waiting for the backlog to drain (at most ${DRAIN_TIMEOUT}s)"
  wait_drained "$status_port" "$DRAIN_TIMEOUT" || log "$name: not drained within ${DRAIN_TIMEOUT}s"
  sleep 1
  touch "$dir/stop"
  wait "$sampler" || true
  local m
  m=$(curl -sf "http://127.0.0.1:$metrics_port/metrics" || true)
  python3 - "$name" <<PY
import re, sys
m = """$m"""
def v(n):
    r = re.search(r"^" + re.escape(n) + r" (\S+)$", m, re.M)
    return float(r.group(1)) if r else 0.0
c, s = v("pgwarden_wal_upload_duration_seconds_count"), v("pgwarden_wal_upload_duration_seconds_sum")
u, w = v("pgwarden_wal_uploaded_bytes_total"), v("pgwarden_wal_archived_bytes_total")
print(f"{sys.argv[1]}: {c:.0f} uploads, mean upload {1000 * s / max(c, 1):.0f} ms, "
      f"compressed to {100 * u / max(w, 1):.0f} %", file=sys.stderr)
PY
  grep -E "^(tps|number of transactions actually processed)" "$dir/pgbench.log" >&2 || true
  kill -INT "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  RUNS+=("$name=$dir/samples.csv")
  STARTS+=(--load-start "$name=$start")
  ENDS+=(--load-end "$name=$end")
}

run serialized false
run parallel true

echo
echo "WAL archiving, ${LOAD}s of pgbench writes, +${LATENCY} ms per store request, $WORKERS workers"
echo "(segments of 16 MiB; 'drain' is from the end of the load to an empty backlog)"
python3 "$REPO/bench/wal_archive.py" report "${STARTS[@]}" "${ENDS[@]}" --svg "$OUT" "${RUNS[@]}"
