#!/usr/bin/env python3
"""Helpers of bench/wal_archive.sh (standard library only).

  proxy   --listen PORT --target PORT --delay-ms N [--tls-cert PEM --tls-key PEM]
          TCP proxy on 127.0.0.1 that holds the first byte of every response for N ms: a fixed
          added latency per request, like a remote object store. With a certificate it also
          terminates TLS (for clients that speak S3 only over HTTPS, such as pgBackRest).
  sample  --status-port P --out CSV --stop-file F [--interval S]
          polls pgwarden's /pg/status until F exists; one CSV row per poll:
          unix_time, ready_count, archived_count, failed_count
  report  --load-start T --load-end T --svg OUT [--latency-ms N --workers N] NAME=CSV...
          prints the figures of each run and draws the ready backlog of all runs into one SVG.
"""

import argparse
import asyncio
import csv
import json
import os
import socket
import ssl
import sys
import time
import urllib.request


# ---------------------------------------------------------------------------------------
# proxy
# ---------------------------------------------------------------------------------------
async def pipe(reader, writer, on_data):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            await on_data(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def proxy(listen, target, delay, tls=None):
    async def handle(cr, cw):
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            cw.close()
            return
        # No Nagle on either leg: a response's header and body are separate writes, and
        # holding the second for the client's delayed ACK would add ~40 ms per request.
        for w in (cw, sw):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        state = {"request_pending": False}

        async def upstream(_):
            state["request_pending"] = True

        async def downstream(_):
            # The first bytes of each response wait: one added latency per request.
            if state["request_pending"]:
                state["request_pending"] = False
                await asyncio.sleep(delay)

        await asyncio.gather(pipe(cr, sw, upstream), pipe(sr, cw, downstream))

    context = None
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
    server = await asyncio.start_server(handle, "127.0.0.1", listen, ssl=context)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------
def sample(port, out, stop_file, interval):
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["time", "ready", "archived", "failed"])
        while not os.path.exists(stop_file):
            t = time.time()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/pg/status", timeout=2) as r:
                    doc = json.load(r)
                a = (doc.get("postgres") or {}).get("archiver") or {}
                w.writerow([f"{t:.3f}", a.get("ready_count", ""), a.get("archived_count", ""),
                            a.get("failed_count", "")])
                f.flush()
            except Exception:
                pass
            time.sleep(max(0.0, interval - (time.time() - t)))


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
def load_csv(path):
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            if r["ready"] == "":
                continue
            rows.append((float(r["time"]), int(r["ready"]), int(r["archived"] or 0)))
    return rows


def figures(rows, start, end):
    during = [r for r in rows if start <= r[0] <= end]
    before = [r for r in rows if r[0] <= start] or rows[:1]
    archived_start = before[-1][2]
    at_end = [r for r in rows if r[0] <= end][-1]
    peak = max(r[1] for r in rows)
    drained = next((r for r in rows if r[0] > end and r[1] == 0), None)
    drain = (drained[0] - end) if drained else None
    backlog_end = at_end[1]
    final = drained or rows[-1]
    archived_total = final[2] - archived_start
    return {
        "archived_per_s_load": (at_end[2] - archived_start) / (end - start),
        "generated_per_s": (at_end[2] - archived_start + backlog_end - before[-1][1]) / (end - start),
        "peak_backlog": peak,
        "backlog_at_end": backlog_end,
        "drain_s": drain,
        "drain_rate": (backlog_end / drain) if drain and backlog_end else None,
        "archived_total": archived_total,
        "samples": len(during),
    }


