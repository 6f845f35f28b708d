#!/usr/bin/env bash
# Helpers shared by the bench scripts: process bookkeeping over the caller's TMP and PIDS.
# Sourced, not run.

# Sends signal $2 to pid $1 if that process still exists; silent otherwise.
signal_pid() {
  local pid=$1 sig=$2
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && kill "-$sig" "$pid" 2>/dev/null || true
}

# 0 when the process is gone or a zombie.
gone() {
  local pid=$1 stat
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  [ "${stat%% *}" = Z ]
}

# Drops a reaped pid from PIDS, so that the cleanup never signals a recycled pid.
forget() {
  local p kept=()
  for p in ${PIDS[@]+"${PIDS[@]}"}; do [ "$p" = "$1" ] || kept+=("$p"); done
  PIDS=(${kept[@]+"${kept[@]}"})
}

# Waits (bounded) for a process to exit; reaps it when it is our child. 1 on timeout.
wait_gone() {
  local pid=$1 timeout_s=$2 deadline
  deadline=$(($(now_us) + timeout_s * 1000000))
  while ! gone "$pid"; do
    (($(now_us) < deadline)) || return 1
    nap
  done
  wait "$pid" 2>/dev/null || true
  forget "$pid"
  return 0
}

# Postmasters that belong to one of our data directories (found through postmaster.pid,
# checked against the process's command line so a stale file never hits another process).
our_postmasters() {
  [ -n "$TMP" ] && [ -d "$TMP" ] || return 0
  local f pid
  for f in "$TMP"/*/postmaster.pid "$TMP"/*/*/postmaster.pid; do
    [ -f "$f" ] || continue
    pid=$(head -n1 "$f" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] || continue
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$(dirname "$f")"; then
      echo "$pid"
    fi
  done
}

# ---------------------------------------------------------------------------------------
# Time helpers (bash's $EPOCHREALTIME: no process per reading).
# ---------------------------------------------------------------------------------------
now_us() {
  local t=${EPOCHREALTIME/[.,]/}
  echo $((10#$t))
}

show_log() {
  echo "---- last lines of $1 ----" >&2
  tail -n 30 "$1" >&2 || true
}

# ---------------------------------------------------------------------------------------
# Messages, ports and the unprivileged user.
# ---------------------------------------------------------------------------------------
# Prefixed with the running script's name.
die() {
  echo "${0##*/}: $*" >&2
  exit 1
}
log() { echo "-- $*" >&2; }

# free_ports N: sets the array FREE_PORTS to N distinct loopback ports that nothing binds now,
# taken below the kernel's ephemeral range (32768 and up by default), from which outgoing
# connections draw their local ports: a port released there could be taken by a client's
# connection before our server binds it. Needs python3 to test a bind.
free_ports() {
  local n=$1 p tries=0
  FREE_PORTS=()
  while ((${#FREE_PORTS[@]} < n)); do
    ((tries++ < 2000)) || die "no free loopback port found in 20000..31999"
    p=$((20000 + RANDOM % 12000))
    [[ " ${FREE_PORTS[*]} " == *" $p "* ]] && continue
    python3 -c 'import socket, sys; s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' \
      "$p" 2>/dev/null || continue
    FREE_PORTS+=("$p")
  done
}

# Sets AS_PG to the command prefix that runs a program as the OS user $1 when this script runs
# as root (initdb and postgres refuse root), to nothing otherwise; as_pg runs through it.
setup_as_pg() {
  local user=$1
  AS_PG=()
  if [ "$(id -u)" -eq 0 ]; then
    id "$user" >/dev/null 2>&1 || die "running as root needs the OS user $user (initdb refuses root)"
    if command -v setpriv >/dev/null; then
      AS_PG=(setpriv "--reuid=$user" "--regid=$user" --init-groups --)
    else
      AS_PG=(runuser -u "$user" --)
    fi
  fi
}
as_pg() { ${AS_PG[@]+"${AS_PG[@]}"} "$@"; }

# The load average now, for a header.
load_average() { cut -d' ' -f1-3 /proc/loadavg; }

# Waits up to 10 s for each signalled pid to end, then SIGKILLs it; $1 names the caller in
# the message about one that survives even that.
reap_pids() {
  local who=$1 pid
  shift
  for pid in "$@"; do
    if ! wait_gone "$pid" 10; then
      signal_pid "$pid" KILL
      wait_gone "$pid" 5 || echo "$who: could not stop process $pid" >&2
    fi
  done
}
