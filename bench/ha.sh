#!/usr/bin/env bash
# High-availability figures of a three-instance pgwarden cluster.
#
#   bench/ha.sh                  pgwarden's figures
#   bench/ha.sh --with-patroni   pgwarden's, then Patroni's (bench/peers/patroni.sh) on the same
#                                machine, one after the other, then a table of both figures with
#                                the ratio pgwarden / Patroni
#
# Runs the ignored test `ha_figures` in tests/ha_bench/ (release build): three pgwarden
# instances with real PostgreSQL 15 against the test Kubernetes API server, all on loopback, at
# pgwarden's default instance configuration (monitor 2 s, api_timeout 5 s), with the default
# failover timings (Lease 10 s, renew deadline 6 s, retry period 2 s) and quorum commit with one
# synchronous standby (PGW_BENCH_PROFILE and PGW_BENCH_MODE change the last two). A timed writer
# inserts increasing ids on whichever instance takes them and records when each commit is
# acknowledged. Each scenario runs PGW_BENCH_RUNS times, with every instance streaming from the
# primary before each run:
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
# per scenario, the target, commits lost), a table of supporting figures, and the footprint of
# each pgwarden process alone (VmRSS, and CPU over an idle period with the writer stopped). See
# bench/README.md for the method.
#
# Needs PostgreSQL 15 in /usr/lib/postgresql/15/bin, like the integration tests, and runs as
# they do: as root (Postgres then runs as the `postgres` user) or as a user that can run
# postgres. Each instance lives in its own temporary directory, on free loopback ports; the
# test removes them when it ends, also when it fails. A run that hangs fails after 120 s with
# the instances' logs. At 10 runs a scenario it takes about 10 minutes, plus the build and the
# idle period; --with-patroni about as long again (see bench/peers/patroni.sh for its needs).
#
# Environment (both sides read the same variables):
#   PGW_BENCH_RUNS          runs per scenario (default 10)
#   PGW_BENCH_SCENARIOS     a comma-separated subset of pod-loss,hung,crash,switchover,sigterm
#   PGW_BENCH_MODE          quorum (default: quorum commit ANY 1; Patroni: synchronous mode) or
#                           async (asynchronous replication on both)
#   PGW_BENCH_PROFILE       default (Lease 10 / 6 / 2 s) or fast (Lease 5 / 3 / 1 s, with
#                           api_timeout 2 s); Patroni gets ttl = lease duration, loop_wait =
#                           retry period, retry_timeout = renew deadline - retry period
#   PGW_BENCH_IDLE_SECONDS  the idle period of the footprint (default 60; 0 skips it)
#   PGW_TEST_ECHO           set to echo every pgwarden log line (noisy)
#   CARGO_TARGET_DIR        honoured by cargo
#
# The test keeps the caller's PGWARDEN_* variables away from the pgwarden processes it starts.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}
WITH_PATRONI=0
for arg in "$@"; do
  case $arg in
    --with-patroni) WITH_PATRONI=1 ;;
    -h | --help) usage ;;
    *)
      echo "ha.sh: unknown argument $arg (see --help)" >&2
      exit 2
      ;;
  esac
done

RUNS=${PGW_BENCH_RUNS:-10}
[[ $RUNS =~ ^[0-9]+$ ]] && ((RUNS >= 1)) || {
  echo "ha.sh: PGW_BENCH_RUNS must be a whole number >= 1 (got $RUNS)" >&2
  exit 1
}
case ${PGW_BENCH_MODE:-quorum} in
  quorum | async) ;;
  *)
    echo "ha.sh: PGW_BENCH_MODE must be quorum or async (got $PGW_BENCH_MODE)" >&2
    exit 1
    ;;
esac
case ${PGW_BENCH_PROFILE:-default} in
  default | fast) ;;
  *)
    echo "ha.sh: PGW_BENCH_PROFILE must be default or fast (got $PGW_BENCH_PROFILE)" >&2
    exit 1
    ;;
esac
[ -x /usr/lib/postgresql/15/bin/postgres ] || {
  echo "ha.sh: /usr/lib/postgresql/15/bin/postgres not found (PostgreSQL 15 is needed)" >&2
  exit 1
}

cd "$(dirname "$0")/.."
export PGW_BENCH_RUNS=$RUNS
pgwarden_figures() {
  echo "-- pgwarden: load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  cargo test --release --test ha_bench -- --ignored --nocapture --test-threads=1
  echo "-- pgwarden: load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
}
if [ "$WITH_PATRONI" -eq 0 ]; then
  pgwarden_figures
  exit 0
