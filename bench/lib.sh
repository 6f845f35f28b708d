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
