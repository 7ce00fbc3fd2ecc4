"""`manage.py bench`: deposit/redeem flows through the real stack of the current mode.

It starts the stack the way production runs it (scaled: Daphne + N `celery
worker` processes; embedded: `manage.py serve`), drives it over HTTP with
bearer-token users, watches every hop on the websocket, and reads the message
log at the end to count hops and anything lost or duplicated.
"""

import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
from django.conf import settings
from django.db import connection

from processes.flows import Flow
from processes.runtime.models import Message

BASE_DIR = Path(settings.BASE_DIR)


def now_ms() -> float:
    return time.time() * 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(p / 100 * (len(ordered) - 1)))))
    return round(ordered[index], 1)


# What bench changes in the environment of the stack it starts (unless already set):
# production settings (DEBUG keeps every query in memory and wraps every cursor),
# and a per-wallet HTTP rate limit that a handful of bench wallets cannot hit.
BENCH_ENV = {"DJANGO_DEBUG": "0", "TIM3_RATE_LIMIT_PER_MINUTE": "1000000", "LOG_LEVEL": "WARNING"}
# The coordinator limits for the run (restored afterwards): SPEC's system limit of
# 10,000 TIM3 an hour would refuse a bench's deposits within a minute.
# Limits are in base units (10**18 = a trillion TIM3).
BENCH_LIMITS = {"SystemHourlyLimit": str(10**18), "UserDailyLimit": str(10**18), "RateLimitPerMinute": "1000000"}


def stack_environment() -> dict[str, str]:
    return {**BENCH_ENV, **os.environ}


