#!/usr/bin/env bash
# Probe and scrape latency of pgwarden while pgbench saturates Postgres.
#
# Builds pgwarden in release mode, starts it on a fresh data directory, initialises pgbench
# (`pgbench -i -s BENCH_PGBENCH_SCALE` over pgwarden's unix socket, as the postgres user) and,
# while `pgbench -c BENCH_PGBENCH_CLIENTS -j BENCH_PGBENCH_JOBS` drives Postgres at full load,
# measures:
#   1. /readyz latency p50/p99/max over BENCH_PROBE_CALLS sequential calls, on one keep-alive
#      connection (like a load balancer) and with a new connection per call (like the kubelet)
#   2. /metrics latency p50/p99/max with the default configuration on a warm cache (the
#      default metrics_ttl is 15 s, so the scrapes are served from the cache), over
#      BENCH_SCRAPES sequential scrapes on one keep-alive connection (like Prometheus), and
#      BENCH_COLD_SCRAPES scrapes made each 16 s after the previous one (cache expired: the
#      scrape waits for the metric queries)
#   3. the same with a custom queries file of 20 queries (pgwarden restarted on the same data
#      directory with PGWARDEN_MONITOR__QUERIES_FILE)
#   4. pgwarden's VmRSS (the pgwarden process only) and the CPU it used in each phase
#      (utime+stime from /proc/PID/stat, as a percentage of one core)
#
# The HTTP client is a small Python 3 program (standard library only) embedded below: one
# request at a time, timed with time.perf_counter_ns from sending the request to having read
# the whole body; no process is forked per call.
#
# Environment:
#   BENCH_PROBE_CALLS      /readyz calls per connection mode (default 10000)
#   BENCH_SCRAPES          warm-cache /metrics scrapes per configuration (default 1000)
#   BENCH_COLD_SCRAPES     expired-cache /metrics scrapes per configuration, 16 s apart (default 3; 0 skips)
#   BENCH_WARMUP           uncounted calls before each measured series (default 200)
#   BENCH_BASELINE_SECONDS load without any HTTP request, for pgwarden's CPU baseline (default 10)
#   BENCH_RAMP_SECONDS     load before the first measurement of a run (default 5)
#   BENCH_PGBENCH_SCALE    pgbench -i -s (default 10)
#   BENCH_PGBENCH_CLIENTS  pgbench -c (default 8)
#   BENCH_PGBENCH_JOBS     pgbench -j (default 2)
#   BENCH_START_TIMEOUT    bound for one start, seconds (default 60)
#   BENCH_USER             OS user Postgres runs as when this script runs as root (default postgres)
#   PG_BIN_DIR             PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#   CARGO_TARGET_DIR       honoured by the build and when locating the binary
#
# Everything runs in a private temporary directory, on free private ports; every process and
# directory the script creates is removed on exit (also on failure or Ctrl-C).
set -euo pipefail

PROBE_CALLS=${BENCH_PROBE_CALLS:-10000}
SCRAPES=${BENCH_SCRAPES:-1000}
COLD_SCRAPES=${BENCH_COLD_SCRAPES:-3}
WARMUP=${BENCH_WARMUP:-200}
BASELINE_SECONDS=${BENCH_BASELINE_SECONDS:-10}
RAMP_SECONDS=${BENCH_RAMP_SECONDS:-5}
PGBENCH_SCALE=${BENCH_PGBENCH_SCALE:-10}
PGBENCH_CLIENTS=${BENCH_PGBENCH_CLIENTS:-8}
PGBENCH_JOBS=${BENCH_PGBENCH_JOBS:-2}
START_TIMEOUT=${BENCH_START_TIMEOUT:-60}
PG_BIN=${PG_BIN_DIR:-/usr/lib/postgresql/15/bin}
BENCH_USER=${BENCH_USER:-postgres}
POLL_MS=10
# pgbench runs with -T this long at most; the script stops it (SIGTERM) once a run's
# measurements are done, so this only bounds a load left behind by a killed script.
LOAD_MAX_SECONDS=1800
# The default monitor.metrics_ttl (the script keeps the default configuration).
METRICS_TTL_S=15
COLD_GAP_S=$((METRICS_TTL_S + 1))

# Targets.
TARGET_READYZ_P99_MS=2
TARGET_METRICS_P99_MS=10
TARGET_RSS_MIB=20

# die, log, free_ports, as_pg and the process bookkeeping.
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

for v in PROBE_CALLS SCRAPES COLD_SCRAPES WARMUP BASELINE_SECONDS RAMP_SECONDS PGBENCH_SCALE \
  PGBENCH_CLIENTS PGBENCH_JOBS START_TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "BENCH_$v must be a whole number (got ${!v})"
done
((PROBE_CALLS >= 1)) || die "BENCH_PROBE_CALLS must be at least 1"
((SCRAPES >= 1)) || die "BENCH_SCRAPES must be at least 1"
((PGBENCH_SCALE >= 1 && PGBENCH_CLIENTS >= 1 && PGBENCH_JOBS >= 1)) ||
  die "BENCH_PGBENCH_SCALE, _CLIENTS and _JOBS must be at least 1"
for tool in postgres initdb pg_isready pgbench; do
  [ -x "$PG_BIN/$tool" ] || die "$PG_BIN/$tool not found (set PG_BIN_DIR)"
done
command -v python3 >/dev/null || die "needs python3 (the HTTP client)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 7))' || die "needs Python 3.7 or newer"
[ -r /proc/self/stat ] || die "needs /proc (Linux)"

# Keep the caller's PGWARDEN_* overrides out of the measurement.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^PGWARDEN_' || true)
export PGWARDEN_LOG_FORMAT=json PGWARDEN_LOG_LEVEL=info

cd "$(dirname "$0")/.."
REPO=$(pwd)

