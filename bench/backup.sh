#!/usr/bin/env bash
# Base backup, restore, point-in-time replay and WAL archiving: pgwarden side by side with
# pgBackRest, on one machine, in one run.
#
#   bench/backup.sh [--scale N]
#
# Builds pgwarden (release, as the image: --no-default-features), starts s3s-fs on loopback
# behind relays (bench/wal_archive.py proxy: one without added latency for backups and
# restores, one adding BENCH_LATENCY_MS to every request for archiving; pgBackRest speaks S3
# only over HTTPS, so its relays also terminate TLS with a throw-away certificate), builds a
# pgbench database under `pgwarden run`, and copies it, cleanly shut down, as the source of
# pgBackRest's Postgres. Then for each tool in turn, with zstd and the same parallelism
# (pgwarden's wal.parallelism = pgBackRest's process-max = BENCH_WORKERS):
#   1. a full backup to a directory, then one to s3s-fs (time and throughput);
#   2. a restore of each to the end of the archive (download, check, replay, promotion and
#      shutdown: what `pgwarden restore` does, and `pgbackrest restore` + Postgres until it
#      accepts connections + fast shutdown);
#   3. archiving: with the latency relay down, pgbench writes BENCH_WAL_MB of WAL; the relay
#      comes back and the backlog of .ready segments is timed until it is empty (pgwarden's
#      archiver against pgBackRest's archive-push with archive-async=y);
#   4. point-in-time replay: a restore from s3s-fs to the end of that WAL, with the startup
#      process sampled every 10 ms (bench/backup.py startup) for the share of time it spent in
#      restore_command, waiting for WAL; the replay time is Postgres's own "redo done ...
#      elapsed".
# Prints every figure for both tools and the ratio pgwarden / pgBackRest.
#
# Needs PostgreSQL 15 with pgbench, python3, curl, openssl, s3s-fs, and pgBackRest
# (Debian: `apt-get install -y pgbackrest`, 2.45 on Debian 12; or set PGBACKREST).
#
# Environment:
#   BENCH_SCALE       pgbench scale (default 100, about 1.5 GB; --scale overrides)
#   BENCH_WORKERS     parallelism of both tools (default 4)
#   BENCH_WAL_MB      WAL written after the backups, replayed and archived (default 1024)
#   BENCH_LATENCY_MS  added to every store request while archiving (default 50)
#   BENCH_CLIENTS     pgbench clients writing that WAL (default 4)
#   BENCH_TIMEOUT     bound for each step, seconds (default 1800)
#   BENCH_USER        OS user for Postgres and both tools when run as root (default postgres)
#   PG_BIN_DIR        PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#   S3S_FS            the s3s-fs binary (default: PATH, then ~/.cache/pgwarden/tools/bin)
#   PGBACKREST        the pgBackRest binary (default: PATH)
#   CARGO_TARGET_DIR  honoured by the build
#   BENCH_LOGS        a directory the logs of every step are copied to at the end
#
# Everything runs in a private temporary directory on loopback ports; every process and file
# it makes is removed on exit, also after a failure or Ctrl-C.
set -euo pipefail

SCALE=${BENCH_SCALE:-100}
while [ $# -gt 0 ]; do
  case $1 in
  --scale) SCALE=${2:-}; shift 2 ;;
  --scale=*) SCALE=${1#--scale=}; shift ;;
  *) echo "usage: $0 [--scale N]" >&2; exit 2 ;;
  esac
done
WORKERS=${BENCH_WORKERS:-4}
WAL_MB=${BENCH_WAL_MB:-1024}
LATENCY=${BENCH_LATENCY_MS:-50}
CLIENTS=${BENCH_CLIENTS:-4}
TIMEOUT=${BENCH_TIMEOUT:-1800}
PG_BIN=${PG_BIN_DIR:-/usr/lib/postgresql/15/bin}
BENCH_USER=${BENCH_USER:-postgres}

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

