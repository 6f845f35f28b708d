#!/usr/bin/env bash
# The high-availability figures of bench/ha.sh, measured on Patroni: the peer that pgwarden's
# figures are set beside (bench/ha.sh --with-patroni runs both).
#
# Patroni and etcd come from Debian's packages (Patroni 3.0.2, etcd 3.4); as root the script
# installs them with apt-get when they are missing (patroni etcd-server etcd-client
# python3-psycopg2). Three Patroni members with PostgreSQL 15 (/usr/lib/postgresql/15/bin, or
# PG_BIN_DIR) and one etcd member, all on loopback, on free ports below the ephemeral range, in
# a private temporary directory. As root, etcd, Patroni and Postgres run as the `postgres` OS
# user (BENCH_USER) through setpriv (initdb refuses root).
#
# The timings are pgwarden's Lease timings translated: ttl = lease duration, loop_wait = retry
# period, retry_timeout = renew deadline - retry period (default profile: ttl 10, loop_wait 2,
# retry_timeout 4; fast profile: 5, 1, 2). PGW_BENCH_MODE=quorum (the default) runs Patroni's
# synchronous mode with one synchronous standby (Patroni 3.0 has no quorum commit), async
# plain asynchronous replication. Every other setting is Patroni's and Postgres's default.
#
# The scenarios, the timed writer and the figures are those of tests/ha_bench/ (see
# bench/README.md); the driver is bench/peers/patroni.py:
#   pod loss         kill -9 of the leader's Patroni and all its Postgres processes
#   hung primary     SIGSTOP of the leader's Patroni and Postgres
#   postgres crash   SIGKILL of the leader's postmaster only
#   switchover       patronictl switchover to the synchronous standby (async: the most
#                    advanced replica)
#   SIGTERM          SIGTERM of the leader's Patroni
# and, at the end, each Patroni process's VmRSS and CPU time while idle (not Postgres's).
#
# Environment (the same names as bench/ha.sh):
#   PGW_BENCH_RUNS           runs per scenario (default 10)
#   PGW_BENCH_SCENARIOS      a comma-separated subset of pod-loss,hung,crash,switchover,sigterm
#   PGW_BENCH_MODE           quorum (default) or async
#   PGW_BENCH_PROFILE        default or fast
#   PGW_BENCH_IDLE_SECONDS   the idle period of the footprint (default 60; 0 skips it)
#   BENCH_USER, PG_BIN_DIR   the OS user as root (postgres), PostgreSQL's bin directory
#
# Every process and the directory it makes are removed on exit, also after a failure or
# Ctrl-C; every wait is bounded (120 s a step; the members' logs are printed on a timeout).
set -euo pipefail

RUNS=${PGW_BENCH_RUNS:-10}
SCENARIOS=${PGW_BENCH_SCENARIOS:-pod-loss,hung,crash,switchover,sigterm}
MODE=${PGW_BENCH_MODE:-quorum}
PROFILE=${PGW_BENCH_PROFILE:-default}
IDLE_SECONDS=${PGW_BENCH_IDLE_SECONDS:-60}
BENCH_USER=${BENCH_USER:-postgres}
PG_BIN=${PG_BIN_DIR:-/usr/lib/postgresql/15/bin}

cd "$(dirname "$0")/../.."
REPO=$(pwd)
# shellcheck source=bench/lib.sh
. "$REPO/bench/lib.sh"

[[ $RUNS =~ ^[0-9]+$ ]] && ((RUNS >= 1)) || die "PGW_BENCH_RUNS must be a whole number >= 1 (got $RUNS)"
[[ $IDLE_SECONDS =~ ^[0-9]+$ ]] || die "PGW_BENCH_IDLE_SECONDS must be a whole number (got $IDLE_SECONDS)"
case $MODE in quorum | async) ;; *) die "PGW_BENCH_MODE must be quorum or async (got $MODE)" ;; esac
case $PROFILE in
  default) TTL=10 LOOP_WAIT=2 RETRY_TIMEOUT=4 ;;
  fast) TTL=5 LOOP_WAIT=1 RETRY_TIMEOUT=2 ;;
  *) die "PGW_BENCH_PROFILE must be default or fast (got $PROFILE)" ;;
esac
IFS=, read -r -a WANTED <<<"$SCENARIOS"
for s in "${WANTED[@]}"; do
  case $s in pod-loss | hung | crash | switchover | sigterm) ;; *) die "PGW_BENCH_SCENARIOS: unknown scenario $s" ;; esac
done
[ -x "$PG_BIN/postgres" ] || die "$PG_BIN/postgres not found (PostgreSQL 15 is needed; set PG_BIN_DIR)"
[ -r /proc/self/stat ] || die "needs /proc (Linux)"

# Debian's packages; Patroni runs on the system's python3 (/usr/bin/python3), so does the driver.
PY=/usr/bin/python3
have_packages() {
  command -v patroni >/dev/null && command -v patronictl >/dev/null && command -v etcd >/dev/null &&
    [ -x "$PY" ] && "$PY" -c 'import psycopg2' 2>/dev/null
}
if ! have_packages; then
  [ "$(id -u)" -eq 0 ] || die "needs Debian's patroni, etcd-server, etcd-client and python3-psycopg2 (apt-get install as root)"
  log "installing patroni etcd-server etcd-client python3-psycopg2 (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y patroni etcd-server etcd-client python3-psycopg2 >&2 ||
    die "apt-get install failed (try apt-get update first)"
  have_packages || die "patroni, etcd or psycopg2 still missing after apt-get install"
