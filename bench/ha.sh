#!/usr/bin/env bash
# High-availability figures of a three-instance pgwarden cluster.
#
# Runs the ignored test `ha_figures` in tests/ha_bench.rs (release build): three pgwarden
# instances with real PostgreSQL 15 against the test Kubernetes API server, all on loopback,
# with the default failover timings (Lease 10 s, renew deadline 6 s, retry period 2 s) and
# quorum commit with one synchronous standby. A timed writer inserts increasing ids on whichever
# instance takes them and records when each commit is acknowledged. Each scenario runs
# PGW_BENCH_RUNS times, with every instance streaming from the primary before each run:
#
#   recovery time, from the failure to the first acknowledged write after it:
#     pod loss         kill -9 of the primary's pgwarden and Postgres   target <= lease + 2 s (12 s)
#     hung primary     SIGSTOP of the primary's pgwarden and Postgres   target <= lease + 2 s (12 s)
#     postgres crash   SIGKILL of the primary's postmaster only         target < 3 s
#   write unavailability, the longest gap between acknowledged writes from the last one before
#   the request until every instance streams again:
#     switchover       pgwarden.dev/switchover-to the most advanced standby   target < 2 s
#     SIGTERM          SIGTERM of the primary's pgwarden                      target < 2 s
#   acknowledged commits lost: every acknowledged id is looked up on the primary after each
#   run                                                                       target 0
#
# It prints progress lines as it goes and, at the end, a table (min / median / p90 / max seconds
# per scenario, the target, commits lost) and a table of supporting figures. See
# bench/README.md for the method.
#
# Needs PostgreSQL 15 in /usr/lib/postgresql/15/bin, like the integration tests, and runs as
# they do: as root (Postgres then runs as the `postgres` user) or as a user that can run
# postgres. Each instance lives in its own temporary directory, on free loopback ports; the
# test removes them when it ends, also when it fails. A run that hangs fails after 120 s with
# the instances' logs. At 10 runs a scenario it takes about 10 minutes, plus the build.
#
# Environment:
#   PGW_BENCH_RUNS        runs per scenario (default 10)
#   PGW_BENCH_SCENARIOS   a comma-separated subset of pod-loss,hung,crash,switchover,sigterm
#   PGW_TEST_ECHO         set to echo every pgwarden log line (noisy)
#   CARGO_TARGET_DIR      honoured by cargo
#
# The test keeps the caller's PGWARDEN_* variables away from the pgwarden processes it starts.
set -euo pipefail

RUNS=${PGW_BENCH_RUNS:-10}
[[ $RUNS =~ ^[0-9]+$ ]] && ((RUNS >= 1)) || {
  echo "ha.sh: PGW_BENCH_RUNS must be a whole number >= 1 (got $RUNS)" >&2
  exit 1
}
[ -x /usr/lib/postgresql/15/bin/postgres ] || {
  echo "ha.sh: /usr/lib/postgresql/15/bin/postgres not found (PostgreSQL 15 is needed)" >&2
  exit 1
}

cd "$(dirname "$0")/.."
echo "-- load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
PGW_BENCH_RUNS=$RUNS cargo test --release --test ha_bench -- --ignored --nocapture --test-threads=1
echo "-- load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
