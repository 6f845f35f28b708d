#!/usr/bin/python3
"""The Patroni side of bench/ha.sh --with-patroni: run by bench/peers/patroni.sh, not directly.

Starts etcd and three Patroni members (PostgreSQL 15 on loopback) in the sandbox that
patroni.sh prepared, runs the scenarios of tests/ha_bench/ against them with the same timed
writer, and prints the same tables and `ha-bench-figure` lines. Settings come from the JSON file
named by the only argument (written by patroni.sh). Every process it starts gets a pid file in
<tmp>/pids, so that patroni.sh's cleanup can end it whatever happens here.

The timed writer (as in tests/ha_bench/): one session while writes succeed (one INSERT, then
10 ms); when it fails, every member at once, each on its own session retried every 50 ms, and
the first that acknowledges a write wins. Connects are bounded by 1 s and every INSERT by 2 s on
the client side (asynchronous psycopg2 connections polled with select): never a server-side
statement_timeout, whose cancel would report a commit waiting for its synchronous standby as a
success. A session that timed out is closed, and its commit is never counted.
"""

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import psycopg2
import psycopg2.extensions

LONG = 120.0  # bound on every wait of a run
CONNECT = 1.0  # the writer's connect bound
STATEMENT = 2.0  # the writer's bound on one INSERT
RETRY = 0.05  # pause after a failed attempt on one member
PACE = 0.01  # pause after an acknowledged commit
SETTLE_WRITES = 20  # acknowledged writes on the primary before each failure
TABLE = "bench_writes"

SCENARIOS = ["pod-loss", "hung", "crash", "switchover", "sigterm"]
LABELS = {
    "pod-loss": "pod loss (kill -9), recovery",
    "hung": "hung primary (SIGSTOP), recovery",
    "crash": "postgres crash, Patroni alive, recovery",
    "switchover": "switchover, unavailability",
    "sigterm": "primary SIGTERM, unavailability",
}

CFG = {}


def now():
    return time.monotonic()