fi
PATRONI=$(command -v patroni)
PATRONICTL=$(command -v patronictl)
ETCD=$(command -v etcd)
ETCDCTL=$(command -v etcdctl || true)
PATRONI_VERSION=$("$PATRONI" --version 2>/dev/null | awk '{ print $2 }')
ETCD_VERSION=$("$ETCD" --version 2>/dev/null | awk '/etcd Version/ { print $3 }')
[ "$PATRONI_VERSION" = 3.0.2 ] || log "note: Patroni $PATRONI_VERSION, not the 3.0.2 the figures in bench/README.md were measured with"

setup_as_pg "$BENCH_USER"

# ---------------------------------------------------------------------------------------
# Cleanup: every process the driver started (it writes a pid file for each) and every
# Postgres of our data directories, then the directory.
# ---------------------------------------------------------------------------------------
TMP=""
PIDS=()
DRIVER=""

# Pids from our pid files whose command line still names this run's directory (a recycled pid
# is never signalled).
our_pid_files() {
  [ -n "$TMP" ] && [ -d "$TMP/pids" ] || return 0
  local f pid
  for f in "$TMP"/pids/*.pid; do
    [ -f "$f" ] || continue
    pid=$(head -n1 "$f" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] || continue
    gone "$pid" && continue
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$TMP"; then echo "$pid"; fi
  done
}

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  if [ -n "$DRIVER" ] && ! gone "$DRIVER"; then
    signal_pid "$DRIVER" TERM
    wait_gone "$DRIVER" 20 || signal_pid "$DRIVER" KILL
  fi
  # Patroni and etcd: SIGCONT (a hung-primary run may have stopped them), then SIGKILL.
  for pid in $(our_pid_files); do
    signal_pid "$pid" CONT
    signal_pid "$pid" KILL
  done
  # Postgres: SIGCONT, then an immediate shutdown; SIGKILL for what is left.
  for pid in $(our_postmasters); do
    signal_pid "$pid" CONT
    signal_pid "$pid" QUIT
  done
  # shellcheck disable=SC2046 # one pid per word
  reap_pids patroni.sh $(our_pid_files) $(our_postmasters)
  [ -z "$TMP" ] || [ ! -d "$TMP" ] || rm -rf -- "$TMP"
  [ -n "$SLEEP_FD" ] && exec {SLEEP_FD}>&- 2>/dev/null
  exit "$rc"
}
SLEEP_FD=""
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# lib.sh's wait_gone naps between checks: a sleep without a process.
exec {SLEEP_FD}<> <(:)
nap() { read -r -t 0.020 -u "$SLEEP_FD" _ 2>/dev/null || true; }

# ---------------------------------------------------------------------------------------
# Sandbox and settings.
# ---------------------------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/pgwarden-patroni.XXXXXX")
chmod 755 "$TMP"
mkdir -p "$TMP/pids" "$TMP/etcd" "$TMP/pg-0" "$TMP/pg-1" "$TMP/pg-2"
chmod 700 "$TMP/etcd" "$TMP"/pg-?
[ ${#AS_PG[@]} -eq 0 ] || chown -R "$BENCH_USER:" "$TMP/etcd" "$TMP"/pg-?
free_ports 8
PASSWORD=bench-$RANDOM$RANDOM
SETTINGS=$TMP/settings.json
# as_pg's prefix is passed on: the driver starts etcd and Patroni through it.
"$PY" - "$SETTINGS" ${AS_PG[@]+"${AS_PG[@]}"} <<EOF
import json, sys
json.dump({
    "tmp": "$TMP",
    "pg_ports": [${FREE_PORTS[0]}, ${FREE_PORTS[1]}, ${FREE_PORTS[2]}],
    "rest_ports": [${FREE_PORTS[3]}, ${FREE_PORTS[4]}, ${FREE_PORTS[5]}],
    "etcd_port": ${FREE_PORTS[6]},
    "etcd_peer_port": ${FREE_PORTS[7]},
    "password": "$PASSWORD",
    "timings": {"ttl": $TTL, "loop_wait": $LOOP_WAIT, "retry_timeout": $RETRY_TIMEOUT},
    "mode": "$MODE",
    "profile": "$PROFILE",
    "runs": $RUNS,
    "scenarios": "$SCENARIOS".split(","),
    "idle_seconds": $IDLE_SECONDS,
    "as_pg": sys.argv[2:],
    "patroni": "$PATRONI",
    "patronictl": "$PATRONICTL",
    "etcd": "$ETCD",
    "etcdctl": "${ETCDCTL:-etcdctl}",
    "etcd_version": "$ETCD_VERSION",
    "pg_bin": "$PG_BIN",
}, open(sys.argv[1], "w"), indent=1)
EOF
[ -s "$SETTINGS" ] || die "could not write $SETTINGS"

log "Patroni $PATRONI_VERSION, etcd $ETCD_VERSION, PostgreSQL $("$PG_BIN/postgres" --version | awk '{ print $3 }')"
log "profile $PROFILE (ttl $TTL, loop_wait $LOOP_WAIT, retry_timeout $RETRY_TIMEOUT), mode $MODE, $RUNS runs per scenario"
log "load average before: $(load_average)"
# The driver runs in the background so that a signal reaches this shell's trap at once.
"$PY" "$REPO/bench/peers/patroni.py" "$SETTINGS" &
DRIVER=$!
PIDS+=("$DRIVER")
status=0
wait "$DRIVER" || status=$?
forget "$DRIVER"
DRIVER=""
log "load average after: $(load_average)"
if [ "$status" -ne 0 ]; then
  for f in "$TMP/etcd.log" "$TMP"/pg-?/patroni.log; do [ -f "$f" ] && show_log "$f"; done
  die "the Patroni benchmark failed (exit $status)"
fi
