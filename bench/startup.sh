#!/usr/bin/env bash
# Start-up and footprint benchmark of pgwarden against plain PostgreSQL.
#
# Builds pgwarden in release mode, then measures, on this machine:
#   1. `pgwarden run` on an existing data directory -> Postgres accepting connections
#   2. the same for `pg_ctl start -w` and for `postgres -D` started directly (same data
#      directory, same polling loop), and pgwarden's start overhead over plain `postgres`
#   3. `pgwarden run` on an empty directory -> accepting connections (includes initdb)
#   4. pgwarden's own resident memory (VmRSS of the pgwarden process, not Postgres)
#   5. CPU used by the pgwarden process while idle, as a percentage of one core
#
# "Accepting connections" is `pg_isready` over the private unix socket succeeding; it is
# polled every ~BENCH_POLL_MS ms plus the probe's own run time (~5 ms) for every variant.
#
# Environment:
#   BENCH_RUNS           timed starts per variant on an existing data directory (default 5)
#   BENCH_INIT_RUNS      timed starts from an empty directory (default 3)
#   BENCH_IDLE_SECONDS   idle period over which pgwarden's CPU is measured (default 60)
#   BENCH_RSS_DELAY      seconds after readiness at which VmRSS is read (default 3)
#   BENCH_POLL_MS        sleep between readiness probes in ms (default 4)
#   BENCH_START_TIMEOUT  bound for one start, seconds (default 60; initdb runs get twice that)
#   BENCH_USER           OS user Postgres runs as when this script runs as root (default postgres)
#   PG_BIN_DIR           PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#   CARGO_TARGET_DIR     honoured by the build and when locating the binary
#
# Everything runs in a private temporary directory, on free private ports; every process and
# directory the script creates is removed on exit (also on failure or Ctrl-C).
set -euo pipefail

RUNS=${BENCH_RUNS:-5}
INIT_RUNS=${BENCH_INIT_RUNS:-3}
IDLE_SECONDS=${BENCH_IDLE_SECONDS:-60}
RSS_DELAY=${BENCH_RSS_DELAY:-3}
POLL_MS=${BENCH_POLL_MS:-4}
START_TIMEOUT=${BENCH_START_TIMEOUT:-60}
PG_BIN=${PG_BIN_DIR:-/usr/lib/postgresql/15/bin}
BENCH_USER=${BENCH_USER:-postgres}

# Targets.
TARGET_RSS_MIB=15
TARGET_IDLE_CPU_PCT=0.2
TARGET_OVERHEAD_MS=100

# die, log, free_ports, as_pg and the process bookkeeping.
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

for v in RUNS INIT_RUNS IDLE_SECONDS RSS_DELAY POLL_MS START_TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "BENCH_$v must be a whole number (got ${!v})"
done
((RUNS >= 1)) || die "BENCH_RUNS must be at least 1"
((INIT_RUNS >= 1)) || die "BENCH_INIT_RUNS must be at least 1"
((IDLE_SECONDS >= 1)) || die "BENCH_IDLE_SECONDS must be at least 1"
for tool in postgres pg_ctl pg_isready initdb; do
  [ -x "$PG_BIN/$tool" ] || die "$PG_BIN/$tool not found (set PG_BIN_DIR)"
done
[ -r /proc/self/stat ] || die "needs /proc (Linux)"

# Keep the caller's PGWARDEN_* overrides out of the measurement.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^PGWARDEN_' || true)
export PGWARDEN_LOG_FORMAT=json PGWARDEN_LOG_LEVEL=info

cd "$(dirname "$0")/.."
REPO=$(pwd)