def clock():
    t = time.time()
    return time.strftime("%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


def say(msg):
    print("patroni-bench: " + msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Processes.


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    rest = stat.rsplit(")", 1)[-1].split()
    return bool(rest) and rest[0] not in ("Z", "X")


def all_pids():
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def children_map():
    kids = {}
    for pid in all_pids():
        try:
            with open("/proc/%d/stat" % pid) as f:
                ppid = int(f.read().rsplit(")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(pid)
    return kids


def descendants(pid, kids):
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def processes_in(directory):
    """Processes whose working directory is `directory`: every Postgres process of a data
    directory (the postmaster changes into it, its children inherit it), even when orphaned."""
    wanted = os.path.realpath(directory)
    me = os.getpid()
    out = []
    for pid in all_pids():
        if pid == me:
            continue
        try:
            if os.readlink("/proc/%d/cwd" % pid) == wanted:
                out.append(pid)
        except OSError:
            pass
    return out


def signal_all(pids, sig):
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:
            pass


def wait_gone(pids, within):
    deadline = now() + within
    while True:
        left = [p for p in pids if alive(p)]
        if not left or now() > deadline:
            return left
        time.sleep(0.02)


def write_pid(name, pid):
    with open(os.path.join(CFG["tmp"], "pids", name + ".pid"), "w") as f:
        f.write("%d\n" % pid)


def cpu_ticks(pid):
    """utime + stime of the process itself (all its threads, not its children)."""
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[-1].split()
    return int(rest[14 - 3]) + int(rest[15 - 3])


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError("no VmRSS for pid %d" % pid)


class Member:
    def __init__(self, i):
        self.i = i
        self.name = "pg-%d" % i
        self.pg_port = CFG["pg_ports"][i]
        self.rest_port = CFG["rest_ports"][i]
        self.dir = os.path.join(CFG["tmp"], self.name)
        self.data = os.path.join(self.dir, "data")
        self.config = os.path.join(self.dir, "patroni.yml")
        self.log_path = os.path.join(self.dir, "patroni.log")
        self.proc = None
        self.frozen = []

    def write_config(self):
        t = CFG["timings"]
        pw = CFG["password"]
        conf = {
            "scope": "bench",
            "name": self.name,
            "log": {"level": "INFO"},
            "restapi": {
                "listen": "127.0.0.1:%d" % self.rest_port,
                "connect_address": "127.0.0.1:%d" % self.rest_port,
            },
            "etcd3": {"hosts": ["127.0.0.1:%d" % CFG["etcd_port"]]},
            "bootstrap": {
                "dcs": {
                    "ttl": t["ttl"],
                    "loop_wait": t["loop_wait"],
                    "retry_timeout": t["retry_timeout"],
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": CFG["mode"] == "quorum",
                    "synchronous_node_count": 1,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "wal_log_hints": "on",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"auth": "scram-sha-256"}],
                "pg_hba": [
                    "local all all trust",
                    "host replication replicator 127.0.0.1/32 scram-sha-256",
                    "host all all 127.0.0.1/32 scram-sha-256",
                ],
            },
            "postgresql": {
                "listen": "127.0.0.1:%d" % self.pg_port,
                "connect_address": "127.0.0.1:%d" % self.pg_port,
                "data_dir": self.data,
                "bin_dir": CFG["pg_bin"],
                "pgpass": os.path.join(self.dir, "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": pw},
                    "replication": {"username": "replicator", "password": pw + "-r"},
                },
                "parameters": {"unix_socket_directories": self.dir},
                "remove_data_directory_on_rewind_failure": True,
                "remove_data_directory_on_diverged_timelines": True,
            },
            "watchdog": {"mode": "off"},
            "tags": {},
        }
        # JSON is YAML: Patroni reads it as its configuration file.
        with open(self.config, "w") as f:
            json.dump(conf, f, indent=1)
        os.chmod(self.config, 0o644)

    def start(self):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            CFG["as_pg"] + [CFG["patroni"], self.config],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,
        )
        log.close()
        write_pid(self.name, self.proc.pid)

    def patroni_pid(self):
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        return None

    def processes(self):
        """Patroni, its descendants, and every process in the data directory (with theirs)."""
        kids = children_map()
        out = []
        p = self.patroni_pid()
        if p is not None:
            out.append(p)
            out += descendants(p, kids)
        for q in processes_in(self.data):
            out.append(q)
            out += descendants(q, kids)
        seen = []
        for q in out:
            if q not in seen and alive(q):
                seen.append(q)
        return seen

    def kill9(self):
        """kill -9 of Patroni and every Postgres process of the member (a lost pod)."""
        pids = self.processes()
        for _ in range(10):
            signal_all(pids, signal.SIGKILL)
            more = [p for p in self.processes() if p not in pids]
            if not more:
                break
            pids += more
        left = wait_gone(pids, 10)
        if left:
            raise BenchError("%s: processes %s survived SIGKILL" % (self.name, left))
        self.reap(10)

    def freeze(self):
        """SIGSTOP of Patroni first, then everything under it, until no new process appears."""
        for _ in range(10):
            new = [p for p in self.processes() if p not in self.frozen]
            if not new:
                break
            signal_all(new, signal.SIGSTOP)
            self.frozen += new

    def thaw(self):
        signal_all(self.frozen, signal.SIGCONT)
        self.frozen = []

    def postmaster_pid(self):
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                pid = int(f.readline().strip())
        except (OSError, ValueError):
            return None
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
        return pid if self.data in cmd else None

    def reap(self, within):
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, n=60):
        """The last lines of the member's log, without the refused writes of the writer."""
        noise = ("read-only transaction", "STATEMENT:  INSERT INTO " + TABLE)
        try:
            with open(self.log_path, errors="replace") as f:
                lines = [x for x in f if not any(k in x for k in noise)]
            return "".join(lines[-n:])
        except OSError:
            return ""