class Stack:
    """The processes `make run` or the Procfile would run, as subprocesses."""

    def __init__(self, *, workers: int, log_dir: Path) -> None:
        self.workers, self.log_dir, self.procs, self.names = workers, log_dir, [], []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs.append(subprocess.Popen(argv, cwd=BASE_DIR, env=stack_environment(), stdout=log, stderr=log))
        self.names.append("workers" if name.startswith("worker") else name)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        bin_dir = Path(sys.executable).parent
        if settings.TIM3_MODE == "scaled":
            self._spawn("daphne", [str(bin_dir / "daphne"), "-b", "127.0.0.1", "-p", str(self.port),
                                   "tim3web.asgi:application"])
            for i in range(self.workers):
                self._spawn(f"worker{i}", [str(bin_dir / "celery"), "-A", "tim3web", "worker", "-P", "solo",
                                           "-c", "1", "-n", f"bench{i}-{self.port}@%h", "--without-heartbeat",
                                           "--without-mingle", "--without-gossip", "-l", "WARNING"])
            # The periodic jobs production runs too (sweep, timeouts, VACUUM of the mailbox).
            self._spawn("beat", [str(bin_dir / "celery"), "-A", "tim3web", "beat", "-l", "WARNING",
                                 "-s", str(self.log_dir / "beat-schedule")])
        else:
            self._spawn("serve", [sys.executable, "manage.py", "serve", "--port", str(self.port)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/api/health", timeout=2).ok:
                    time.sleep(1.0 if settings.TIM3_MODE == "scaled" else 0.2)  # let workers connect
                    return
            except requests.RequestException:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the stack did not start; see {self.log_dir}")

    def roles(self) -> list[tuple[str, subprocess.Popen]]:
        """(role, process): daphne, workers, or serve (embedded: web and worker in one)."""
        return [(self.names[i], p) for i, p in enumerate(self.procs)]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def cpu_by_role(stack: "Stack | None") -> dict[str, float]:
    """CPU seconds used so far by each part of the system on this machine (Linux /proc).

    The stack's own processes by role; Postgres and Redis by process name: every
    backend alive at the moment, plus what ended backends used (the postmaster reaps
    them, so their time is in its children's counters); this process as the load
    generator.
    """
    tick = os.sysconf("SC_CLK_TCK")
    roles = {proc.pid: role for role, proc in (stack.roles() if stack else [])}
    roles[os.getpid()] = "bench_client"
    used: dict[str, float] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        role = roles.get(int(entry)) or {"postgres": "postgres", "redis-server": "redis"}.get(name)
        if role:
            ticks = int(fields[11]) + int(fields[12])  # utime, stime
            if role in ("postgres", "redis"):
                ticks += int(fields[13]) + int(fields[14])  # cutime, cstime: reaped children (ended backends)
            used[role] = used.get(role, 0.0) + ticks / tick
    return used


class HopWatcher(threading.Thread):
    """A websocket client on /ws/flows/ recording when each hop and flow end arrives."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.ws_url = url.replace("http://", "ws://") + "/ws/flows/"
        self.hops: dict[str, list[float]] = {}  # message id -> receive times
        self.lags: dict[str, float] = {}
        self.flow_end: dict[str, tuple[str, float]] = {}
        self.flow_events: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.stopping = threading.Event()

    def waiter(self, flow_id: str) -> threading.Event:
        with self.lock:
            return self.flow_events.setdefault(flow_id, threading.Event())

    def run(self) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        origin = self.ws_url.replace("ws://", "http://").split("/ws/")[0]
        with connect(self.ws_url, max_size=None, open_timeout=10, origin=origin) as ws:
            self.ready.set()
            while not self.stopping.is_set():
                try:
                    raw = ws.recv(timeout=0.2)
                except TimeoutError:
                    continue
                except ConnectionClosed:
                    return
                received = now_ms()
                event = json.loads(raw)
                if event.get("type") == "hop":
                    msg_id = event["message"]["id"]
                    self.hops.setdefault(msg_id, []).append(received)
                    if event.get("committed_at"):
                        self.lags[msg_id] = received - event["committed_at"]
                elif event.get("type") == "flow":
                    self.flow_end[event["flow"]] = (event["status"], received)
                    self.waiter(event["flow"]).set()


@dataclass
class Client:
    base: str
    token: str
    session: requests.Session = field(default_factory=requests.Session)

    def post(self, path: str, body: dict) -> dict:
        r = self.session.post(f"{self.base}{path}", json=body, timeout=30,
                              headers={"Authorization": f"Bearer {self.token}"})
        if r.status_code != 202:
            raise RuntimeError(f"POST {path} answered {r.status_code}: {r.text[:200]}")
        return r.json()


def make_clients(base: str, count: int) -> list[Client]:
    tag = secrets.token_hex(3)

    def register(i: int) -> Client:
        creds = {"username": f"bench-{tag}-{i}", "password": secrets.token_urlsafe(16)}
        requests.post(f"{base}/api/register", json=creds, timeout=60).raise_for_status()
        token = requests.post(f"{base}/api/token", json=creds, timeout=60).json()["token"]
        return Client(base=base, token=token)

    # Two at a time: each is two password hashes (~0.3 s of CPU each), which release the GIL.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(register, range(count)))


def wait_flow(base: str, watcher: HopWatcher, flow_id: str, timeout: float) -> tuple[str, float]:
    """(status, end time ms): from the websocket, or by polling the API if an event is missed."""
    event = watcher.waiter(flow_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if event.wait(timeout=2.0):
            return watcher.flow_end[flow_id]
        status = requests.get(f"{base}/api/flows/{flow_id}", timeout=10).json().get("status")
        if status and status != "pending":
            return status, now_ms()
    return "pending", now_ms()


def coordinator_limits() -> dict[str, str]:
    """The active coordinator's current values of BENCH_LIMITS, as Configure values."""
    from processes.blueprints.coordinator import LIMIT_FIELDS
    from processes.blueprints.state import CoordinatorState
    from processes.services import active_coordinator

    c = CoordinatorState.objects.get(process=active_coordinator())
    return {name: str(getattr(c, LIMIT_FIELDS[name][0]) // LIMIT_FIELDS[name][1]) for name in BENCH_LIMITS}


def set_coordinator_limits(limits: dict[str, str], *, timeout: float = 30.0) -> None:
    """Configure every coordinator (operator messages, applied by the stack's workers) and wait."""
    from processes.actions import configure_coordinator

    sent = [m for name, value in limits.items() for m in configure_coordinator(config_type=name, value=value)]
    deadline = time.monotonic() + timeout
    while Message.objects.filter(pk__in=[m.pk for m in sent], status=Message.PENDING).exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the stack did not apply the bench's coordinator limits")
        time.sleep(0.1)


def pgbench_tps(*, seconds: int) -> float | None:
    """`pgbench -N -c 1` on a scratch database of the same server: the reference the
    hop rate is compared with (None when this is not Postgres or pgbench is missing)."""
    db = settings.DATABASES["default"]
    if connection.vendor != "postgresql" or not shutil.which("pgbench"):
        return None
    env = {**os.environ, "PGHOST": db.get("HOST") or "127.0.0.1", "PGPORT": str(db.get("PORT") or 5432),
           "PGUSER": db.get("USER") or "postgres", "PGPASSWORD": db.get("PASSWORD") or ""}
    scratch = "tim3_pgbench"
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [scratch])
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{scratch}"')
            subprocess.run(["pgbench", "-i", "-q", "-s", "1", scratch], env=env, check=True, capture_output=True)
    out = subprocess.run(["pgbench", "-N", "-c", "1", "-T", str(seconds), scratch], env=env, check=True,
                         capture_output=True, text=True).stdout
    match = re.search(r"tps = ([0-9.]+)", out)
    return round(float(match.group(1)), 1) if match else None


def run_bench(*, flows: int, concurrency: int, workers: int, rate: float | None, mix: str,
              url: str | None, timeout: float = 60.0, pgbench_seconds: int = 0) -> dict:
    stack, saved_limits = None, None
    if url is None:
        if settings.TIM3_ENV != "test":
            raise RuntimeError("bench starts its own stack only in the test environment (TIM3_ENV=test)")
        stack = Stack(workers=workers, log_dir=Path(settings.VAR_DIR) / "bench")
        stack.start()
        url = stack.url
    try:
        if stack:
            saved_limits = coordinator_limits()
            set_coordinator_limits(BENCH_LIMITS)
        watcher = HopWatcher(url)
        watcher.start()
        if not watcher.ready.wait(15):
            raise RuntimeError("the websocket did not open")
        users = max(1, concurrency)
        clients = make_clients(url, users)
        funding = [c.post("/api/faucet", {"quantity": str(1_000 * 10**6)})["flow_id"] for c in clients]
        for flow_id in funding:
            if wait_flow(url, watcher, flow_id, timeout)[0] != "completed":
                raise RuntimeError(f"funding flow {flow_id} did not complete")

        plan = []  # per user: deposit 2 USDA, then (mix) redeem 1 TIM3, alternating
        for i in range(flows):
            kind = "deposit" if mix == "deposit" or (i // users) % 2 == 0 else "redeem"
            plan.append((i % users, kind))
        results: list[tuple[str, str, float, float, float]] = []  # flow id, status, started, ended, answered
        errors: list[str] = []
        lock = threading.Lock()
        mode = "lock" if mix == "v1" else "deposit"

        def one(user: int, kind: str) -> None:
            client = clients[user]
            path, amount = ("/api/deposits", 2) if kind == "deposit" else ("/api/redemptions", 1)
            started = now_ms()
            try:
                flow_id = client.post(path, {"quantity": str(amount * 10**6), "mode": mode})["flow_id"]
                answered = now_ms()
                status, ended = wait_flow(url, watcher, flow_id, timeout)
                with lock:
                    results.append((flow_id, status, started, ended, answered))
            except Exception as exc:  # reported, never hidden
                with lock:
                    errors.append(str(exc)[:200])

        cpu_before = cpu_by_role(stack)
        began = now_ms()
        if rate:  # open loop: offered load of `rate` flows per second
            ended = [threading.Event() for _ in plan]

            def offered(n: int, user: int, kind: str) -> None:
                # A redemption spends the TIM3 of the user's deposit one round before
                # (plan[n - users]): offered before that deposit ended, it would fail.
                if kind == "redeem":
                    ended[n - users].wait(timeout)
                try:
                    one(user, kind)
                finally:
                    ended[n].set()

            threads = []
            for n, (user, kind) in enumerate(plan):
                delay = began / 1000 + n / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
                t = threading.Thread(target=offered, args=(n, user, kind), daemon=True)
                t.start()
                threads.append(t)
            for t in threads:
                t.join(timeout + 5)
        else:  # closed loop: `concurrency` clients, each one flow at a time, in plan order per user
            def loop(user: int) -> None:
                for u, kind in plan:
                    if u == user:
                        one(u, kind)

            threads = [threading.Thread(target=loop, args=(u,), daemon=True) for u in range(users)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finished = max([r[3] for r in results], default=now_ms())
        cpu_after = cpu_by_role(stack)
        time.sleep(0.5)  # let the watcher receive the last hops
        watcher.stopping.set()
        watcher.join(5)

        flow_ids = [r[0] for r in results]
        connection.close()  # a fresh read of what the workers committed
        messages = list(Message.objects.filter(pushed_for__in=flow_ids).values_list("msg_id", "status"))
        settled = [m for m, s in messages if s != Message.PENDING]
        pending = len(messages) - len(settled)
        unended = Flow.objects.filter(id__in=flow_ids, status=Flow.PENDING).count()
        missed_events = sum(1 for m in settled if m not in watcher.hops)
        duplicated = sum(len(times) - 1 for m, times in watcher.hops.items() if len(times) > 1)
        seconds = max(0.001, (finished - began) / 1000)
        latencies = [r[3] - r[2] for r in results if r[1] != "pending"]
        answers = [r[4] - r[2] for r in results]
        lags = [watcher.lags[m] for m in settled if m in watcher.lags]
        statuses = Counter(r[1] for r in results)
        reference = pgbench_tps(seconds=pgbench_seconds) if pgbench_seconds else None
        hops = max(1, len(settled))
        cpu = {role: round(1000 * (cpu_after[role] - cpu_before.get(role, 0.0)) / hops, 3)
               for role in sorted(cpu_after)}
        return {
            "backend": connection.vendor if connection.vendor != "postgresql" else "postgres",
            "mode": settings.TIM3_MODE,
            "workers": workers if settings.TIM3_MODE == "scaled" else 1,
            "flows": len(results),
            "hops": len(settled),
            "seconds": round(seconds, 3),
            "hops_per_s": round(len(settled) / seconds, 1),
            "flows_per_s": round(len(results) / seconds, 1),
            "flow_ms": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                        "p99": percentile(latencies, 99)},
            # The HTTP part of flow_ms: from sending the request to its 202 answer.
            "http_ms": {"p50": percentile(answers, 50), "p99": percentile(answers, 99)},
            "ws_lag_ms": {"p50": percentile(lags, 50), "p99": percentile(lags, 99)},
            "lost": pending + unended + missed_events + len(errors),
            "duplicated": duplicated,
            "statuses": dict(statuses),
            "errors": errors[:5],
            "offered_rate": rate,
            "concurrency": concurrency,
            "mean_flow_ms": round(statistics.fmean(latencies), 1) if latencies else 0.0,
            "pgbench_tps": reference,
            "cpu_ms_per_hop": cpu,  # where the machine's time went, per hop (see cpu_by_role)
        }
    finally:
        if stack:
            try:
                if saved_limits:
                    set_coordinator_limits(saved_limits)
            finally:
                stack.stop()