# ---------------------------------------------------------------------------------------
# Cleanup: every process and directory this script makes.
# ---------------------------------------------------------------------------------------
TMP=""
PIDS=()   # processes started here (pgwarden, postgres, pg_ctl) and not yet reaped
SLEEP_FD=""

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  # SIGQUIT: immediate shutdown for pgwarden and postmasters (they end their own children;
  # backends of a SIGKILLed postmaster exit by themselves on noticing its death).
  for pid in ${PIDS[@]+"${PIDS[@]}"} $(our_postmasters); do
    gone "$pid" || signal_pid "$pid" QUIT
  done
  # shellcheck disable=SC2046 # one pid per word
  reap_pids startup.sh ${PIDS[@]+"${PIDS[@]}"} $(our_postmasters)
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
us_to_ms() { # µs -> ms with one decimal; "-" stays "-"
  if [ "$1" = - ]; then echo -; else awk -v us="$1" 'BEGIN { printf "%.1f", us / 1000 }'; fi
}

# Median and maximum of whitespace-separated numbers: prints "median max".
stats() {
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "nan nan"; exit }
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "%.1f %.1f\n", m, v[NR] }'
}

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
mkdir -p "$TMP/bin" "$TMP/plain-run/log" "$TMP/out"
install -m 755 "$BUILT" "$TMP/bin/pgwarden"
BIN=$TMP/bin/pgwarden
[ ${#AS_PG[@]} -eq 0 ] || chown -R "$BENCH_USER:" "$TMP"
cd "$TMP" # a working directory the unprivileged user can enter

free_ports 3
PORT=${FREE_PORTS[0]} STATUS_PORT=${FREE_PORTS[1]} METRICS_PORT=${FREE_PORTS[2]}

DATA=$TMP/data              # the existing cluster every "existing data directory" run uses
PGW_RUN=$TMP/run            # pgwarden's run_dir (socket + log pipes)
PLAIN_RUN=$TMP/plain-run    # socket + regular log directory for pg_ctl / postgres -D

# pgwarden's configuration; the data directory is given per run through the environment.
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

# Plain Postgres uses the cluster pgwarden made, with its rendered postgresql.conf; only the
# socket and the logging collector's directory move (pgwarden's log files are FIFOs that only
# pgwarden reads).
PLAIN_OPTS=(-c "port=$PORT" -c "listen_addresses=127.0.0.1"
  -c "unix_socket_directories=$PLAIN_RUN" -c "log_directory=$PLAIN_RUN/log")

# ---------------------------------------------------------------------------------------
# The one readiness loop every variant uses. Functions that start processes run in the
# main shell (never inside $(...)) so that PIDS stays complete for the cleanup; they return
# their figures in global variables.
# ---------------------------------------------------------------------------------------
# wait_accepting SOCKET_DIR TIMEOUT_S WATCH_PID [EXIT_OK]: polls until Postgres accepts
# connections; sets READY_US (µs since T0). Fails if WATCH_PID exits first (unless EXIT_OK,
# for pg_ctl, which exits once the server is up: then its exit time is kept in EXITED_US and
# its status checked) or on timeout.
READY_US="" EXITED_US=""
wait_accepting() {
  local sock=$1 timeout_s=$2 watch=$3 exit_ok=${4:-} deadline
  deadline=$((T0 + timeout_s * 1000000))
  READY_US="" EXITED_US=""
  while :; do
    if "$PG_BIN/pg_isready" -q -h "$sock" -p "$PORT" -U postgres -d postgres -t 2 2>/dev/null; then
      READY_US=$(($(now_us) - T0))
      return 0
    fi
    if [ -z "$EXITED_US" ] && gone "$watch"; then
      EXITED_US=$(($(now_us) - T0))
      if [ -z "$exit_ok" ]; then
        echo "startup.sh: process $watch exited before Postgres accepted connections" >&2
        return 1
      fi
      local rc=0
      wait "$watch" || rc=$?
      forget "$watch"
      ((rc == 0)) || { echo "startup.sh: process $watch failed (exit status $rc)" >&2; return 1; }
    fi
    if (($(now_us) > deadline)); then
      echo "startup.sh: Postgres did not accept connections within ${timeout_s}s" >&2
      return 1
    fi
    nap
  done
}

# ---------------------------------------------------------------------------------------
# Variants: each starts, waits for readiness, and stops cleanly.
# ---------------------------------------------------------------------------------------
PGW_PID=""

# start_pgwarden DATA_DIR LOG: starts pgwarden in the background (PGW_PID), sets T0.
# A plain simple command with `&`, so that $! is the pgwarden process itself (setpriv execs).
start_pgwarden() {
  local data=$1 out=$2
  T0=$(now_us)
  PGWARDEN_POSTGRES__DATA_DIR=$data ${AS_PG[@]+"${AS_PG[@]}"} "$BIN" run --config "$TMP/pgwarden.toml" \
    </dev/null >"$out" 2>&1 &
  PGW_PID=$!
  PIDS+=("$PGW_PID")
}

stop_pgwarden() {
  local out=$1 data=$2
  signal_pid "$PGW_PID" TERM
  if ! wait_gone "$PGW_PID" 60; then
    show_log "$out"
    die "pgwarden (pid $PGW_PID) did not exit within 60s of SIGTERM"
  fi
  [ ! -e "$data/postmaster.pid" ] || die "postmaster.pid left behind after pgwarden stopped"
}

# log_ts_us FILE MESSAGE [WAIT_S]: sets TS_US to the µs from T0 to the timestamp of the
# first pgwarden log record with this exact message ("-" when none within WAIT_S seconds).
log_ts_us() {
  local out=$1 message=$2 wait_s=${3:-10} deadline line ts
  TS_US=-
  deadline=$(($(now_us) + wait_s * 1000000))
  while :; do
    line=$(grep -m1 -F "\"message\":\"$message\"" "$out" || true)
    if [ -n "$line" ]; then
      ts=$(sed -n 's/.*"timestamp":"\([^"]*\)".*/\1/p' <<<"$line")
      [ -n "$ts" ] && ts=$(date -u -d "$ts" +%s%6N 2>/dev/null) && TS_US=$((10#$ts - T0))
      return 0
    fi
    (($(now_us) < deadline)) || return 0
    nap
  done
}

# pgwarden's own log records time its phases: "pgwarden starting" (process started, config
# loaded, runtime up), "postmaster started" (postgres spawned: after `postgres --version`,
# data directory checks, rendering the configuration, creating the log pipes), and
# "postgres is ready to accept connections" (its own readiness: postmaster.pid says ready
# and a SELECT 1 succeeded; probed every 50 ms).
run_pgwarden() { # sets A_US, OWN_US, LAUNCHED_US, SPAWNED_US
  local out=$TMP/out/pgwarden-$1.log
  start_pgwarden "$DATA" "$out"
  wait_accepting "$PGW_RUN" "$START_TIMEOUT" "$PGW_PID" || { show_log "$out"; die "pgwarden start failed"; }
  A_US=$READY_US
  log_ts_us "$out" "postgres is ready to accept connections"
  OWN_US=$TS_US
  log_ts_us "$out" "pgwarden starting" 0
  LAUNCHED_US=$TS_US
  log_ts_us "$out" "postmaster started" 0
  SPAWNED_US=$TS_US
  stop_pgwarden "$out" "$DATA"
}

run_pg_ctl() { # sets B_US, RET_US (when pg_ctl start -w returned)
  local out=$TMP/out/pg_ctl-$1.log srv=$TMP/out/pg_ctl-server-$1.log pid deadline
  T0=$(now_us)
  ${AS_PG[@]+"${AS_PG[@]}"} "$PG_BIN/pg_ctl" start -w -t "$START_TIMEOUT" -D "$DATA" -l "$srv" \
    -o "${PLAIN_OPTS[*]}" </dev/null >"$out" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait_accepting "$PLAIN_RUN" "$START_TIMEOUT" "$pid" exit-ok ||
    { show_log "$out"; show_log "$srv"; die "pg_ctl start failed"; }
  B_US=$READY_US
  RET_US=$EXITED_US
  if [ -z "$RET_US" ]; then
    deadline=$((T0 + START_TIMEOUT * 1000000))
    while ! gone "$pid"; do
      (($(now_us) <= deadline)) || die "pg_ctl start -w did not return within ${START_TIMEOUT}s"
      nap
    done
    RET_US=$(($(now_us) - T0))
    local rc=0
    wait "$pid" || rc=$?
    forget "$pid"
    ((rc == 0)) || { show_log "$out"; die "pg_ctl start failed"; }
  fi
  as_pg "$PG_BIN/pg_ctl" stop -m fast -w -t 60 -D "$DATA" >>"$out" 2>&1 ||
    { show_log "$out"; die "pg_ctl stop failed"; }
}

run_postgres() { # sets C_US
  local out=$TMP/out/postgres-$1.log pid
  T0=$(now_us)
  ${AS_PG[@]+"${AS_PG[@]}"} "$PG_BIN/postgres" -D "$DATA" "${PLAIN_OPTS[@]}" </dev/null >"$out" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait_accepting "$PLAIN_RUN" "$START_TIMEOUT" "$pid" || { show_log "$out"; die "postgres -D start failed"; }
  C_US=$READY_US
  signal_pid "$pid" INT # fast shutdown
  wait_gone "$pid" 60 || die "postgres (pid $pid) did not stop within 60s"
  [ ! -e "$DATA/postmaster.pid" ] || die "postmaster.pid left behind after postgres stopped"
}

run_initdb() { # sets I_US
  local data=$1 out=$TMP/out/pgwarden-init-$2.log
  start_pgwarden "$data" "$out"
  wait_accepting "$PGW_RUN" $((2 * START_TIMEOUT)) "$PGW_PID" ||
    { show_log "$out"; die "pgwarden start on an empty directory failed"; }
  I_US=$READY_US
  stop_pgwarden "$out" "$data"
}

# ---------------------------------------------------------------------------------------
# 3. Empty directory -> ready (the first one also creates the cluster used below).
# ---------------------------------------------------------------------------------------
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "empty directory -> ready with pgwarden (initdb), $INIT_RUNS run(s)"
INIT_US=()
for i in $(seq 1 "$INIT_RUNS"); do
  if ((i == 1)); then d=$DATA; else d=$TMP/scratch/data; fi
  run_initdb "$d" "$i"
  INIT_US+=("$I_US")
  log "  run $i: $(us_to_ms "$I_US") ms"
  ((i == 1)) || rm -rf -- "$TMP/scratch"
done

# ---------------------------------------------------------------------------------------
# 1 + 2. Existing data directory -> ready: pgwarden, pg_ctl, postgres, interleaved so that
# drift (page cache, other load) hits all three alike. Run 0 is a warm-up.
# ---------------------------------------------------------------------------------------
log "existing data directory -> ready: 1 warm-up + $RUNS timed run(s) per variant"
PGW_US=() PGW_OWN_US=() PGW_LAUNCHED_US=() PGW_SPAWNED_US=() CTL_US=() CTL_RET_US=() PG_US=()
for i in $(seq 0 "$RUNS"); do
  run_pgwarden "$i"
  run_pg_ctl "$i"
  run_postgres "$i"
  line="pgwarden $(us_to_ms "$A_US") ms (postgres spawned at $(us_to_ms "$SPAWNED_US"), own ready $(us_to_ms "$OWN_US")), pg_ctl $(us_to_ms "$B_US") ms (returned $(us_to_ms "$RET_US") ms), postgres $(us_to_ms "$C_US") ms"
  if ((i == 0)); then
    log "  warm-up: $line (not counted)"
    continue
  fi
  log "  run $i: $line"
  PGW_US+=("$A_US") CTL_US+=("$B_US") CTL_RET_US+=("$RET_US") PG_US+=("$C_US")
  [ "$OWN_US" = - ] || PGW_OWN_US+=("$OWN_US")
  [ "$LAUNCHED_US" = - ] || PGW_LAUNCHED_US+=("$LAUNCHED_US")
  [ "$SPAWNED_US" = - ] || PGW_SPAWNED_US+=("$SPAWNED_US")
done

# ---------------------------------------------------------------------------------------
# 4 + 5. pgwarden's memory and idle CPU.
# ---------------------------------------------------------------------------------------
log "pgwarden footprint: VmRSS ${RSS_DELAY}s after ready, then CPU over ${IDLE_SECONDS}s idle"
OUT=$TMP/out/pgwarden-idle.log
pgwarden_exited() {
  local rc=0
  wait "$PGW_PID" || rc=$?
  forget "$PGW_PID"
  show_log "$OUT"
  die "pgwarden exited $1 (exit status $rc): stopped from outside this script?"
}
start_pgwarden "$DATA" "$OUT"
wait_accepting "$PGW_RUN" "$START_TIMEOUT" "$PGW_PID" || { show_log "$OUT"; die "pgwarden start failed"; }
log_ts_us "$OUT" "postgres is ready to accept connections" # let pgwarden finish its own check
sleep "$RSS_DELAY"
! gone "$PGW_PID" || pgwarden_exited "before its memory was read"
RSS_KB=$(awk '/^VmRSS:/ { print $2 }' "/proc/$PGW_PID/status")
HWM_KB=$(awk '/^VmHWM:/ { print $2 }' "/proc/$PGW_PID/status")
THREADS=$(awk '/^Threads:/ { print $2 }' "/proc/$PGW_PID/status")
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # utime + stime of the process itself (all its threads, not its children)
  local s
  s=$(cat "/proc/$1/stat")
  s=${s##*) }
  awk '{ print $12 + $13 }' <<<"$s"
}
C0=$(cpu_ticks "$PGW_PID")
W0=$(now_us)
sleep "$IDLE_SECONDS"
! gone "$PGW_PID" || pgwarden_exited "during the idle period"
C1=$(cpu_ticks "$PGW_PID")
W1=$(now_us)
stop_pgwarden "$OUT" "$DATA"
IDLE_TICKS=$((C1 - C0))
IDLE_PCT=$(awk -v t="$IDLE_TICKS" -v hz="$CLK_TCK" -v us=$((W1 - W0)) 'BEGIN { printf "%.3f", 100 * (t / hz) / (us / 1e6) }')
RESOLUTION_PCT=$(awk -v hz="$CLK_TCK" -v us=$((W1 - W0)) 'BEGIN { printf "%.3f", 100 * (1 / hz) / (us / 1e6) }')

# ---------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------
ms_stats() { # µs values -> "median max" in ms
  local v=() x
  for x in "$@"; do v+=("$(us_to_ms "$x")"); done
  stats "${v[@]}"
}
read -r PGW_MED PGW_MAX < <(ms_stats "${PGW_US[@]}")
read -r CTL_MED CTL_MAX < <(ms_stats "${CTL_US[@]}")
read -r RET_MED RET_MAX < <(ms_stats "${CTL_RET_US[@]}")
read -r PG_MED PG_MAX < <(ms_stats "${PG_US[@]}")
read -r INIT_MED INIT_MAX < <(ms_stats "${INIT_US[@]}")
opt_stats() { # like ms_stats, "n/a n/a" without values
  if (($#)); then ms_stats "$@"; else echo "n/a n/a"; fi
}
read -r OWN_MED OWN_MAX < <(opt_stats ${PGW_OWN_US[@]+"${PGW_OWN_US[@]}"})
read -r LAUNCHED_MED LAUNCHED_MAX < <(opt_stats ${PGW_LAUNCHED_US[@]+"${PGW_LAUNCHED_US[@]}"})
read -r SPAWNED_MED SPAWNED_MAX < <(opt_stats ${PGW_SPAWNED_US[@]+"${PGW_SPAWNED_US[@]}"})
OVERHEAD=$(awk -v a="$PGW_MED" -v b="$PG_MED" 'BEGIN { printf "%.1f", a - b }')
RSS_MIB=$(awk -v k="$RSS_KB" 'BEGIN { printf "%.1f", k / 1024 }')
HWM_MIB=$(awk -v k="$HWM_KB" 'BEGIN { printf "%.1f", k / 1024 }')
verdict() { awk -v v="$1" -v t="$2" 'BEGIN { print (v < t) ? "OK" : "MISS" }'; }

PG_VERSION=$("$PG_BIN/postgres" --version | sed 's/^postgres (PostgreSQL) //')
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
row() { printf '%-52s %10s %10s   %-10s %s\n' "$@"; }

echo
echo "pgwarden start-up benchmark"
echo "  machine:  $(nproc) CPU(s)${CPU_MODEL:+, $CPU_MODEL}, $(uname -sr)"
echo "  postgres: $PG_VERSION ($PG_BIN), as user $(as_pg id -un)"
echo "  runs:     $RUNS per variant on an existing data directory (+1 warm-up), $INIT_RUNS from empty; idle period ${IDLE_SECONDS}s"
echo "  load:     $LOAD_BEFORE before, $(cut -d' ' -f1-3 /proc/loadavg) after (1/5/15 min; other load skews the timings)"
echo "  ready =   pg_isready over the unix socket succeeds (probe every ~${POLL_MS} ms + ~5 ms probe time)"
echo
row "figure" "median" "max" "target" "result"
row "------" "------" "---" "------" "------"
row "1. existing dir -> accepting: pgwarden run (ms)" "$PGW_MED" "$PGW_MAX" "" ""
row "   pgwarden log: 'pgwarden starting' (ms)" "$LAUNCHED_MED" "$LAUNCHED_MAX" "" "(info)"
row "   pgwarden log: 'postmaster started' (ms)" "$SPAWNED_MED" "$SPAWNED_MAX" "" "(info)"
row "   pgwarden log: its own 'ready' record (ms)" "$OWN_MED" "$OWN_MAX" "" "(info)"
row "2. existing dir -> accepting: pg_ctl start -w (ms)" "$CTL_MED" "$CTL_MAX" "" ""
row "   pg_ctl start -w returned (ms)" "$RET_MED" "$RET_MAX" "" "(info)"
row "   existing dir -> accepting: postgres -D (ms)" "$PG_MED" "$PG_MAX" "" ""
row "   start overhead: pgwarden - postgres (ms)" "$OVERHEAD" "" "< ${TARGET_OVERHEAD_MS} ms" "$(verdict "$OVERHEAD" "$TARGET_OVERHEAD_MS")"
row "3. empty dir -> accepting: pgwarden run, initdb (ms)" "$INIT_MED" "$INIT_MAX" "" ""
row "4. pgwarden VmRSS ${RSS_DELAY}s after ready (MiB)" "$RSS_MIB" "" "< ${TARGET_RSS_MIB} MiB" "$(verdict "$RSS_MIB" "$TARGET_RSS_MIB")"
row "   pgwarden VmHWM / threads" "$HWM_MIB" "$THREADS" "" "(info)"
row "5. pgwarden CPU idle ${IDLE_SECONDS}s (% of one core)" "$IDLE_PCT" "" "< ${TARGET_IDLE_CPU_PCT} %" "$(verdict "$IDLE_PCT" "$TARGET_IDLE_CPU_PCT")"
echo
echo "idle CPU: $IDLE_TICKS tick(s) of 1/${CLK_TCK} s; one tick over this period is ${RESOLUTION_PCT} % of a core"