fi

# Both, one after the other; each side's stdout is kept for the comparison.
command -v python3 >/dev/null || {
  echo "ha.sh: --with-patroni needs python3" >&2
  exit 1
}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/pgwarden-ha-compare.XXXXXX")
trap 'rm -rf -- "$OUT"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
pgwarden_figures | tee "$OUT/pgwarden"
echo "-- Patroni: bench/peers/patroni.sh" >&2
# A Patroni run that failed (the cluster stuck, see bench/README.md) still has the figures of the
# runs before it: they are compared, and the script then exits with the failure.
patroni_status=0
bench/peers/patroni.sh | tee "$OUT/patroni" || patroni_status=$?

# The `ha-bench-figure` lines of both sides, side by side.
python3 - "$OUT/pgwarden" "$OUT/patroni" <<'PY'
import sys

LABELS = {
    "pod-loss": "pod loss (kill -9), recovery",
    "hung": "hung primary (SIGSTOP), recovery",
    "crash": "postgres crash, manager alive, recovery",
    "switchover": "switchover, unavailability",
    "sigterm": "primary SIGTERM, unavailability",
}


def read(path):
    setup, scenarios, footprint = {}, {}, {}
    for line in open(path):
        words = line.split()
        if len(words) < 2 or words[0] != "ha-bench-figure":
            continue
        kv = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        if words[1] == "setup":
            setup = kv
        elif words[1] == "scenario":
            v = [] if kv["seconds"] == "-" else [float(x) for x in kv["seconds"].split(",")]
            scenarios[words[2]] = (sorted(v), int(kv["lost"]))
        elif words[1] == "footprint":
            footprint = {k: sorted(float(x) for x in v.split(",")) for k, v in kv.items()}
        elif words[1] == "incomplete":
            setup["incomplete"] = "%s run %s failed" % (kv.get("scenario"), kv.get("run"))
    return setup, scenarios, footprint


def median(v):
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def ratio(a, b):
    return "%.2f" % (a / b) if b else "-"


def trio(v):
    return "%.2f/%.2f/%.2f" % (v[0], median(v), v[-1])


pgw, pat = read(sys.argv[1]), read(sys.argv[2])
for name, side in (("pgwarden", pgw), ("Patroni", pat)):
    if not side[1]:
        sys.exit("ha.sh: no figures from %s" % name)
s, t = pgw[0], pat[0]
print()
print("pgwarden vs Patroni, on the same machine one after the other: mode %s, lease %s s / "
      "renew deadline %s s / retry %s s (profile %s), %s runs per scenario"
      % (s.get("mode"), s.get("lease"), s.get("renew_deadline"), s.get("retry"),
         s.get("profile"), s.get("runs")))
if "incomplete" in t:
    print("Patroni INCOMPLETE: %s; its figures are those of the runs before, and no later "
          "scenario ran" % t["incomplete"])
if (s.get("mode"), s.get("profile")) != (t.get("mode"), t.get("profile")):
    print("WARNING: the two sides ran different settings: %s / %s" % (s, t))
print("%-40s %-20s %-20s %-17s %s" % ("seconds", "pgwarden min/med/max", "Patroni min/med/max",
                                      "ratio min/med/max", "lost pgwarden/Patroni"))
for key, label in LABELS.items():
    if key not in pgw[1] or key not in pat[1]:
        continue
    (a, la), (b, lb) = pgw[1][key], pat[1][key]
    if not a or not b:
        continue
    ratios = "/".join(ratio(x, y) for x, y in ((a[0], b[0]), (median(a), median(b)), (a[-1], b[-1])))
    print("%-40s %-20s %-20s %-17s %d/%d" % (label, trio(a), trio(b), ratios, la, lb))
fa, fb = pgw[2], pat[2]
if fa and fb:
    print("%-40s %-20s %-20s %s" % ("manager process alone, 3 instances", "pgwarden med/max",
                                    "Patroni med/max", "ratio med/max"))
    for key, label, fmt in (("rss_mib", "VmRSS MiB", "%.1f/%.1f"),
                            ("cpu_percent", "idle CPU, % of one core", "%.3f/%.3f")):
        a, b = fa[key], fb[key]
        print("%-40s %-20s %-20s %s/%s" % (
            label, fmt % (median(a), a[-1]), fmt % (median(b), b[-1]),
            ratio(median(a), median(b)), ratio(a[-1], b[-1])))
PY
exit "$patroni_status"