for v in SCALE WORKERS WAL_MB LATENCY CLIENTS TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number (got ${!v})"
done
for v in SCALE WORKERS WAL_MB CLIENTS TIMEOUT; do
  ((${!v} > 0)) || die "$v must be at least 1"
done
for tool in postgres pgbench psql pg_isready; do
  [ -x "$PG_BIN/$tool" ] || die "$PG_BIN/$tool not found (set PG_BIN_DIR)"
done
for tool in python3 curl openssl; do command -v $tool >/dev/null || die "needs $tool"; done
PGBR=${PGBACKREST:-$(command -v pgbackrest || true)}
[ -n "$PGBR" ] && [ -x "$PGBR" ] ||
  die "pgBackRest not found: apt-get install -y pgbackrest (Debian), or set PGBACKREST"

cd "$(dirname "$0")/.."
REPO=$(pwd)
S3S=${S3S_FS:-$(command -v s3s-fs || echo "${XDG_CACHE_HOME:-$HOME/.cache}/pgwarden/tools/bin/s3s-fs")}
[ -x "$S3S" ] || die "s3s-fs not found (.ci/run installs it; or set S3S_FS)"
while read -r v; do unset "$v"; done < <(compgen -e | grep -E '^(PGWARDEN_|PGBACKREST_|AWS_|PG[A-Z]+$)' || true)