def start_etcd():
    d = os.path.join(CFG["tmp"], "etcd")
    peer = "http://127.0.0.1:%d" % CFG["etcd_peer_port"]
    client = "http://127.0.0.1:%d" % CFG["etcd_port"]
    log = open(os.path.join(CFG["tmp"], "etcd.log"), "ab")
    proc = subprocess.Popen(
        CFG["as_pg"]
        + [
            CFG["etcd"],
            "--name=bench",
            "--data-dir=" + os.path.join(d, "data"),
            "--listen-client-urls=" + client,
            "--advertise-client-urls=" + client,
            "--listen-peer-urls=" + peer,
            "--initial-advertise-peer-urls=" + peer,
            "--initial-cluster=bench=" + peer,
            "--initial-cluster-state=new",
            "--initial-cluster-token=pgwarden-bench",
            "--log-level=warn",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=d,
        start_new_session=True,
    )
    log.close()
    write_pid("etcd", proc.pid)
    deadline = now() + 60
    while True:
        try:
            with urllib.request.urlopen(client + "/health", timeout=1) as r:
                if json.loads(r.read()).get("health") in ("true", True):
                    return proc
        except (OSError, ValueError):
            pass
        if proc.poll() is not None or now() > deadline:
            raise BenchError("etcd did not become healthy within 60 s (see etcd.log)")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Postgres sessions.


def wait_ready(conn, deadline):
    """Polls an asynchronous connection until its operation is done: True, False on timeout;
    raises psycopg2.Error on failure."""
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return True
        left = deadline - now()
        if left <= 0:
            return False
        if state == psycopg2.extensions.POLL_READ:
            select.select([conn.fileno()], [], [], left)
        elif state == psycopg2.extensions.POLL_WRITE:
            select.select([], [conn.fileno()], [], left)
        else:
            raise psycopg2.OperationalError("bad poll state %r" % state)


def close(conn):
    try:
        conn.close()
    except Exception:
        pass


def pg_connect(port, application_name, connect_timeout, **extra):
    """A session as the bench's user on loopback (psycopg2.connect's errors pass through)."""
    return psycopg2.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password=CFG["password"],
        dbname="postgres",
        application_name=application_name,
        connect_timeout=connect_timeout,
        **extra,
    )


def connect_async(port, within):
    try:
        conn = pg_connect(port, "patroni-bench", max(1, int(within)), async_=1)
    except psycopg2.Error:
        return None
    try:
        if wait_ready(conn, now() + within):
            return conn
    except (psycopg2.Error, OSError, ValueError):
        pass
    close(conn)
    return None


def insert(conn, ident):
    """(acknowledged at, keep the session): one INSERT bounded by STATEMENT on the client."""
    try:
        cur = conn.cursor()
        cur.execute("INSERT INTO %s (id) VALUES (%%s)" % TABLE, (ident,))
        if wait_ready(conn, now() + STATEMENT):
            return (now() if cur.rowcount == 1 else None), True
        return None, False
    except psycopg2.Error as e:
        # A statement error (read-only transaction) on a live session keeps it.
        return None, (e.pgcode is not None and not conn.closed)
    except (OSError, ValueError):
        return None, False


def blocking(port, within=3, statement_timeout=None):
    """A plain (blocking) session for the harness's own queries; None when unreachable."""
    opts = "-c statement_timeout=%s" % statement_timeout if statement_timeout else None
    try:
        conn = pg_connect(port, "patroni-bench-harness", within, options=opts)
    except psycopg2.Error:
        return None
    conn.autocommit = True
    return conn


def query(port, sql, args=None, statement_timeout="3s"):
    conn = blocking(port, statement_timeout=statement_timeout)
    if conn is None:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    except psycopg2.Error:
        return None
    finally:
        close(conn)


# ---------------------------------------------------------------------------------------------
# The timed writer.


class Writer:
    def __init__(self, ports):
        self.ports = ports
        self.lock = threading.Lock()
        self.acks = []  # (at, id, on, session opened), appended as acknowledged
        self.next_id = 1
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def take_id(self):
        with self.lock:
            i = self.next_id
            self.next_id += 1
            return i

    def record(self, at, ident, on, opened):
        with self.lock:
            self.acks.append((at, ident, on, opened))

    def count(self):
        with self.lock:
            return len(self.acks)

    def snapshot(self, start=0):
        with self.lock:
            return self.acks[start:]

    def loop(self):
        deadline = now() + 6 * 3600
        current = None
        while not self.stopping.is_set() and now() < deadline:
            if current is None:
                current = self.race()
                if current is not None:
                    time.sleep(PACE)
                continue
            on, opened, conn = current
            ident = self.take_id()
            at, _ = insert(conn, ident)
            if at is not None:
                self.record(at, ident, on, opened)
                time.sleep(PACE)
            else:
                close(conn)
                current = None
        if current is not None:
            close(current[2])

    def race(self):
        """Every member at once; the first acknowledged write wins (its session is kept)."""
        done = threading.Event()
        won = []
        guard = threading.Lock()

        def attempt(on, port):
            session = None
            while not done.is_set() and not self.stopping.is_set():
                if session is None:
                    opened = now()
                    conn = connect_async(port, CONNECT)
                    if conn is None:
                        time.sleep(RETRY)
                    else:
                        session = (conn, opened)
                    continue
                conn, opened = session
                ident = self.take_id()
                at, keep = insert(conn, ident)
                if at is not None:
                    # Acknowledged: recorded even when another member won meanwhile.
                    self.record(at, ident, on, opened)
                    with guard:
                        if not won:
                            won.append((on, opened, conn))
                            done.set()
                            return
                    close(conn)
                    return
                if not keep:
                    close(conn)
                    session = None
                time.sleep(RETRY)
            if session is not None:
                close(session[0])

        threads = [
            threading.Thread(target=attempt, args=(i, p), daemon=True)
            for i, p in enumerate(self.ports)
        ]
        for t in threads:
            t.start()
        while not done.wait(0.1):
            if self.stopping.is_set():
                done.set()
        return won[0] if won else None

    def stop(self):
        self.stopping.set()
        self.thread.join(30)
        if self.thread.is_alive():
            raise BenchError("the timed writer did not stop within 30 s")