# ---------------------------------------------------------------------------------------
# Cleanup: every process and directory this script makes (as in startup.sh).
# ---------------------------------------------------------------------------------------
TMP=""
PIDS=()   # processes started here (pgwarden, pgbench) and not yet reaped
SLEEP_FD=""

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  # pgbench first (SIGTERM: a background job of a script ignores SIGINT), then SIGQUIT:
  # immediate shutdown for pgwarden and postmasters (they end their own children).
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    [ "$pid" != "${PGBENCH_PID:-}" ] || signal_pid "$pid" TERM
  done
  for pid in ${PIDS[@]+"${PIDS[@]}"} $(our_postmasters); do
    [ "$pid" = "${PGBENCH_PID:-}" ] || gone "$pid" || signal_pid "$pid" QUIT
  done
  # shellcheck disable=SC2046 # one pid per word
  reap_pids probes.sh ${PIDS[@]+"${PIDS[@]}"} $(our_postmasters)
  [ -z "$TMP" ] || [ ! -d "$TMP" ] || rm -rf -- "$TMP"
  [ -n "$SLEEP_FD" ] && exec {SLEEP_FD}>&- 2>/dev/null
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A sleep without a process: read with a timeout on a pipe that never delivers.
exec {SLEEP_FD}<> <(:)
nap() { read -r -t "0.$(printf %03d "$POLL_MS")" -u "$SLEEP_FD" _ 2>/dev/null || true; }
# pause SECONDS: a longer sleep, also without a process.
pause() { read -r -t "$1" -u "$SLEEP_FD" _ 2>/dev/null || true; }

# ---------------------------------------------------------------------------------------
# Build.
# ---------------------------------------------------------------------------------------
log "building pgwarden as the image does (cargo build --release --no-default-features)"
cargo build --release --no-default-features --quiet >&2 || die "cargo build --release failed"
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  TARGET_DIR=$CARGO_TARGET_DIR
else
  TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
fi
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$REPO/$TARGET_DIR ;; esac
BUILT=$TARGET_DIR/release/pgwarden
[ -x "$BUILT" ] || die "built binary not found at $BUILT"

# ---------------------------------------------------------------------------------------
# Sandbox: a temp dir owned by the user Postgres runs as, a copy of the binary it can run.
# ---------------------------------------------------------------------------------------
AS_PG=()
if [ "$(id -u)" -eq 0 ]; then
  id "$BENCH_USER" >/dev/null 2>&1 || die "running as root needs the OS user $BENCH_USER (initdb refuses root); set BENCH_USER"
  if command -v setpriv >/dev/null; then
    AS_PG=(setpriv "--reuid=$BENCH_USER" "--regid=$BENCH_USER" --init-groups --)
  else
    AS_PG=(runuser -u "$BENCH_USER" --)
  fi
