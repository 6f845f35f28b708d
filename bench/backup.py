#!/usr/bin/env python3
"""Helpers of bench/backup.sh (standard library only, Linux /proc).

  startup  --data-dir D --out JSON [--interval-ms 10] [--timeout S]
           waits for D/postmaster.pid, finds the postmaster's startup process and samples
           its kernel wait channel until it exits. While restore_command runs, the startup
           process sits in system()'s waitpid (wchan `do_wait`: the wait event
           RestoreCommand); no WAL is replayed meanwhile. Writes the startup process's
           lifetime, the share of samples in `do_wait` and the most frequent channels.
  backlog  --dir ARCHIVE_STATUS --store DIR --out JSON [--interval-ms 50] [--timeout S]
           counts .ready files, and the WAL segments stored under DIR (the store's files),
           until no .ready file is left. The rate is the segments stored meanwhile, less one,
           over the time from the first one's arrival to the last one's: the steady rate,
           without either tool's retry pause before its first upload (which `caught_up_s`,
           from the start to an empty backlog, includes).
  window   --startup JSON --log LOG
           the same share within the replay alone: from Postgres's "redo starts at" to its
           "redo done at" (their log times), printed as "PERCENT SAMPLES".
  report   FIGURES.tsv
           prints each figure for both tools and the ratio pgwarden / pgBackRest.
"""

import argparse
import collections
import datetime
import json
import os
import re
import sys
import time


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def ppid_and_cmdline(pid):
    stat = read(f"/proc/{pid}/stat")
    if stat is None:
        return None, ""
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    cmd = read(f"/proc/{pid}/cmdline") or ""
    return ppid, cmd.replace("\0", " ").strip()


def find_startup(postmaster):
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        ppid, cmd = ppid_and_cmdline(name)
        if ppid == postmaster and cmd.startswith("postgres: startup"):
            return int(name)
    return None


def startup(args):
    deadline = time.time() + args.timeout
    interval = args.interval_ms / 1000.0
    pid_file = os.path.join(args.data_dir, "postmaster.pid")
    postmaster = child = None
    while time.time() < deadline and child is None:
        text = read(pid_file)
        if text and text.split("\n", 1)[0].strip().isdigit():
            postmaster = int(text.split("\n", 1)[0])
            child = find_startup(postmaster)
        if child is None:
            time.sleep(interval)
    result = {"found": child is not None}
    if child is not None:
        channels = collections.Counter()
        trace = []  # (time, 1 when in restore_command)
        first = time.time()
        last = first
        while time.time() < deadline:
            wchan = read(f"/proc/{child}/wchan")
            if wchan is None:
                break
            last = time.time()
            channels[wchan if wchan not in ("", "0") else "running"] += 1
            trace.append((round(last, 3), int(wchan == "do_wait")))
            time.sleep(interval)
        samples = sum(channels.values())
        result.update({
            "lifetime_s": last - first,
            "samples": samples,
            "waiting_share": channels["do_wait"] / samples if samples else 0.0,
            "channels": dict(channels.most_common(6)),
            "trace": trace,
        })
    with open(args.out, "w") as f:
        json.dump(result, f)


LOG_TIME = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC \[\d+\] LOG:  "


def log_time(text, what):
    """Unix time of the last Postgres log line with `what` (log_line_prefix '%m [%p] ')."""
    found = re.findall(LOG_TIME + re.escape(what), text)
    if not found:
        return None
    t = datetime.datetime.strptime(found[-1], "%Y-%m-%d %H:%M:%S.%f")
    return t.replace(tzinfo=datetime.timezone.utc).timestamp()


def window(args):
    """The share of the startup samples in restore_command between "redo starts" and "redo
    done" (the replay itself, without the start-up sync before it or the promotion after)."""
    trace = json.load(open(args.startup)).get("trace") or []
    text = open(args.log, errors="replace").read()
    start, done = log_time(text, "redo starts at"), log_time(text, "redo done at")
    inside = [w for t, w in trace if start is not None and done is not None and start <= t <= done]
    share = 100.0 * sum(inside) / len(inside) if inside else float("nan")
    print(f"{share:.1f} {len(inside)}")


def ready_count(directory):
    try:
        return sum(1 for n in os.listdir(directory) if n.endswith(".ready"))
    except OSError:
        return -1


SEGMENT = re.compile(r"^[0-9A-F]{24}($|[.-])")


def stored_segments(root):
    """WAL segments stored under root, by either tool's layout (one file per segment)."""
    n = 0
    for _, _, files in os.walk(root):
        n += sum(1 for f in files
                 if SEGMENT.match(f) and ".backup" not in f and ".partial" not in f)
    return n


def backlog(args):
    interval = args.interval_ms / 1000.0
    start = time.time()
    deadline = start + args.timeout
    baseline = stored_segments(args.store)
    rows = []  # (time, ready, stored)
    while time.time() < deadline:
        n = ready_count(args.dir)
        rows.append((time.time(), n, stored_segments(args.store)))
        if n == 0:
            break
        time.sleep(interval)
    result = {"backlog": rows[0][1], "drained": rows[-1][1] == 0}
    final = rows[-1][2]
    uploaded = final - baseline
    if result["drained"] and uploaded > 1:
        t_first = next(t for t, _, c in rows if c > baseline)
        t_last = next(t for t, _, c in rows if c == final)
        result.update({
            "uploaded": uploaded,
            "caught_up_s": rows[-1][0] - start,
            "seconds": t_last - t_first,
            "per_s": (uploaded - 1) / max(t_last - t_first, interval),
        })
    with open(args.out, "w") as f:
        json.dump(result, f)


def report(args):
    """FIGURES.tsv: figure, unit, better (lower|higher|info), tool, value."""
    values = collections.OrderedDict()
    for line in open(args.figures):
        figure, unit, better, tool, value = line.rstrip("\n").split("\t")
        entry = values.setdefault(figure, {"unit": unit, "better": better})
        entry[tool] = value

    def number(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    rows = [("figure", "pgwarden", "pgBackRest", "pgwarden / pgBackRest")]
    for figure, e in values.items():
        a, b = e.get("pgwarden", "-"), e.get("pgbackrest", "-")
        fa, fb = number(a), number(b)
        ratio = f"{fa / fb:.2f}" if fa is not None and fb else "-"
        if ratio != "-" and e["better"] in ("lower", "higher"):
            ratio += f" ({e['better']} is better)"
        unit = f" {e['unit']}" if e["unit"] else ""
        rows.append((figure, f"{a}{unit}", f"{b}{unit}", ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("startup")
    a.add_argument("--data-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--interval-ms", type=float, default=10)
    a.add_argument("--timeout", type=float, default=3600)
    a = sub.add_parser("backlog")
    a.add_argument("--dir", required=True)
    a.add_argument("--store", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--interval-ms", type=float, default=50)
    a.add_argument("--timeout", type=float, default=600)
    a = sub.add_parser("window")
    a.add_argument("--startup", required=True)
    a.add_argument("--log", required=True)
    a = sub.add_parser("report")
    a.add_argument("figures")
    args = p.parse_args()
    {"startup": startup, "backlog": backlog, "window": window, "report": report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