# ---------------------------------------------------------------------------------------------
# The cluster.


class Cluster:
    def __init__(self):
        self.members = [Member(i) for i in range(3)]

    def name(self, i):
        return self.members[i].name

    def index(self, name):
        for m in self.members:
            if m.name == name:
                return m.i
        return None

    def rest_cluster(self):
        """GET /cluster from the first member (not SIGSTOPped) that answers within 1 s."""
        for m in self.members:
            if m.frozen:
                continue
            try:
                url = "http://127.0.0.1:%d/cluster" % m.rest_port
                with urllib.request.urlopen(url, timeout=1) as r:
                    return json.loads(r.read())
            except (OSError, ValueError):
                continue
        return None

    def roles(self):
        """The running leader and Patroni's synchronous standby (None when there is none)."""
        c = self.rest_cluster()
        leader = sync = None
        for m in (c or {}).get("members", []):
            if m.get("role") in ("leader", "master", "primary") and m.get("state") == "running":
                leader = self.index(m.get("name"))
            if m.get("role") == "sync_standby":
                sync = self.index(m.get("name"))
        return leader, sync

    def leader(self):
        return self.roles()[0]

    def all_streaming(self):
        """The leader, when it is writable and every other member streams from it (and, in
        synchronous mode, Patroni's synchronous standby streams as one); None otherwise."""
        p, sync_member = self.roles()
        if p is None or self.members[p].frozen:
            return None
        rows = query(
            self.members[p].pg_port,
            "SELECT pg_is_in_recovery(), application_name, state, sync_state "
            "FROM (SELECT 1) one LEFT JOIN pg_stat_replication ON true",
        )
        if not rows or rows[0][0]:
            return None
        streaming = {r[1] for r in rows if r[2] == "streaming"}
        sync = {r[1] for r in rows if r[2] == "streaming" and r[3] == "sync"}
        others = {self.name(i) for i in range(3) if i != p}
        if not others <= streaming:
            return None
        if CFG["mode"] == "quorum" and (sync_member is None or self.name(sync_member) not in sync):
            return None
        return p

    def wait_all_streaming(self, within=LONG):
        deadline = now() + within
        while True:
            p = self.all_streaming()
            if p is not None:
                return p
            if now() > deadline:
                raise BenchError(
                    "timed out after %.0f s waiting for a leader with every member streaming\n%s"
                    % (within, self.describe())
                )
            time.sleep(0.2)

    def describe(self):
        out = "GET /cluster: %s\n" % json.dumps(self.rest_cluster())
        try:
            r = subprocess.run(
                [CFG["etcdctl"], "--endpoints=127.0.0.1:%d" % CFG["etcd_port"], "get",
                 "--prefix", "/service/"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
                env=dict(os.environ, ETCDCTL_API="3"))
            out += "etcd keys:\n%s\n" % r.stdout.decode(errors="replace")
        except (OSError, subprocess.TimeoutExpired) as e:
            out += "etcd keys: %s\n" % e
        for m in self.members:
            out += "---- last lines of %s ----\n%s" % (m.log_path, m.tail())
        return out

    def sync_standby(self):
        return self.roles()[1]

    def most_advanced_standby(self, p):
        best = None
        for i in range(3):
            if i == p:
                continue
            deadline = now() + LONG
            while True:
                rows = query(
                    self.members[i].pg_port,
                    "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::float8",
                )
                if rows and rows[0][0] is not None:
                    break
                if now() > deadline:
                    raise BenchError("no replay position from %s" % self.name(i))
                time.sleep(0.2)
            if best is None or rows[0][0] > best[1]:
                best = (i, rows[0][0])
        return best[0]

    def stop_all(self):
        for m in self.members:
            m.thaw()
        pids = []
        for m in self.members:
            pids += m.processes()
        signal_all(pids, signal.SIGKILL)
        wait_gone(pids, 10)
        for m in self.members:
            m.reap(5)


# ---------------------------------------------------------------------------------------------
# Waits on the writer.


def first_ack(c, w, what, t0, start, pred):
    """The first acknowledged write after t0 satisfying pred; scans only new acknowledgements."""
    deadline = now() + LONG
    k = start
    while True:
        acks = w.snapshot(k)
        for a in acks:
            if a[0] > t0 and pred(a):
                return a
        k += len(acks)
        if now() > deadline:
            raise BenchError(
                "timed out after %.0f s waiting for %s (%d writes in all)\n%s"
                % (LONG, what, w.count(), c.describe())
            )
        time.sleep(0.01)


def writes_on(c, w, on, n):
    start = w.count()
    deadline = now() + LONG
    k, seen = start, 0
    while seen < n:
        acks = w.snapshot(k)
        seen += sum(1 for a in acks if a[2] == on)
        k += len(acks)
        if seen >= n:
            break
        if now() > deadline:
            raise BenchError(
                "timed out after %.0f s waiting for %d writes on %s\n%s"
                % (LONG, n, c.name(on), c.describe())
            )
        time.sleep(0.02)


def steady(c, w):
    p = c.wait_all_streaming()
    writes_on(c, w, p, SETTLE_WRITES)
    return p


def missing_on(c, p, ids):
    deadline = now() + LONG
    sql = (
        "SELECT x FROM unnest(%%s::bigint[]) AS x "
        "WHERE NOT EXISTS (SELECT 1 FROM %s w WHERE w.id = x) ORDER BY x" % TABLE
    )
    while True:
        rows = query(c.members[p].pg_port, sql, (ids,), statement_timeout="60s")
        if rows is not None:
            return [r[0] for r in rows]
        if now() > deadline:
            raise BenchError("could not look the acknowledged ids up on %s" % c.name(p))
        time.sleep(0.2)


def answering_again(port, t0):
    deadline = t0 + LONG
    while True:
        rows = query(port, "SELECT 1")
        if rows:
            return now() - t0
        if now() > deadline:
            raise BenchError("Postgres on port %d did not answer again" % port)
        time.sleep(0.02)


def watch_sync(port):
    """Polls the leader on `port` every 20 ms (for at most a minute) until a standby streams to
    it as a synchronous standby: (when first seen, when the last poll that saw none was sent), as
    in tests/ha_bench/. A write that leader acknowledged before then had no standby to confirm
    it. At once (None, None) with asynchronous replication."""
    if CFG["mode"] != "quorum":
        return None, None
    sql = ("SELECT count(*) FROM pg_stat_replication "
           "WHERE state = 'streaming' AND sync_state IN ('sync', 'quorum')")
    deadline = now() + 60
    last_none = None
    conn = None
    try:
        while now() < deadline:
            if conn is None:
                conn = blocking(port, within=1, statement_timeout="2s")
            if conn is not None:
                sent = now()
                try:
                    with conn.cursor() as cur:
                        cur.execute(sql)
                        n = cur.fetchone()[0]
                except psycopg2.Error:
                    close(conn)
                    conn = None
                else:
                    if n > 0:
                        return now(), last_none
                    last_none = sent
            time.sleep(0.02)
        return None, last_none
    finally:
        if conn is not None:
            close(conn)


def longest_gap(acks, frm, to):
    times = sorted(a[0] for a in acks if frm <= a[0] <= to)
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


# ---------------------------------------------------------------------------------------------
# Scenarios.


def run_scenario(c, w, scenario, tag):
    p = steady(c, w)
    m = c.members[p]
    start = w.count()
    if scenario == "pod-loss":
        t0, at = now(), clock()
        m.kill9()
        a = first_ack(c, w, "a write on a new leader", t0, start, lambda a: a[2] != p)
        say("%s: %s killed at %s; first write on %s after %.2f s"
            % (tag, m.name, at, c.name(a[2]), a[0] - t0))
        m.start()
    elif scenario == "hung":
        t0, at = now(), clock()
        m.freeze()
        a = first_ack(c, w, "a write on a new leader", t0, start, lambda a: a[2] != p)
        say("%s: %s stopped at %s; first write on %s after %.2f s"
            % (tag, m.name, at, c.name(a[2]), a[0] - t0))
        m.thaw()
    elif scenario == "crash":
        pid = m.postmaster_pid()
        if pid is None:
            raise BenchError("%s: no postmaster.pid" % m.name)
        t0, at = now(), clock()
        os.kill(pid, signal.SIGKILL)
        # Sessions opened before the crash die with it: a write acknowledged on one of them
        # after t0 was committed before the crash.
        a = first_ack(c, w, "a write on a session opened after the crash", t0, start,
                      lambda a: a[3] > t0)
        up = answering_again(m.pg_port, t0)
        note = "" if a[2] == p else " (NOT the crashed leader %s: it failed over)" % m.name
        say("%s: %s's postmaster %d killed at %s; answering queries again after %.2f s; first "
            "write on %s after %.2f s%s" % (tag, m.name, pid, at, up, c.name(a[2]), a[0] - t0, note))
    elif scenario == "switchover":
        # Patroni's synchronous mode switches over only to its synchronous standby.
        to = c.sync_standby() if CFG["mode"] == "quorum" else None
        if to is None:
            to = c.most_advanced_standby(p)
        cmd = [CFG["patronictl"], "-c", m.config, "switchover", "--leader", m.name,
               "--candidate", c.name(to), "--force", "bench"]
        t0, at = now(), clock()
        r = subprocess.run(CFG["as_pg"] + cmd, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=60, cwd=m.dir)
        returned = now() - t0
        out = (r.stdout + r.stderr).decode(errors="replace")
        if r.returncode != 0 or "failed" in out.lower():
            raise BenchError("patronictl switchover failed (%d): %s" % (r.returncode, out))
        a = first_ack(c, w, "a write on the new leader", t0, start, lambda a: a[2] != p)
        note = "" if a[2] == to else " (NOT the requested %s)" % c.name(to)
        say("%s: %s -> %s requested at %s (patronictl returned after %.2f s); first write on %s "
            "after %.2f s%s" % (tag, m.name, c.name(to), at, returned, c.name(a[2]),
                                a[0] - t0, note))
    elif scenario == "sigterm":
        # Restarted as soon as it has exited, as the StatefulSet controller recreates a deleted
        # pod: Patroni 3.0.2 can leave its /sync key without a synchronous standby when its
        # leader shuts down, and then no other member may promote until the old leader is back.
        pid = m.patroni_pid()
        t0, at = now(), clock()
        os.kill(pid, signal.SIGTERM)
        status = m.reap(LONG)
        if status is None:
            raise BenchError("%s: Patroni did not exit within %.0f s of SIGTERM" % (m.name, LONG))
        exited = now() - t0
        m.start()
        a = first_ack(c, w, "a write after the SIGTERM", t0, start,
                      lambda a: a[2] != p or a[3] > t0)
        note = "" if a[2] != p else " (the restarted %s: no other member took over)" % m.name
        say("%s: %s signalled at %s, exited (%s) after %.2f s and restarted; first write on %s "
            "after %.2f s%s" % (tag, m.name, at, status, exited, c.name(a[2]), a[0] - t0, note))
    else:
        raise BenchError("unknown scenario %r" % scenario)
    return p, t0, a, start


def run(c, w, scenarios, runs):
    """The figures of every run, the commits lost, and None, or (scenario, run, error) when a
    run failed: the runs after it are not made (the cluster is in an unknown state), and the
    figures of those before are kept."""
    figures = []
    lost = set()
    for scenario in scenarios:
        f = {"seconds": [], "lost": 0, "stall": [], "sync": [], "sync_never": 0,
             "unprotected": 0}
        for k in range(1, runs + 1):
            tag = "%s %d/%d" % (scenario, k, runs)
            try:
                one_run(c, w, scenario, tag, f, lost)
            except BenchError as e:
                say("%s: FAILED: %s" % (tag, e))
                if f["seconds"]:
                    figures.append((scenario, f))
                return figures, len(lost), (scenario, k, str(e).splitlines()[0])
        figures.append((scenario, f))
    return figures, len(lost), None


def one_run(c, w, scenario, tag, f, lost):
    """One run of `scenario`: its figures go into `f`, newly missing ids into `lost`."""
    p, t0, first, start = run_scenario(c, w, scenario, tag)
    seen, last_none = watch_sync(c.members[first[2]].pg_port)
    now_p = steady(c, w)
    end = now()
    acks = w.snapshot(max(0, start - 1000))
    before = max((a[0] for a in acks if a[0] <= t0), default=None)
    if before is None:
        raise BenchError("no write acknowledged before the failure")
    first_s = first[0] - t0
    longest = longest_gap(acks, before, end)
    stall = longest_gap(acks, first[0], end)
    headline = longest if scenario in ("switchover", "sigterm") else first_s
    f["seconds"].append(headline)
    f["stall"].append(stall)
    unprotected = 0 if last_none is None else sum(
        1 for a in acks if t0 < a[0] <= last_none and a[2] == first[2])
    f["unprotected"] += unprotected
    if seen is not None:
        f["sync"].append(seen - t0)
        sync = "after %.2f s" % (seen - t0)
    else:
        f["sync_never"] += 1
        sync = "NOT within a minute" if CFG["mode"] == "quorum" else "- (asynchronous)"
    say("%s: first write after %.2f s; longest gap between writes %.2f s (after the first "
        "write: %.2f s); %s had a synchronous standby %s and acknowledged %d writes before"
        % (tag, first_s, longest, stall, c.name(first[2]), sync, unprotected))
    ids = [a[1] for a in w.snapshot()]
    missing = [x for x in missing_on(c, now_p, ids) if x not in lost]
    if missing:
        say("%s: %d acknowledged commits MISSING on %s: first %s"
            % (tag, len(missing), c.name(now_p), missing[:20]))
    f["lost"] += len(missing)
    lost.update(missing)
    say("%s: leader %s, all streaming, %d acknowledged writes so far, %d lost"
        % (tag, c.name(now_p), len(ids), len(lost)))


def idle_footprint(c, idle):
    p = c.wait_all_streaming()
    time.sleep(5)
    pids = [m.patroni_pid() for m in c.members]
    if None in pids:
        raise BenchError("a Patroni member is not running")
    say("idle footprint of every Patroni over %d s" % idle)
    hz = os.sysconf("SC_CLK_TCK")
    before = [cpu_ticks(pid) for pid in pids]
    t = now()
    time.sleep(idle)
    elapsed = now() - t
    if c.wait_all_streaming() != p:
        raise BenchError("the leader changed during the idle period")
    out = []
    for i, (pid, b) in enumerate(zip(pids, before)):
        ticks = cpu_ticks(pid) - b
        out.append({"primary": i == p, "rss_kib": rss_kib(pid), "ticks": ticks,
                    "cpu": ticks / hz / elapsed * 100.0})
    return out


# ---------------------------------------------------------------------------------------------
# Output.


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def percentile(v, q):
    v = sorted(v)
    rank = -(-int(q * len(v) * 1000) // 1000)
    return v[min(max(rank, 1), len(v)) - 1]


def print_tables(figures, runs, total, lost, footprint):
    t = CFG["timings"]
    print()
    print("Patroni figures: 3 members, profile %s: ttl %d s / loop_wait %d s / retry_timeout %d s,"
          " etcd %s; %s, %d runs per scenario"
          % (CFG["profile"], t["ttl"], t["loop_wait"], t["retry_timeout"], CFG["etcd_version"],
             "synchronous mode (one synchronous standby)" if CFG["mode"] == "quorum"
             else "asynchronous replication", runs))
    print("%-42s %4s %7s %7s %7s %7s %5s" % ("scenario", "runs", "min s", "median", "p90",
                                              "max s", "lost"))
    for s, f in figures:
        v = sorted(f["seconds"])
        print("%-42s %4d %7.2f %7.2f %7.2f %7.2f %5d" % (
            LABELS[s], len(v), v[0], median(v), percentile(v, 0.9), v[-1], f["lost"]))
    print("acknowledged commits lost: %d of %d acknowledged" % (lost, total))
    print()
    print("(info) after the first write that counts: the longest gap between writes until every"
          " member streamed again; when that leader had a synchronous standby streaming (seconds"
          " after the failure) and how many writes it acknowledged before")
    print("%-42s %4s %13s %13s %6s %12s" % ("scenario", "runs", "gap med/max", "sync med/max",
                                            "never", "acked before"))

    def pair(v):
        v = sorted(v)
        return "%.2f/%.2f" % (median(v), v[-1]) if v else "-"

    for s, f in figures:
        print("%-42s %4d %13s %13s %6d %12d" % (LABELS[s], len(f["stall"]), pair(f["stall"]),
                                                pair(f["sync"]), f["sync_never"],
                                                f["unprotected"]))
    if footprint:
        print()
        print("footprint of each Patroni process alone (not Postgres), idle for %d s, writer "
              "stopped" % CFG["idle_seconds"])
        print("%-10s %-8s %10s %7s %12s" % ("member", "role", "VmRSS MiB", "ticks", "CPU % core"))
        for i, fp in enumerate(footprint):
            print("%-10s %-8s %10.1f %7d %12.3f" % (
                "pg-%d" % i, "leader" if fp["primary"] else "replica", fp["rss_kib"] / 1024.0,
                fp["ticks"], fp["cpu"]))
    for s, f in figures:
        print("ha-bench-figure scenario %s lost=%d seconds=%s"
              % (s, f["lost"], ",".join("%.3f" % x for x in f["seconds"])))
    if footprint:
        print("ha-bench-figure footprint rss_mib=%s cpu_percent=%s" % (
            ",".join("%.1f" % (fp["rss_kib"] / 1024.0) for fp in footprint),
            ",".join("%.3f" % fp["cpu"] for fp in footprint)))
    sys.stdout.flush()


def main():
    # patroni.sh's cleanup ends the driver with SIGTERM: stop the members on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with open(sys.argv[1]) as f:
        CFG.update(json.load(f))
    runs, scenarios = CFG["runs"], CFG["scenarios"]
    t = CFG["timings"]
    print("ha-bench-figure setup manager=patroni mode=%s profile=%s lease=%d renew_deadline=%d "
          "retry=%d runs=%d" % (CFG["mode"], CFG["profile"], t["ttl"],
                                t["retry_timeout"] + t["loop_wait"], t["loop_wait"], runs),
          flush=True)
    started = now()
    etcd = None
    c = Cluster()
    w = None
    try:
        etcd = start_etcd()
        for m in c.members:
            m.write_config()
        # The first member bootstraps; the others clone from it once it leads.
        c.members[0].start()
        deadline = now() + 180
        while c.leader() is None:
            if now() > deadline or c.members[0].patroni_pid() is None:
                raise BenchError("no leader within 180 s\n" + c.describe())
            time.sleep(0.2)
        for m in c.members[1:]:
            m.start()
        p = c.wait_all_streaming(240)
        say("cluster ready after %.1f s, leader %s; %d runs per scenario"
            % (now() - started, c.name(p), runs))
        deadline = now() + LONG
        while query(c.members[p].pg_port,
                    "CREATE TABLE IF NOT EXISTS %s (id bigint PRIMARY KEY)" % TABLE,
                    statement_timeout=None) is None:
            if now() > deadline:
                raise BenchError("could not create %s" % TABLE)
            time.sleep(0.2)
        w = Writer([m.pg_port for m in c.members])
        figures, lost, failed = run(c, w, scenarios, runs)
        total = w.count()
        w.stop()
        w = None
        # After a failed run the cluster is in no state to be called idle.
        idle = CFG["idle_seconds"] > 0 and failed is None
        footprint = idle_footprint(c, CFG["idle_seconds"]) if idle else None
        say("done in %.0f s" % (now() - started))
        print_tables(figures, runs, total, lost, footprint)
        if failed is not None:
            scenario, k, why = failed
            print("ha-bench-figure incomplete scenario=%s run=%d" % (scenario, k))
            print("INCOMPLETE: %s run %d of %d failed (%s); no later run was made, and the figures "
                  "above are those of the runs before" % (scenario, k, runs, why), flush=True)
            return 3
    except BenchError as e:
        say("FAILED: %s" % e)
        return 1
    finally:
        if w is not None:
            w.stopping.set()
        c.stop_all()
        if etcd is not None:
            etcd.terminate()
            try:
                etcd.wait(10)
            except subprocess.TimeoutExpired:
                etcd.kill()
                etcd.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