def svg(runs, start, out):
    w, h, ml, mr, mt, mb = 860, 420, 70, 20, 40, 50
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    tmax = max(r[0] - start for rows in runs.values() for r in rows) or 1
    ymax = max(max(r[1] for r in rows) for rows in runs.values()) or 1
    ymax = int(ymax * 1.1) + 1
    x = lambda t: ml + (w - ml - mr) * max(0.0, t) / tmax
    y = lambda v: h - mb - (h - mt - mb) * v / ymax
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="15">'
             f'WAL waiting to be archived (.ready files) under pgbench write load</text>']
    for i in range(6):
        v = ymax * i / 5
        parts.append(f'<line x1="{ml}" x2="{w - mr}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{ml - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    for i in range(7):
        t = tmax * i / 6
        parts.append(f'<text x="{x(t):.1f}" y="{h - mb + 18}" text-anchor="middle">{t:.0f}</text>')
    parts.append(f'<text x="{(ml + w - mr) / 2}" y="{h - 10}" text-anchor="middle">'
                 f'seconds since the load started</text>')
    parts.append(f'<text x="18" y="{(mt + h - mb) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 18 {(mt + h - mb) / 2})">ready segments</text>')
    parts.append(f'<line x1="{ml}" x2="{ml}" y1="{mt}" y2="{h - mb}" stroke="black"/>')
    parts.append(f'<line x1="{ml}" x2="{w - mr}" y1="{h - mb}" y2="{h - mb}" stroke="black"/>')
    for i, (name, rows) in enumerate(runs.items()):
        c = colours[i % len(colours)]
        pts = " ".join(f"{x(t - start):.1f},{y(v):.1f}" for t, v, _ in rows if t >= start)
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<rect x="{ml + 20}" y="{mt + 10 + 18 * i}" width="14" height="4" fill="{c}"/>')
        parts.append(f'<text x="{ml + 40}" y="{mt + 16 + 18 * i}">{name}</text>')
    parts.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(parts) + "\n")


def report(args):
    runs = {}
    for spec in args.runs:
        name, path = spec.split("=", 1)
        runs[name] = load_csv(path)
    starts = {n: float(v) for n, v in (s.split("=") for s in args.load_start)}
    ends = {n: float(v) for n, v in (s.split("=") for s in args.load_end)}
    print(f"{'run':<12} {'WAL made/s':>10} {'archived/s':>10} {'peak backlog':>12} "
          f"{'backlog at end':>14} {'drain time':>10} {'drain rate/s':>12}")
    for name, rows in runs.items():
        f = figures(rows, starts[name], ends[name])
        drain = f"{f['drain_s']:.1f} s" if f["drain_s"] is not None else "not drained"
        rate = f"{f['drain_rate']:.1f}" if f["drain_rate"] else "-"
        print(f"{name:<12} {f['generated_per_s']:>10.2f} {f['archived_per_s_load']:>10.2f} "
              f"{f['peak_backlog']:>12} {f['backlog_at_end']:>14} {drain:>10} {rate:>12}")
    # Each run's time axis starts at its own load start.
    shifted = {n: [(t - starts[n], v, a) for t, v, a in rows] for n, rows in runs.items()}
    svg(shifted, 0.0, args.svg)
    print(f"plot: {args.svg}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("proxy")
    a.add_argument("--listen", type=int, required=True)
    a.add_argument("--target", type=int, required=True)
    a.add_argument("--delay-ms", type=float, required=True)
    a.add_argument("--tls-cert")
    a.add_argument("--tls-key")
    a = sub.add_parser("sample")
    a.add_argument("--status-port", type=int, required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--stop-file", required=True)
    a.add_argument("--interval", type=float, default=0.5)
    a = sub.add_parser("report")
    a.add_argument("--load-start", action="append", required=True, help="NAME=unix time")
    a.add_argument("--load-end", action="append", required=True, help="NAME=unix time")
    a.add_argument("--svg", required=True)
    a.add_argument("runs", nargs="+", help="NAME=CSV")
    args = p.parse_args()
    if args.cmd == "proxy":
        try:
            tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
            asyncio.run(proxy(args.listen, args.target, args.delay_ms / 1000.0, tls))
        except KeyboardInterrupt:
            pass
    elif args.cmd == "sample":
        sample(args.status_port, args.out, args.stop_file, args.interval)
    else:
        report(args)


if __name__ == "__main__":
    sys.exit(main())