fi
as_pg() { ${AS_PG[@]+"${AS_PG[@]}"} "$@"; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/pgwarden-bench.XXXXXX")
chmod 755 "$TMP"
mkdir -p "$TMP/bin" "$TMP/out"
install -m 755 "$BUILT" "$TMP/bin/pgwarden"
BIN=$TMP/bin/pgwarden
[ ${#AS_PG[@]} -eq 0 ] || chown -R "$BENCH_USER:" "$TMP"
cd "$TMP" # a working directory the unprivileged user can enter

free_ports 3
PORT=${FREE_PORTS[0]} STATUS_PORT=${FREE_PORTS[1]} METRICS_PORT=${FREE_PORTS[2]}

DATA=$TMP/data     # created by pgwarden's initdb on the first start, reused by the second
PGW_RUN=$TMP/run   # pgwarden's run_dir (socket + log pipes)
READYZ_URL=http://127.0.0.1:$STATUS_PORT/readyz
METRICS_URL=http://127.0.0.1:$METRICS_PORT/metrics

# pgwarden's configuration: only what the sandbox needs; the monitor keeps its defaults
# (interval 2s, metrics_ttl 15s, query_timeout 2s).
cat >"$TMP/pgwarden.toml" <<EOF
instance_name = "bench"
[postgres]
bin_dir = "$PG_BIN"
run_dir = "$PGW_RUN"
listen_addresses = "127.0.0.1"
port = $PORT
[http]
status_listen = "127.0.0.1:$STATUS_PORT"
metrics_listen = "127.0.0.1:$METRICS_PORT"
EOF
chmod 644 "$TMP/pgwarden.toml"

# ---------------------------------------------------------------------------------------
# The custom queries file: 20 queries in the postgres_exporter format, over the statistics
# views a real deployment scrapes (the pgbench tables live in the default database).
# ---------------------------------------------------------------------------------------
QUERIES=$TMP/queries.yaml
cat >"$QUERIES" <<'EOF'
bench_user_tables:
  query: |
    SELECT relname, seq_scan, coalesce(idx_scan, 0) AS idx_scan, n_tup_ins, n_tup_upd,
           n_tup_del, n_tup_hot_upd, n_live_tup, n_dead_tup
    FROM pg_stat_user_tables
  metrics:
    - relname: {usage: LABEL, description: "Table"}
    - seq_scan: {usage: COUNTER, description: "Sequential scans"}
    - idx_scan: {usage: COUNTER, description: "Index scans"}
    - n_tup_ins: {usage: COUNTER, description: "Rows inserted"}
    - n_tup_upd: {usage: COUNTER, description: "Rows updated"}
    - n_tup_del: {usage: COUNTER, description: "Rows deleted"}
    - n_tup_hot_upd: {usage: COUNTER, description: "Rows HOT updated"}
    - n_live_tup: {usage: GAUGE, description: "Estimated live rows"}
    - n_dead_tup: {usage: GAUGE, description: "Estimated dead rows"}
bench_user_tables_maintenance:
  query: |
    SELECT relname, vacuum_count, autovacuum_count, analyze_count, autoanalyze_count,
           coalesce(extract(epoch FROM now() - greatest(last_vacuum, last_autovacuum)), -1) AS vacuum_age_seconds
    FROM pg_stat_user_tables
  metrics:
    - relname: {usage: LABEL, description: "Table"}
    - vacuum_count: {usage: COUNTER, description: "Manual vacuums"}
    - autovacuum_count: {usage: COUNTER, description: "Autovacuums"}
    - analyze_count: {usage: COUNTER, description: "Manual analyzes"}
    - autoanalyze_count: {usage: COUNTER, description: "Autoanalyzes"}
    - vacuum_age_seconds: {usage: GAUGE, description: "Since the last vacuum (-1: never)"}
bench_statio_user_tables:
  query: |
    SELECT relname, heap_blks_read, heap_blks_hit, coalesce(idx_blks_read, 0) AS idx_blks_read,
           coalesce(idx_blks_hit, 0) AS idx_blks_hit
    FROM pg_statio_user_tables
  metrics:
    - relname: {usage: LABEL, description: "Table"}
    - heap_blks_read: {usage: COUNTER, description: "Heap blocks read"}
    - heap_blks_hit: {usage: COUNTER, description: "Heap blocks hit"}
    - idx_blks_read: {usage: COUNTER, description: "Index blocks read"}
    - idx_blks_hit: {usage: COUNTER, description: "Index blocks hit"}
bench_user_indexes:
  query: "SELECT relname, indexrelname, idx_scan, idx_tup_read, idx_tup_fetch FROM pg_stat_user_indexes"
  metrics:
    - relname: {usage: LABEL, description: "Table"}
    - indexrelname: {usage: LABEL, description: "Index"}
    - idx_scan: {usage: COUNTER, description: "Index scans"}
    - idx_tup_read: {usage: COUNTER, description: "Index entries returned"}
    - idx_tup_fetch: {usage: COUNTER, description: "Rows fetched by index scans"}
bench_table_size:
  query: |
    SELECT relname, pg_total_relation_size(relid) AS total_bytes,
           pg_relation_size(relid) AS heap_bytes, pg_indexes_size(relid) AS index_bytes
    FROM pg_stat_user_tables
  metrics:
    - relname: {usage: LABEL, description: "Table"}
    - total_bytes: {usage: GAUGE, description: "Table, indexes and TOAST"}
    - heap_bytes: {usage: GAUGE, description: "Main fork"}
    - index_bytes: {usage: GAUGE, description: "Indexes"}
bench_database_tuples:
  query: |
    SELECT datname, numbackends, tup_returned, tup_fetched, tup_inserted, tup_updated,
           tup_deleted, temp_files
    FROM pg_stat_database WHERE datname IS NOT NULL
  metrics:
    - datname: {usage: LABEL, description: "Database"}
    - numbackends: {usage: GAUGE, description: "Backends"}
    - tup_returned: {usage: COUNTER, description: "Rows returned"}
    - tup_fetched: {usage: COUNTER, description: "Rows fetched"}
    - tup_inserted: {usage: COUNTER, description: "Rows inserted"}
    - tup_updated: {usage: COUNTER, description: "Rows updated"}
    - tup_deleted: {usage: COUNTER, description: "Rows deleted"}
    - temp_files: {usage: COUNTER, description: "Temporary files"}
bench_database_times:
  query: |
    SELECT datname, blk_read_time, blk_write_time, session_time, active_time,
           idle_in_transaction_time, sessions, sessions_abandoned
    FROM pg_stat_database WHERE datname IS NOT NULL
  metrics:
    - datname: {usage: LABEL, description: "Database"}
    - blk_read_time: {usage: COUNTER, description: "ms reading blocks"}
    - blk_write_time: {usage: COUNTER, description: "ms writing blocks"}
    - session_time: {usage: COUNTER, description: "ms in sessions"}
    - active_time: {usage: COUNTER, description: "ms executing statements"}
    - idle_in_transaction_time: {usage: COUNTER, description: "ms idle in transaction"}
    - sessions: {usage: COUNTER, description: "Sessions"}
    - sessions_abandoned: {usage: COUNTER, description: "Sessions ended by client disconnection"}
bench_database_conflicts:
  query: |
    SELECT datname, confl_tablespace, confl_lock, confl_snapshot, confl_bufferpin, confl_deadlock
    FROM pg_stat_database_conflicts
  metrics:
    - datname: {usage: LABEL, description: "Database"}
    - confl_tablespace: {usage: COUNTER, description: "Tablespace conflicts"}
    - confl_lock: {usage: COUNTER, description: "Lock conflicts"}
    - confl_snapshot: {usage: COUNTER, description: "Snapshot conflicts"}
    - confl_bufferpin: {usage: COUNTER, description: "Buffer pin conflicts"}
    - confl_deadlock: {usage: COUNTER, description: "Deadlock conflicts"}
bench_activity_state:
  query: |
    SELECT coalesce(datname, '') AS datname, coalesce(state, 'none') AS state, count(*) AS backends
    FROM pg_stat_activity GROUP BY 1, 2
  metrics:
    - datname: {usage: LABEL, description: "Database"}
    - state: {usage: LABEL, description: "State"}
    - backends: {usage: GAUGE, description: "Backends"}
bench_activity_wait:
  query: |
    SELECT coalesce(wait_event_type, 'none') AS wait_event_type, count(*) AS backends
    FROM pg_stat_activity GROUP BY 1
  metrics:
    - wait_event_type: {usage: LABEL, description: "Wait event type"}
    - backends: {usage: GAUGE, description: "Backends"}
bench_activity_backend_type:
  query: "SELECT backend_type, count(*) AS backends FROM pg_stat_activity GROUP BY 1"
  metrics:
    - backend_type: {usage: LABEL, description: "Backend type"}
    - backends: {usage: GAUGE, description: "Backends"}
bench_activity_longest:
  query: |
    SELECT coalesce(max(extract(epoch FROM now() - query_start)), 0) AS active_query_seconds,
           coalesce(max(extract(epoch FROM now() - state_change))
                    FILTER (WHERE state = 'idle in transaction'), 0) AS idle_in_transaction_seconds
    FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
  metrics:
    - active_query_seconds: {usage: GAUGE, description: "Longest running statement"}
    - idle_in_transaction_seconds: {usage: GAUGE, description: "Longest idle in transaction"}
bench_settings:
  query: |
    SELECT name, setting::float8 AS value FROM pg_settings
    WHERE vartype IN ('integer', 'real')
  metrics:
    - name: {usage: LABEL, description: "Setting"}
    - value: {usage: GAUGE, description: "Numeric setting, in its own unit"}
bench_settings_bool:
  query: |
    SELECT name, (setting = 'on')::int AS value FROM pg_settings WHERE vartype = 'bool'
  metrics:
    - name: {usage: LABEL, description: "Setting"}
    - value: {usage: GAUGE, description: "Boolean setting (1 = on)"}
bench_locks_type:
  query: "SELECT locktype, count(*) FILTER (WHERE granted) AS granted, count(*) FILTER (WHERE NOT granted) AS waiting FROM pg_locks GROUP BY 1"
  metrics:
    - locktype: {usage: LABEL, description: "Lock type"}
    - granted: {usage: GAUGE, description: "Granted locks"}
    - waiting: {usage: GAUGE, description: "Awaited locks"}
bench_bgwriter:
  query: "SELECT buffers_alloc, maxwritten_clean, buffers_backend_fsync FROM pg_stat_bgwriter"
  metrics:
    - buffers_alloc: {usage: COUNTER, description: "Buffers allocated"}
    - maxwritten_clean: {usage: COUNTER, description: "Cleaning scans stopped for writing too many buffers"}
    - buffers_backend_fsync: {usage: COUNTER, description: "fsyncs by backends"}
bench_archiver:
  query: "SELECT archived_count, failed_count FROM pg_stat_archiver"
  metrics:
    - archived_count: {usage: COUNTER, description: "WAL files archived"}
    - failed_count: {usage: COUNTER, description: "Archiving failures"}
bench_relations:
  query: "SELECT relkind::text AS relkind, count(*) AS relations, sum(relpages)::float8 AS pages FROM pg_class GROUP BY 1"
  metrics:
    - relkind: {usage: LABEL, description: "Relation kind"}
    - relations: {usage: GAUGE, description: "Relations"}
    - pages: {usage: GAUGE, description: "Pages (as of the last VACUUM/ANALYZE)"}
bench_slru:
  query: "SELECT name, blks_zeroed, blks_hit, blks_read, blks_written FROM pg_stat_slru"
  metrics:
    - name: {usage: LABEL, description: "SLRU"}
    - blks_zeroed: {usage: COUNTER, description: "Blocks zeroed"}
    - blks_hit: {usage: COUNTER, description: "Blocks hit"}
    - blks_read: {usage: COUNTER, description: "Blocks read"}
    - blks_written: {usage: COUNTER, description: "Blocks written"}
bench_server:
  query: |
    SELECT extract(epoch FROM now() - pg_postmaster_start_time()) AS uptime_seconds,
           extract(epoch FROM now() - pg_conf_load_time()) AS conf_age_seconds,
           (SELECT count(*) FROM pg_prepared_xacts) AS prepared_xacts,
           (SELECT count(*) FROM pg_replication_slots) AS replication_slots
  metrics:
    - uptime_seconds: {usage: GAUGE, description: "Since the postmaster started"}
    - conf_age_seconds: {usage: GAUGE, description: "Since the configuration was loaded"}
    - prepared_xacts: {usage: GAUGE, description: "Prepared transactions"}
    - replication_slots: {usage: GAUGE, description: "Replication slots"}
EOF
chmod 644 "$QUERIES"
N_CUSTOM=$(grep -c '^[a-z_]*:$' "$QUERIES")

# ---------------------------------------------------------------------------------------
# The HTTP client (Python 3, standard library only).
#   client.py measure URL CALLS WARMUP keepalive|fresh [GAP_S]
#       WARMUP uncounted calls, then CALLS timed ones, one at a time, GAP_S seconds apart
#       (untimed). keepalive: one persistent HTTP/1.1 connection (http.client), reconnecting
#       only if the server closes it (counted). fresh: a new TCP connection per call (raw
#       socket, `Connection: close`), connect and close included in the time.
#       Prints key=value pairs: n, errors, reconnects, p50/p99/max/mean in ms, bytes, wall_s.
#   client.py wait URL TIMEOUT_S PID    polls until URL answers 200 (fails if PID exits)
#   client.py stats METRICS_URL         counters read from one scrape (key=value pairs)
# ---------------------------------------------------------------------------------------
CLIENT=$TMP/client.py
cat >"$CLIENT" <<'EOF'
import gc
import http.client
import math
import os
import re
import socket
import sys
import time
import urllib.parse


def target(url):
    u = urllib.parse.urlsplit(url)
    return u.hostname, u.port, u.path or "/"


def keepalive_caller(host, port, path):
    state = {"conn": None, "reconnects": -1}

    def connect():
        c = http.client.HTTPConnection(host, port, timeout=30)
        c.connect()
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        state["conn"] = c
        state["reconnects"] += 1

    connect()

    def call():
        for attempt in (0, 1):
            try:
                c = state["conn"]
                c.request("GET", path)
                r = c.getresponse()
                body = r.read()
                if r.will_close:
                    c.close()
                    connect()
                return r.status, len(body)
            except (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine):
                state["conn"].close()
                connect()
                if attempt:
                    raise
    return call, state


def fresh_caller(host, port, path):
    req = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (path, host, port)).encode()

    def call():
        s = socket.create_connection((host, port), timeout=30)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(req)
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        finally:
            s.close()
        data = b"".join(chunks)
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head[9:12]), len(body)
    return call, {"reconnects": 0}


def measure(url, calls, warmup, mode, gap):
    host, port, path = target(url)
    call, state = (keepalive_caller if mode == "keepalive" else fresh_caller)(host, port, path)
    errors = 0
    size = 0
    for _ in range(warmup):
        status, size = call()
    warm_reconnects = state["reconnects"]
    lat = []
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()  # no collector pauses inside the timed calls
    t_start = clock()
    for _ in range(calls):
        if gap > 0:
            time.sleep(gap)
        t0 = clock()
        status, size = call()
        lat.append(clock() - t0)
        if status != 200:
            errors += 1
    wall = clock() - t_start
    gc.enable()
    lat.sort()
    n = len(lat)

    def pct(p):
        return lat[max(0, math.ceil(p * n) - 1)] / 1e6

    print("n=%d errors=%d reconnects=%d p50=%.3f p99=%.3f max=%.3f mean=%.3f bytes=%d wall_s=%.2f" % (
        n, errors, state["reconnects"] - warm_reconnects, pct(0.50), pct(0.99), lat[-1] / 1e6,
        sum(lat) / n / 1e6, size, wall / 1e9))


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait(url, timeout, pid):
    host, port, path = target(url)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive(pid):
            sys.exit("process %d exited while waiting for %s" % (pid, url))
        try:
            c = http.client.HTTPConnection(host, port, timeout=2)
            c.request("GET", path)
            r = c.getresponse()
            body = r.read().decode(errors="replace")
            c.close()
            if r.status == 200:
                return
            last = "%d %s" % (r.status, body.strip())
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    sys.exit("%s did not answer 200 within %ss (last: %s)" % (url, timeout, last))


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')


def stats(url):
    host, port, path = target(url)
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    out = {"samples": 0, "custom_samples": 0, "failing": 0, "failing_queries": "-",
           "collections": 0, "collect_s": 0.0, "scrapes": 0, "bytes": len(text.encode())}
    for route in ("readyz", "metrics"):
        out[route + "_count"] = 0
        out[route + "_sum_s"] = 0.0
        out[route + "_le_1_6ms"] = 0  # the histogram's bucket le="0.0016"
    failing = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out["samples"] += 1
        if name.startswith("pgwarden_bench_"):
            out["custom_samples"] += 1
        if name == "pgwarden_query_failing" and value > 0:
            out["failing"] += 1
            q = re.search(r'query="([^"]*)"', labels)
            failing.append(q.group(1) if q else labels)
        if name == "pgwarden_scrapes_total":
            out["scrapes"] = int(value)
        if name.startswith("pgwarden_loop_duration_seconds_") and 'loop="metrics"' in labels:
            if name.endswith("_count"):
                out["collections"] = int(value)
            elif name.endswith("_sum"):
                out["collect_s"] = value
        if name.startswith("pgwarden_http_request_duration_seconds_"):
            for route in ("readyz", "metrics"):
                if 'path="/%s"' % route in labels:
                    if name.endswith("_count"):
                        out[route + "_count"] += int(value)
                    elif name.endswith("_sum"):
                        out[route + "_sum_s"] += value
                    elif name.endswith("_bucket"):
                        le = re.search(r'le="([^"]*)"', labels)
                        if le and le.group(1) != "+Inf" and abs(float(le.group(1)) - 0.0016) < 1e-9:
                            out[route + "_le_1_6ms"] += int(value)
    if failing:
        out["failing_queries"] = ",".join(sorted(set(failing)))
    print(" ".join("%s=%s" % kv for kv in out.items()))


cmd = sys.argv[1]
if cmd == "measure":
    measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
            float(sys.argv[6]) if len(sys.argv) > 6 else 0.0)