TMP=""
PGBACKREST_CONFIG=""
PIDS=()
pgbackrest_strays() {
  [ -n "$PGBACKREST_CONFIG" ] || return 0
  local e pid
  for e in /proc/[0-9]*/environ; do
    pid=${e#/proc/}
    pid=${pid%/environ}
    tr '\0' '\n' 2>/dev/null <"$e" | grep -qxF "PGBACKREST_CONFIG=$PGBACKREST_CONFIG" && echo "$pid"
  done
  return 0
}
SLEEP_FD=""
cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  # TERM for ours (a non-interactive shell starts background jobs with SIGQUIT ignored, so
  # the relays and s3s-fs would not see a QUIT), immediate shutdown for postmasters.
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do gone "$pid" || signal_pid "$pid" TERM; done
  for pid in $(our_postmasters); do gone "$pid" || signal_pid "$pid" QUIT; done
  # shellcheck disable=SC2046 # one pid per word
  reap_pids backup.sh ${PIDS[@]+"${PIDS[@]}"} $(our_postmasters)
  for pid in $(pgbackrest_strays); do signal_pid "$pid" TERM; done
  # shellcheck disable=SC2046
  reap_pids backup.sh $(pgbackrest_strays)
  if [ -n "${BENCH_LOGS:-}" ] && [ -n "$TMP" ] && [ -d "$TMP/out" ]; then
    mkdir -p "$BENCH_LOGS" && cp -r "$TMP/out/." "$BENCH_LOGS/" || true
  fi
  [ -z "$TMP" ] || [ ! -d "$TMP" ] || rm -rf -- "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
exec {SLEEP_FD}<> <(:)
nap() { read -r -t 0.1 -u "$SLEEP_FD" _ 2>/dev/null || true; }

log "building pgwarden (cargo build --release --no-default-features)"
cargo build --release --no-default-features --quiet >&2 || die "cargo build failed"
BUILT="${CARGO_TARGET_DIR:-$REPO/target}/release/pgwarden"
[ -x "$BUILT" ] || die "no binary at $BUILT"

setup_as_pg "$BENCH_USER"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/pgwarden-backupbench.XXXXXX")
chmod 755 "$TMP"
mkdir -p "$TMP/bin" "$TMP/s3/bench" "$TMP/creds" "$TMP/tls" "$TMP/pgbr/log" "$TMP/pgbr/lock" \
  "$TMP/pgbr/spool" "$TMP/repo-pgbr" "$TMP/run" "$TMP/out"
install -m 755 "$BUILT" "$TMP/bin/pgwarden"
BIN=$TMP/bin/pgwarden
KEY=bench-key
SECRET=bench-secret-0123456789
printf %s "$KEY" >"$TMP/creds/AWS_ACCESS_KEY_ID"
printf %s "$SECRET" >"$TMP/creds/AWS_SECRET_ACCESS_KEY"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
  -keyout "$TMP/tls/key.pem" -out "$TMP/tls/cert.pem" 2>/dev/null || die "openssl failed"
[ ${#AS_PG[@]} -eq 0 ] || chown -R "$BENCH_USER:" "$TMP"
FIGURES=$TMP/out/figures.tsv
: >"$FIGURES"

# fig FIGURE UNIT lower|higher|info TOOL VALUE
fig() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$FIGURES"; }
secs_since() { awk -v a="$1" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }'; }
div() { awk -v a="$1" -v b="$2" -v f="${3:-%.1f}" 'BEGIN { printf f, (b > 0 ? a / b : 0) }'; }
json_field() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print("-" if v is None else (f"{v:.2f}" if isinstance(v, float) else v))' "$1" "$2"; }
# run_timed LOG CMD...: CMD with its output to LOG; sets CPU_S to the user + system CPU seconds
# of CMD and its children (those it waited for), for where a tool's time goes.
run_timed() {
  local logf=$1 t rc=0 TIMEFORMAT='%U %S'
  shift
  t=$( { time "$@" >"$logf" 2>&1; } 2>&1) || rc=$?
  CPU_S=$(awk '{ printf "%.1f", $1 + $2 }' <<<"$t")
  return "$rc"
}
# Bytes under the given paths.
bytes_of() { du -sbc "$@" 2>/dev/null | tail -n1 | cut -f1; }
mb() { div "$1" 1000000 "%.0f"; }

# ---------------------------------------------------------------------------------------
# s3s-fs and its relays.
# ---------------------------------------------------------------------------------------
free_ports 8
S3_PORT=${FREE_PORTS[0]} PG_PORT=${FREE_PORTS[1]} STATUS_PORT=${FREE_PORTS[2]} METRICS_PORT=${FREE_PORTS[3]}
RELAY=${FREE_PORTS[4]} RELAY_TLS=${FREE_PORTS[5]} SLOW=${FREE_PORTS[6]} SLOW_TLS=${FREE_PORTS[7]}
"$S3S" --host 127.0.0.1 --port "$S3_PORT" --access-key "$KEY" --secret-key "$SECRET" "$TMP/s3" \
  >"$TMP/out/s3s-fs.log" 2>&1 &
PIDS+=($!)
declare -A RELAY_PID
# relay PORT DELAY_MS tls|plain: starts one relay to s3s-fs and waits until it listens.
relay() {
  local tls=()
  [ "$3" = tls ] && tls=(--tls-cert "$TMP/tls/cert.pem" --tls-key "$TMP/tls/key.pem")
  python3 "$REPO/bench/wal_archive.py" proxy --listen "$1" --target "$S3_PORT" --delay-ms "$2" \
    ${tls[@]+"${tls[@]}"} >>"$TMP/out/relay-$1.log" 2>&1 &
  RELAY_PID[$1]=$!
  PIDS+=($!)
  local deadline=$(($(now_us) + 10000000))
  until python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$1" 2>/dev/null; do
    (($(now_us) < deadline)) || die "relay on port $1 did not start (see $TMP/out/relay-$1.log)"
    nap
  done
}
unrelay() { signal_pid "${RELAY_PID[$1]}" TERM; wait_gone "${RELAY_PID[$1]}" 10 || die "relay $1 did not stop"; }
relay "$RELAY" 0 plain
relay "$RELAY_TLS" 0 tls
relay "$SLOW" "$LATENCY" plain
relay "$SLOW_TLS" "$LATENCY" tls

# ---------------------------------------------------------------------------------------
# Instances. pgwarden runs the database; pgBackRest's Postgres runs a copy of it.
# ---------------------------------------------------------------------------------------
PGW_DATA=$TMP/pgw/data
PGBR_DATA=$TMP/pgbr/data
mkdir -p "$TMP/pgw"
[ ${#AS_PG[@]} -eq 0 ] || chown "$BENCH_USER:" "$TMP/pgw"
psql_at() { as_pg "$PG_BIN/psql" -qAtX -h "$TMP/run" -p "$PG_PORT" -U postgres -d postgres -c "$1"; }
wait_accepting() { # what log
  local deadline=$(($(now_us) + 120000000))
  until as_pg "$PG_BIN/pg_isready" -q -h "$TMP/run" -p "$PG_PORT" -U postgres; do
    (($(now_us) < deadline)) || { show_log "$2"; die "$1: Postgres not accepting connections"; }
    nap
  done
}

# pgw_config NAME DESTINATION [ENDPOINT]: writes $TMP/pgw/NAME.toml.
pgw_config() {
  cat >"$TMP/pgw/$1.toml" <<EOF
instance_name = "bench"
[postgres]
data_dir = "$PGW_DATA"
run_dir = "$TMP/run"
port = $PG_PORT
listen_addresses = "127.0.0.1"
[postgres.parameters]
max_wal_size = "4GB"
synchronous_commit = "off"
[http]
status_listen = "127.0.0.1:$STATUS_PORT"
metrics_listen = "127.0.0.1:$METRICS_PORT"
[wal]
destination = "$2"
parallelism = $WORKERS
[wal.s3]
endpoint = "${3:-http://127.0.0.1:$RELAY}"
allow_http = true
credentials_dir = "$TMP/creds"
EOF
  chmod 644 "$TMP/pgw/$1.toml"
}
pgw_config dir "file://$TMP/repo-pgw"
pgw_config s3 "s3://bench/pgw"
pgw_config slow "s3://bench/pgw" "http://127.0.0.1:$SLOW"

SERVER_PID=""
pgw_start() { # config
  log "pgwarden: run with $1.toml"
  # A plain command with `&` (not the function as_pg): $! is then pgwarden itself.
  ${AS_PG[@]+"${AS_PG[@]}"} "$BIN" run --config "$TMP/pgw/$1.toml" >>"$TMP/out/pgwarden-run.log" 2>&1 &
  SERVER_PID=$!
  PIDS+=($!)
  local deadline=$(($(now_us) + TIMEOUT * 1000000))
  until curl -sf --max-time 1 "http://127.0.0.1:$STATUS_PORT/readyz" >/dev/null; do
    (($(now_us) < deadline)) || { show_log "$TMP/out/pgwarden-run.log"; die "pgwarden not ready"; }
    gone "$SERVER_PID" && { show_log "$TMP/out/pgwarden-run.log"; die "pgwarden exited"; }
    nap
  done
}
server_stop() { # smart shutdown for pgwarden (it stops Postgres fast), fast for Postgres
  signal_pid "$SERVER_PID" "${1:-TERM}"
  wait_gone "$SERVER_PID" 300 || die "the server (pid $SERVER_PID) did not stop"
  SERVER_PID=""
}

# pgbr_config REPO_TYPE PORT: pgBackRest's configuration, one repository (posix or s3).
# Passed to pgBackRest and its Postgres only: the processes with it in their environment are
# pgBackRest's (its asynchronous archive-push and archive-get detach from their parent).
PGBACKREST_CONFIG=$TMP/pgbr/pgbackrest.conf
pgbr_config() {
  {
    echo "[global]"
    if [ "$1" = posix ]; then
      echo "repo1-type=posix"
      echo "repo1-path=$TMP/repo-pgbr"
    else
      printf '%s\n' repo1-type=s3 repo1-path=/pgbr repo1-s3-bucket=bench repo1-s3-endpoint=127.0.0.1 \
        "repo1-storage-port=$2" repo1-storage-verify-tls=n repo1-s3-region=us-east-1 \
        repo1-s3-uri-style=path "repo1-s3-key=$KEY" "repo1-s3-key-secret=$SECRET"
    fi
    printf '%s\n' repo1-retention-full=9 compress-type=zst "process-max=$WORKERS" start-fast=y \
      archive-async=y "spool-path=$TMP/pgbr/spool" "lock-path=$TMP/pgbr/lock" \
      "log-path=$TMP/pgbr/log" log-level-console=info log-level-file=detail
    printf '%s\n' "[bench]" "pg1-path=$PGBR_DATA" "pg1-port=$PG_PORT" "pg1-socket-path=$TMP/run"
  } >"$PGBACKREST_CONFIG"
  chmod 644 "$PGBACKREST_CONFIG"
}
pgbr() { as_pg env PGBACKREST_CONFIG="$PGBACKREST_CONFIG" PGBACKREST_STANZA=bench "$PGBR" "$@"; }
# pg_start DATA_DIR LOG [SETTINGS...]: plain Postgres (pgBackRest's side), not waited for.
pg_start() {
  local dir=$1 logf=$2 s args=()
  shift 2
  for s in "port=$PG_PORT" "unix_socket_directories=$TMP/run" "listen_addresses=" \
    logging_collector=off log_destination=stderr lc_messages=C "$@"; do
    args+=(-c "$s")
  done
  ${AS_PG[@]+"${AS_PG[@]}"} env PGBACKREST_CONFIG="$PGBACKREST_CONFIG" PGBACKREST_STANZA=bench \
    "$PG_BIN/postgres" -D "$dir" "${args[@]}" >>"$logf" 2>&1 &
  SERVER_PID=$!
  PIDS+=($!)
}
ARCHIVE_PUSH="archive_command=$PGBR archive-push %p"
pgbr_start() {
  log "pgBackRest: Postgres with archive-push"
  pg_start "$PGBR_DATA" "$TMP/out/pgbr-postgres.log" archive_mode=on "$ARCHIVE_PUSH"
  wait_accepting pgBackRest "$TMP/out/pgbr-postgres.log"
}

# ---------------------------------------------------------------------------------------
# The database.
# ---------------------------------------------------------------------------------------
echo "backup bench: $(date -u '+%F %T') UTC, scale $SCALE, $WORKERS workers, ${WAL_MB} MB of WAL," \
  "+${LATENCY} ms per request while archiving, load $(load_average)"
pgw_start dir
wait_accepting pgwarden "$TMP/out/pgwarden-run.log"
log "pgbench -i -s $SCALE"
t=$(now_us)
as_pg "$PG_BIN/pgbench" -i -q -s "$SCALE" -h "$TMP/run" -p "$PG_PORT" -U postgres postgres \
  >"$TMP/out/pgbench-init.log" 2>&1 || { show_log "$TMP/out/pgbench-init.log"; die "pgbench -i failed"; }
psql_at "CHECKPOINT" >/dev/null
DB_BYTES=$(psql_at "SELECT sum(pg_database_size(oid)) FROM pg_database")
log "database: $(mb "$DB_BYTES") MB, built in $(secs_since "$t") s"

# backup_pgw NAME (dir|s3): pgwarden's backup to its configured destination.
backup_pgw() {
  local t secs
  t=$(now_us)
  run_timed "$TMP/out/pgw-backup-$1.log" as_pg "$BIN" backup --config "$TMP/pgw/$1.toml" ||
    { show_log "$TMP/out/pgw-backup-$1.log"; die "pgwarden backup ($1) failed"; }
  secs=$(secs_since "$t")
  fig "backup to $2, CPU of the tool's processes" s info pgwarden "$CPU_S"
  fig "backup to $2, time" s lower pgwarden "$secs"
  fig "backup to $2, throughput" MB/s higher pgwarden "$(div "$(mb "$DB_BYTES")" "$secs")"
}
backup_pgbr() { # dir|s3, label
  local t secs tries=0
  # The asynchronous archive-push of the previous repository may still hold the stanza's
  # archive lock for a moment.
  until pgbr stanza-create >"$TMP/out/pgbr-stanza-$1.log" 2>&1; do
    ((++tries < 30)) || { show_log "$TMP/out/pgbr-stanza-$1.log"; die "pgbackrest stanza-create ($1) failed"; }
    sleep 1
  done
  t=$(now_us)
  run_timed "$TMP/out/pgbr-backup-$1.log" pgbr backup --type=full ||
    { show_log "$TMP/out/pgbr-backup-$1.log"; die "pgbackrest backup ($1) failed"; }
  secs=$(secs_since "$t")
  fig "backup to $2, CPU of the tool's processes" s info pgbackrest "$CPU_S"
  fig "backup to $2, time" s lower pgbackrest "$secs"
  fig "backup to $2, throughput" MB/s higher pgbackrest "$(div "$(mb "$DB_BYTES")" "$secs")"
}

log "pgwarden: backup to a directory"
backup_pgw dir "a directory"
fig "backup stored, directory" MB info pgwarden "$(mb "$(bytes_of "$TMP/repo-pgw/base")")"
server_stop
pgw_start s3
log "pgwarden: backup to s3s-fs"
backup_pgw s3 s3s-fs
fig "backup stored, s3s-fs" MB info pgwarden "$(mb "$(bytes_of "$TMP/s3/bench/pgw/base")")"
server_stop

# The same database, cleanly shut down, for pgBackRest; pgwarden's WAL archiving settings are
# overridden on the command line (archive_command) of pgBackRest's Postgres.
log "copying the data directory for pgBackRest"
cp -a "$PGW_DATA" "$PGBR_DATA"
rm -f "$PGBR_DATA"/pgwarden.* "$PGBR_DATA/postmaster.pid"
pgbr_config posix
pgbr_start
log "pgBackRest: backup to a directory"
backup_pgbr dir "a directory"
fig "backup stored, directory" MB info pgbackrest "$(mb "$(bytes_of "$TMP/repo-pgbr/backup")")"
pgbr_config s3 "$RELAY_TLS"
log "pgBackRest: backup to s3s-fs"
backup_pgbr s3 s3s-fs
fig "backup stored, s3s-fs" MB info pgbackrest "$(mb "$(bytes_of "$TMP/s3/bench/pgbr/backup")")"
server_stop INT

# ---------------------------------------------------------------------------------------
# Restores. Each one into a new directory, removed after it.
# ---------------------------------------------------------------------------------------
RESTORED=$TMP/restored/data
mkdir -p "$TMP/restored"
[ ${#AS_PG[@]} -eq 0 ] || chown "$BENCH_USER:" "$TMP/restored"
# restore_pgw CONFIG FIGURE [pitr]: `pgwarden restore` to the end of the archive.
restore_pgw() {
  local t out=$TMP/out/pgw-restore-$1${3:+-$3}.log sampler=""
  [ -z "${3:-}" ] || { python3 "$REPO/bench/backup.py" startup --data-dir "$RESTORED" \
    --out "$TMP/out/startup-pgwarden.json" --timeout "$TIMEOUT" & sampler=$!; }
  t=$(now_us)
  as_pg env PGWARDEN_LOG_LEVEL=info,postgres=debug "$BIN" restore --config "$TMP/pgw/$1.toml" \
    --data-dir "$RESTORED" --s3-endpoint "http://127.0.0.1:$RELAY" >"$out" 2>&1 ||
    { show_log "$out"; die "pgwarden restore ($1) failed"; }
  fig "$2" s lower pgwarden "$(secs_since "$t")"
  [ -z "$sampler" ] || wait "$sampler"
  REDO_LOG=$out
}
# restore_pgbr NAME FIGURE [pitr]: `pgbackrest restore`, then Postgres until it accepts
# connections (it replays and promotes on its own), then a fast shutdown.
restore_pgbr() {
  local t out=$TMP/out/pgbr-restore-$1${3:+-$3}.log sampler=""
  shift
  [ -z "${2:-}" ] || { python3 "$REPO/bench/backup.py" startup --data-dir "$RESTORED" \
    --out "$TMP/out/startup-pgbackrest.json" --timeout "$TIMEOUT" & sampler=$!; }
  t=$(now_us)
  as_pg mkdir -m 700 "$RESTORED"
  pgbr restore "--pg1-path=$RESTORED" >"$out" 2>&1 || { show_log "$out"; die "pgbackrest restore failed"; }
  # pgBackRest's own restore_command (archive-get), from postgresql.auto.conf.
  pg_start "$RESTORED" "$out" archive_mode=on archive_command=
  local deadline=$(($(now_us) + TIMEOUT * 1000000))
  until grep -q "database system is ready to accept connections" "$out"; do
    (($(now_us) < deadline)) || { show_log "$out"; die "pgBackRest's restore did not finish"; }
    gone "$SERVER_PID" && { show_log "$out"; die "pgBackRest's restored Postgres exited"; }
    nap
  done
  server_stop INT
  fig "$1" s lower pgbackrest "$(secs_since "$t")"
  [ -z "$sampler" ] || wait "$sampler"
  REDO_LOG=$out
}
clear_restored() { rm -rf -- "$RESTORED"; }

log "pgwarden: restore from the directory"
restore_pgw dir "restore from a directory (latest), time"
clear_restored
log "pgwarden: restore from s3s-fs"
restore_pgw s3 "restore from s3s-fs (latest), time"
clear_restored
pgbr_config posix
log "pgBackRest: restore from the directory"
restore_pgbr dir "restore from a directory (latest), time"
clear_restored
pgbr_config s3 "$RELAY_TLS"
log "pgBackRest: restore from s3s-fs"
restore_pgbr s3 "restore from s3s-fs (latest), time"
clear_restored

# ---------------------------------------------------------------------------------------
# Archiving a backlog through the latency relay, then the point-in-time replay of it.
# ---------------------------------------------------------------------------------------
# make_wal TOOL: pgbench until BENCH_WAL_MB of WAL is written, then a segment switch.
make_wal() {
  local start now pid before after deadline=$(($(now_us) + TIMEOUT * 1000000))
  start=$(psql_at "SELECT pg_current_wal_lsn()")
  # What the WAL holds (records, full-page images) tells replay times apart.
  before=$(psql_at "SELECT wal_records || ' ' || wal_fpi FROM pg_stat_wal")
  ${AS_PG[@]+"${AS_PG[@]}"} "$PG_BIN/pgbench" -n -c "$CLIENTS" -j 2 -T "$TIMEOUT" -h "$TMP/run" -p "$PG_PORT" \
    -U postgres postgres >"$TMP/out/pgbench-$1.log" 2>&1 &
  pid=$!
  PIDS+=($pid)
  while :; do
    now=$(psql_at "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$start')")
    ((${now%.*} >= WAL_MB * 1000000)) && break
    (($(now_us) < deadline)) || die "$1: pgbench did not write ${WAL_MB} MB of WAL"
    gone "$pid" && { show_log "$TMP/out/pgbench-$1.log"; die "$1: pgbench exited"; }
    sleep 1
  done
  signal_pid "$pid" TERM # not INT: a background job of a script starts with SIGINT ignored
  wait_gone "$pid" 30 || die "pgbench did not stop"
  psql_at "SELECT pg_switch_wal()" >/dev/null
  after=$(psql_at "SELECT wal_records || ' ' || wal_fpi FROM pg_stat_wal")
  fig "WAL written after the backups" MB info "$1" "$(mb "$now")"
  fig "  of which records" thousand info "$1" "$(awk -v a="${before% *}" -v b="${after% *}" 'BEGIN { printf "%.0f", (b - a) / 1000 }')"
  fig "  of which full-page images" thousand info "$1" "$(awk -v a="${before#* }" -v b="${after#* }" 'BEGIN { printf "%.0f", (b - a) / 1000 }')"
}
# archive_backlog TOOL DATA_DIR STORE_DIR SLOW_PORT plain|tls: the relay back up, the backlog
# timed.
archive_backlog() {
  local out=$TMP/out/backlog-$1.json
  python3 "$REPO/bench/backup.py" backlog --dir "$2/pg_wal/archive_status" --store "$3" \
    --out "$out" --timeout "$TIMEOUT" &
  local sampler=$!
  relay "$4" "$LATENCY" "$5"
  psql_at "SELECT pg_reload_conf()" >/dev/null # wakes Postgres's archiver from its retry wait
  wait "$sampler"
  [ "$(json_field "$out" drained)" = True ] || die "$1: the archive backlog did not drain"
  fig "archiving +${LATENCY} ms, backlog" segments info "$1" "$(json_field "$out" backlog)"
  fig "archiving +${LATENCY} ms, caught up after" s lower "$1" "$(json_field "$out" caught_up_s)"
  fig "archiving +${LATENCY} ms, rate" segments/s higher "$1" "$(json_field "$out" per_s)"
}
# pitr_figures TOOL: replay time from Postgres's log, the startup process's waiting share.
pitr_figures() {
  local redo share j=$TMP/out/startup-$1.json
  redo=$(sed -n 's/.*redo done at .*elapsed: \([0-9.]*\) s.*/\1/p' "$REDO_LOG" | tail -n1)
  fig "PITR replay (Postgres redo), time" s lower "$1" "${redo:--}"
  [ "$(json_field "$j" found)" = True ] || die "$1: the startup process was not found"
  fig "PITR: startup process alive" s info "$1" "$(json_field "$j" lifetime_s)"
  fig "PITR: share of that waiting for WAL" % lower "$1" \
    "$(awk -v s="$(json_field "$j" waiting_share)" 'BEGIN { printf "%.1f", 100 * s }')"
  share=$(python3 "$REPO/bench/backup.py" window --startup "$j" --log "$REDO_LOG")
  fig "PITR: share of the replay waiting for WAL" % lower "$1" "${share%% *}"
  log "$1: startup process wait channels: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["channels"])' "$j")"
}

log "pgwarden: ${WAL_MB} MB of WAL with the store unreachable"
unrelay "$SLOW"
pgw_start slow
make_wal pgwarden
log "pgwarden: archiving the backlog, +${LATENCY} ms per request"
archive_backlog pgwarden "$PGW_DATA" "$TMP/s3/bench/pgw/wal" "$SLOW" plain
server_stop
log "pgwarden: point-in-time restore from s3s-fs"
restore_pgw s3 "PITR restore from s3s-fs (latest), total" pitr
pitr_figures pgwarden
clear_restored

log "pgBackRest: ${WAL_MB} MB of WAL with the store unreachable"
unrelay "$SLOW_TLS"
pgbr_config s3 "$SLOW_TLS"
pgbr_start
make_wal pgbackrest
log "pgBackRest: archiving the backlog, +${LATENCY} ms per request"
archive_backlog pgbackrest "$PGBR_DATA" "$TMP/s3/bench/pgbr/archive" "$SLOW_TLS" tls
server_stop INT
pgbr_config s3 "$RELAY_TLS"
log "pgBackRest: point-in-time restore from s3s-fs"
restore_pgbr s3 "PITR restore from s3s-fs (latest), total" pitr
pitr_figures pgbackrest
clear_restored

echo
echo "scale $SCALE ($(mb "$DB_BYTES") MB), zstd, $WORKERS workers (wal.parallelism = process-max)," \
  "pgBackRest $("$PGBR" version | cut -d' ' -f2), load at the end $(load_average)"
python3 "$REPO/bench/backup.py" report "$FIGURES"