elif cmd == "wait":
    wait(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
elif cmd == "stats":
    stats(sys.argv[2])
else:
    sys.exit("unknown command " + cmd)
EOF
client() { python3 "$CLIENT" "$@"; }

# kv LINE: loads "key=value ..." into the associative array KV.
declare -A KV
kv() {
  local pair
  KV=()
  for pair in $1; do KV[${pair%%=*}]=${pair#*=}; done
}

PGW_PID="" PGW_OUT=""
# start_pgwarden NAME [ENV=VALUE...]: starts pgwarden on $DATA (PGW_PID) and waits until
# /readyz answers 200. A plain simple command with `&`, so $! is pgwarden (setpriv execs).
start_pgwarden() {
  local name=$1
  shift
  PGW_OUT=$TMP/out/pgwarden-$name.log
  env PGWARDEN_POSTGRES__DATA_DIR="$DATA" "$@" ${AS_PG[@]+"${AS_PG[@]}"} "$BIN" run --config "$TMP/pgwarden.toml" \
    </dev/null >"$PGW_OUT" 2>&1 &
  PGW_PID=$!
  PIDS+=("$PGW_PID")
  client wait "$READYZ_URL" $((2 * START_TIMEOUT)) "$PGW_PID" || { show_log "$PGW_OUT"; die "pgwarden did not become ready"; }
}

stop_pgwarden() {
  signal_pid "$PGW_PID" TERM
  if ! wait_gone "$PGW_PID" 60; then
    show_log "$PGW_OUT"
    die "pgwarden (pid $PGW_PID) did not exit within 60s of SIGTERM"
  fi
  [ ! -e "$DATA/postmaster.pid" ] || die "postmaster.pid left behind after pgwarden stopped"
}

check_pgwarden() {
  gone "$PGW_PID" || return 0
  show_log "$PGW_OUT"
  die "pgwarden exited during the measurement: stopped from outside this script?"
}

PGBENCH_PID="" PGBENCH_OUT=""
# start_load NAME: pgbench in the background with a progress line every second (epoch
# timestamps), then waits for its first progress line and BENCH_RAMP_SECONDS more.
start_load() {
  local deadline
  PGBENCH_OUT=$TMP/out/pgbench-$1.log
  ${AS_PG[@]+"${AS_PG[@]}"} "$PG_BIN/pgbench" -h "$PGW_RUN" -p "$PORT" -U postgres \
    -c "$PGBENCH_CLIENTS" -j "$PGBENCH_JOBS" -T "$LOAD_MAX_SECONDS" -P 1 --progress-timestamp postgres \
    </dev/null >"$PGBENCH_OUT" 2>&1 &
  PGBENCH_PID=$!
  PIDS+=("$PGBENCH_PID")
  deadline=$(($(now_us) + START_TIMEOUT * 1000000))
  until grep -q '^progress:' "$PGBENCH_OUT"; do
    ! gone "$PGBENCH_PID" || { show_log "$PGBENCH_OUT"; die "pgbench exited before its load started"; }
    (($(now_us) < deadline)) || { show_log "$PGBENCH_OUT"; die "pgbench printed no progress within ${START_TIMEOUT}s"; }
    nap
  done
  pause "$RAMP_SECONDS"
}

check_load() {
  gone "$PGBENCH_PID" || return 0
  show_log "$PGBENCH_OUT"
  die "pgbench exited during the measurement, so the load was not there throughout"
}

stop_load() {
  check_load
  # SIGTERM: pgbench has no handler, and a background job of a script ignores SIGINT.
  signal_pid "$PGBENCH_PID" TERM
  wait_gone "$PGBENCH_PID" 30 || die "pgbench (pid $PGBENCH_PID) did not stop within 30s of SIGTERM"
  PGBENCH_PID=""
}

# ---------------------------------------------------------------------------------------
# Phases: pgwarden's CPU (its threads, not its children), the machine's CPU, pgbench's
# throughput and pgwarden's VmRSS, between phase_begin and phase_end.
# ---------------------------------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # utime + stime of the process itself
  local s
  s=$(cat "/proc/$1/stat")
  s=${s##*) }
  awk '{ print $12 + $13 }' <<<"$s"
}
machine_cpu() { # "busy total" jiffies over all CPUs (idle and iowait are not busy)
  awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
# Mean tps of the pgbench progress lines that cover two epoch times (µs): a line stamped t
# covers the second before t.
tps_between() {
  awk -v a="$2" -v b="$3" '/^progress: / {
      t = $2 * 1e6; if (t > a && t <= b + 1e6) { s += $4; n++ } }
    END { if (n) printf "%.0f", s / n; else print "-" }' "$1"
}

PH_NAME=() PH_WALL=() PH_TICKS=() PH_CPU=() PH_BUSY=() PH_TPS=() PH_RSS=()
P_C0=0 P_W0=0 P_M0=""
phase_begin() {
  check_pgwarden
  P_C0=$(cpu_ticks "$PGW_PID")
  P_M0=$(machine_cpu)
  P_W0=$(now_us)
}
phase_end() {
  local name=$1 c1 w1 m1 ticks
  check_pgwarden
  c1=$(cpu_ticks "$PGW_PID")
  w1=$(now_us)
  m1=$(machine_cpu)
  ticks=$((c1 - P_C0))
  PH_NAME+=("$name")
  PH_WALL+=("$(awk -v us=$((w1 - P_W0)) 'BEGIN { printf "%.1f", us / 1e6 }')")
  PH_TICKS+=("$ticks")
  PH_CPU+=("$(awk -v t="$ticks" -v hz="$CLK_TCK" -v us=$((w1 - P_W0)) 'BEGIN { printf "%.2f", 100 * (t / hz) / (us / 1e6) }')")
  PH_BUSY+=("$(awk -v a="$P_M0" -v b="$m1" 'BEGIN { split(a, x, " "); split(b, y, " ");
    d = y[2] - x[2]; if (d > 0) printf "%.0f", 100 * (y[1] - x[1]) / d; else print "-" }')")
  PH_TPS+=("$(tps_between "$PGBENCH_OUT" "$P_W0" "$w1")")
  PH_RSS+=("$(status_kb "$PGW_PID" VmRSS)")
}

# measure_series NAME URL CALLS MODE [GAP_S]: one timed series, under the current phase
# accounting; the client's figures land in SERIES_<key>[NAME], the server's own view
# (pgwarden's request histogram and metric collections, from a scrape before and after) too.
declare -A S_P50 S_P99 S_MAX S_MEAN S_N S_ERR S_RECON S_BYTES S_SRV_MEAN S_SRV_N S_SRV_SLOW S_COLL S_COLL_MS S_MODE
measure_series() {
  local name=$1 url=$2 calls=$3 mode=$4 gap=${5:-0} before after route_key=readyz inner=5
  [[ $url == */metrics ]] && route_key=metrics
  if ((gap > 0)); then
    inner=0
    log "  $name: $calls call(s), ${gap}s apart ($mode connection)"
  else
    log "  $name: $calls call(s) ($mode connection)"
  fi
  # Warm-up first (fills the metric cache, warms both sides), outside the accounting; the
  # timed client makes a few more uncounted calls on its own connection.
  client measure "$url" 1 "$WARMUP" "$mode" >/dev/null || die "$name: warm-up failed"
  before=$(client stats "$METRICS_URL") || die "$name: scrape failed"
  phase_begin
  local out
  out=$(client measure "$url" "$calls" "$inner" "$mode" "$gap") || { show_log "$PGW_OUT"; die "$name: client failed"; }
  phase_end "$name"
  after=$(client stats "$METRICS_URL") || die "$name: scrape failed"
  kv "$out"
  S_MODE[$name]=$mode S_P50[$name]=${KV[p50]} S_P99[$name]=${KV[p99]} S_MAX[$name]=${KV[max]}
  S_MEAN[$name]=${KV[mean]} S_N[$name]=${KV[n]} S_ERR[$name]=${KV[errors]}
  S_RECON[$name]=${KV[reconnects]} S_BYTES[$name]=${KV[bytes]}
  local b_cnt b_sum b_le b_coll b_cs
  kv "$before"
  b_cnt=${KV[${route_key}_count]} b_sum=${KV[${route_key}_sum_s]} b_le=${KV[${route_key}_le_1_6ms]}
  b_coll=${KV[collections]} b_cs=${KV[collect_s]}
  kv "$after"
  S_SRV_N[$name]=$((KV[${route_key}_count] - b_cnt))
  S_SRV_SLOW[$name]=$((S_SRV_N[$name] - (KV[${route_key}_le_1_6ms] - b_le)))
  # Server side: the handler's time as pgwarden's own histogram sees it. The delta also
  # holds the client's few uncounted calls and, for /metrics, the "before" scrape: noise for
  # a long series, not for a few expired-cache scrapes (shown as "-"; see the collections).
  S_SRV_MEAN[$name]=-
  ((gap > 0)) || S_SRV_MEAN[$name]=$(awk -v c0="$b_cnt" -v s0="$b_sum" -v c1="${KV[${route_key}_count]}" -v s1="${KV[${route_key}_sum_s]}" \
    'BEGIN { if (c1 > c0) printf "%.3f", 1000 * (s1 - s0) / (c1 - c0); else print "-" }')
  S_COLL[$name]=$((KV[collections] - b_coll))
  S_COLL_MS[$name]=$(awk -v n="${S_COLL[$name]}" -v s0="$b_cs" -v s1="${KV[collect_s]}" \
    'BEGIN { if (n > 0) printf "%.1f", 1000 * (s1 - s0) / n; else print "-" }')
  LAST_STATS=$after
  ((${S_ERR[$name]} == 0)) || log "  $name: ${S_ERR[$name]} answer(s) other than 200"
}

# ---------------------------------------------------------------------------------------
# Run 1: default configuration, fresh data directory.
# ---------------------------------------------------------------------------------------
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "run 1: pgwarden with the default configuration on a fresh data directory (initdb)"
start_pgwarden default
log "  pgbench -i -s $PGBENCH_SCALE"
as_pg timeout 600 "$PG_BIN/pgbench" -i -q -s "$PGBENCH_SCALE" -h "$PGW_RUN" -p "$PORT" -U postgres postgres \
  </dev/null >"$TMP/out/pgbench-init.log" 2>&1 || { show_log "$TMP/out/pgbench-init.log"; die "pgbench -i failed"; }
log "  load: pgbench -c $PGBENCH_CLIENTS -j $PGBENCH_JOBS (${RAMP_SECONDS}s ramp)"
start_load default
if ((BASELINE_SECONDS > 0)); then
  log "  baseline: ${BASELINE_SECONDS}s of load without HTTP requests"
  phase_begin
  pause "$BASELINE_SECONDS"
  phase_end baseline
fi
measure_series readyz-keepalive "$READYZ_URL" "$PROBE_CALLS" keepalive
measure_series readyz-fresh "$READYZ_URL" "$PROBE_CALLS" fresh
measure_series metrics-default "$METRICS_URL" "$SCRAPES" keepalive
kv "$LAST_STATS"
DEFAULT_SAMPLES=${KV[samples]}
if ((COLD_SCRAPES > 0)); then
  measure_series metrics-default-cold "$METRICS_URL" "$COLD_SCRAPES" keepalive "$COLD_GAP_S"
fi
check_load
LOAD_LOG_1=$PGBENCH_OUT
stop_load
stop_pgwarden

# ---------------------------------------------------------------------------------------
# Run 2: the same data directory, with the custom queries file.
# ---------------------------------------------------------------------------------------
log "run 2: pgwarden restarted with $N_CUSTOM custom queries (PGWARDEN_MONITOR__QUERIES_FILE)"
start_pgwarden custom PGWARDEN_MONITOR__QUERIES_FILE="$QUERIES"
log "  load: pgbench -c $PGBENCH_CLIENTS -j $PGBENCH_JOBS (${RAMP_SECONDS}s ramp)"
start_load custom
measure_series metrics-custom "$METRICS_URL" "$SCRAPES" keepalive
kv "$LAST_STATS"
CUSTOM_SAMPLES=${KV[samples]} CUSTOM_OWN=${KV[custom_samples]} FAILING=${KV[failing]} FAILING_Q=${KV[failing_queries]}
if ((COLD_SCRAPES > 0)); then
  measure_series metrics-custom-cold "$METRICS_URL" "$COLD_SCRAPES" keepalive "$COLD_GAP_S"
fi
HWM_KB=$(status_kb "$PGW_PID" VmHWM)
THREADS=$(status_kb "$PGW_PID" Threads)
LOAD_LOG_2=$PGBENCH_OUT
stop_load
stop_pgwarden
TPS_1=$(awk '/^progress: / { s += $4; n++ } END { if (n) printf "%.0f", s / n; else print "-" }' "$LOAD_LOG_1")
TPS_2=$(awk '/^progress: / { s += $4; n++ } END { if (n) printf "%.0f", s / n; else print "-" }' "$LOAD_LOG_2")

# ---------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------
verdict() { awk -v v="$1" -v t="$2" 'BEGIN { print (v < t) ? "OK" : "MISS" }'; }
max_rss_kb=0
for r in "${PH_RSS[@]}"; do ((r <= max_rss_kb)) || max_rss_kb=$r; done
RSS_MIB=$(awk -v k="$max_rss_kb" 'BEGIN { printf "%.1f", k / 1024 }')
HWM_MIB=$(awk -v k="$HWM_KB" 'BEGIN { printf "%.1f", k / 1024 }')
PG_VERSION=$("$PG_BIN/postgres" --version | sed 's/^postgres (PostgreSQL) //')
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
row() { printf '%-50s %8s %8s %8s %8s   %-12s %s\n' "$@"; }
lat_row() { # LABEL SERIES [TARGET_MS]
  local label=$1 s=$2 t=${3:-} target="" result=""
  [ -n "${S_N[$s]:-}" ] || return 0
  if [ -n "$t" ]; then target="p99 < $t ms" result=$(verdict "${S_P99[$s]}" "$t"); fi
  row "$label" "${S_P50[$s]}" "${S_P99[$s]}" "${S_MAX[$s]}" "${S_SRV_MEAN[$s]}" "$target" "$result"
}

echo
echo "pgwarden probe and scrape latency under load"
echo "  machine:  $(nproc) CPU(s)${CPU_MODEL:+, $CPU_MODEL}, $(uname -sr)"
echo "  postgres: $PG_VERSION ($PG_BIN), as user $(as_pg id -un)"
echo "  load:     pgbench -c $PGBENCH_CLIENTS -j $PGBENCH_JOBS (TPC-B-like, scale $PGBENCH_SCALE) over the unix socket: ${TPS_1} tps (run 1), ${TPS_2} tps (run 2)"
echo "            load average $LOAD_BEFORE before, $(cut -d' ' -f1-3 /proc/loadavg) after (1/5/15 min)"
echo "  client:   Python $(python3 -c 'import platform; print(platform.python_version())'), one request at a time, perf_counter_ns from sending the"
echo "            request to the whole body read; 'keep-alive' = one persistent HTTP/1.1 connection (http.client),"
echo "            'new conn' = a new TCP connection per call (raw socket, connect + close timed); $WARMUP warm-up call(s) not counted"
echo "  server:   mean handler time from pgwarden's own pgwarden_http_request_duration_seconds histogram"
echo
row "latency (ms)" "p50" "p99" "max" "server" "target" "result"
row "------------" "---" "---" "---" "------" "------" "------"
lat_row "1. /readyz, keep-alive (${S_N[readyz-keepalive]} calls)" readyz-keepalive "$TARGET_READYZ_P99_MS"
lat_row "   /readyz, new conn per call (${S_N[readyz-fresh]} calls)" readyz-fresh "$TARGET_READYZ_P99_MS"
lat_row "2. /metrics default, warm cache (${S_N[metrics-default]} scrapes)" metrics-default "$TARGET_METRICS_P99_MS"
lat_row "   /metrics default, cache expired (${S_N[metrics-default-cold]:-0}, ${COLD_GAP_S}s apart)" metrics-default-cold
lat_row "3. /metrics $N_CUSTOM custom queries, warm (${S_N[metrics-custom]} scrapes)" metrics-custom "$TARGET_METRICS_P99_MS"
lat_row "   /metrics $N_CUSTOM custom, cache expired (${S_N[metrics-custom-cold]:-0}, ${COLD_GAP_S}s apart)" metrics-custom-cold
echo
echo "scrapes: default ${S_BYTES[metrics-default]} bytes, $DEFAULT_SAMPLES samples; custom ${S_BYTES[metrics-custom]} bytes, $CUSTOM_SAMPLES samples ($CUSTOM_OWN from the custom queries, $FAILING failing query(ies): $FAILING_Q)"
for s in metrics-default metrics-default-cold metrics-custom metrics-custom-cold; do
  [ -n "${S_N[$s]:-}" ] || continue
  echo "  $s: ${S_N[$s]} scrape(s), ${S_COLL[$s]} metric collection(s) during them (mean ${S_COLL_MS[$s]} ms each), ${S_ERR[$s]} non-200, ${S_RECON[$s]} reconnect(s)"
done
echo "per series: client mean; server side, requests pgwarden's histogram saw in the window and how many took > 1.6 ms there"
for s in readyz-keepalive readyz-fresh metrics-default metrics-default-cold metrics-custom metrics-custom-cold; do
  [ -n "${S_N[$s]:-}" ] || continue
  echo "  $s: ${S_ERR[$s]} non-200 answer(s), ${S_RECON[$s]} reconnect(s), mean ${S_MEAN[$s]} ms; server: ${S_SRV_SLOW[$s]} of ${S_SRV_N[$s]} > 1.6 ms"
done
echo
printf '%-22s %8s %14s %12s %10s %10s\n' "phase" "wall s" "pgwarden CPU" "machine busy" "pgbench" "VmRSS"
printf '%-22s %8s %14s %12s %10s %10s\n' "-----" "------" "(% of 1 core)" "(% all CPUs)" "(tps)" "(MiB)"
for i in "${!PH_NAME[@]}"; do
  printf '%-22s %8s %14s %12s %10s %10s\n' "${PH_NAME[$i]}" "${PH_WALL[$i]}" "${PH_CPU[$i]} (${PH_TICKS[$i]}t)" \
    "${PH_BUSY[$i]}" "${PH_TPS[$i]}" "$(awk -v k="${PH_RSS[$i]}" 'BEGIN { printf "%.1f", k / 1024 }')"
done
echo "(CPU: utime+stime of the pgwarden process in ticks of 1/${CLK_TCK} s; VmRSS at the end of the phase)"
echo
row "footprint" "value" "" "" "" "target" "result"
row "4. pgwarden VmRSS, max over the phases (MiB)" "$RSS_MIB" "" "" "" "< ${TARGET_RSS_MIB} MiB" "$(verdict "$RSS_MIB" "$TARGET_RSS_MIB")"
row "   pgwarden VmHWM at the end / threads" "$HWM_MIB" "$THREADS" "" "" "" "(info)"
