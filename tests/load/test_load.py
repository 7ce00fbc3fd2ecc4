"""Load on the real scaled stack (issue 5, deliverable 2).

One Daphne and two `celery -A tim3web worker` subprocesses on pytest-django's
Postgres test database and the test Redis db; 200 wallets registered through
the API, funded from the faucet, then depositing and redeeming small amounts
(both modes) for one minute, while 100 websocket watchers stay connected to
/ws/flows/ from before the first request until after the last flow ended.

Asserted:
- no 5xx and no transport error from any request (429 from the per-wallet
  rate limit is allowed, and counted);
- every accepted flow ends (completed / refunded / failed) after draining;
- no lost hop event: every watcher received a hop for every settled message
  of every flow (they were all connected the whole time);
- memory bounded: each process's RSS (sampled every second from
  /proc/<pid>/status) stays under a generous bound and does not keep growing.

The figures go to test-artifacts/reliability/load.json (docs/reliability.md).
Sizes can be lowered for a quick local run with TIM3_LOAD_WALLETS,
TIM3_LOAD_WATCHERS and TIM3_LOAD_SECONDS.
"""

import asyncio
import json
import os
import random
import secrets
import statistics
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from django.db import connection

from processes.flows import FINAL_STATUSES, Flow
from processes.runtime.models import Message
from processes.services import bootstrap_system
from tests.scaled.stack import ROOT, free_port, pending_count

pytestmark = [pytest.mark.scaled, pytest.mark.django_db(transaction=True)]

WALLETS = int(os.environ.get("TIM3_LOAD_WALLETS", "200"))
WATCHERS = int(os.environ.get("TIM3_LOAD_WATCHERS", "100"))
SECONDS = float(os.environ.get("TIM3_LOAD_SECONDS", "60"))
WORKERS = 2
PAUSE = (0.2, 1.0)  # seconds a wallet waits after its flow ended, before its next request (uniform)
FLOW_WAIT = 20.0  # at most this long for its last flow to end
MAX_WS_LAG = 300  # hop events the slowest watcher may be behind the database before wallets wait
U = 10**6  # one USDA / TIM3 in base units
FAUCET = 1_000 * U
RSS_BOUND_MB = 600
GROWTH_BOUND = 1.5  # last third's mean RSS over the first third's
DRAIN_TIMEOUT = 120.0
ARTIFACT = ROOT / "test-artifacts" / "reliability" / "load.json"


# --- the stack ----------------------------------------------------------------------------------

def start_daphne(stack, *, timeout: float = 60.0):
    """`daphne tim3web.asgi:application` on a free port, the workers' env, fast password hashing."""
    port = free_port()
    env = {**stack.base_env, "DJANGO_SETTINGS_MODULE": "tests.load.web_settings",
           "PGAPPNAME": f"tim3-web-{stack.run}"}
    argv = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "tim3web.asgi:application"]
    service = stack._spawn(f"web-{stack.run}", "web", argv, env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if not service.alive():
            pytest.fail(f"daphne exited with {service.popen.returncode}:\n{service.log_tail()}")
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=5) as response:
                if response.status == 200:
                    return service, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"daphne did not answer within {timeout}s:\n{service.log_tail()}")
        time.sleep(0.2)


class RssSampler(threading.Thread):
    """VmRSS of each pid, every second, in MB."""

    def __init__(self, pids: dict[str, int]):
        super().__init__(daemon=True, name="rss-sampler")
        self.pids = pids
        self.samples: dict[str, list[float]] = {name: [] for name in pids}
        self.stopping = threading.Event()

    @staticmethod
    def rss_mb(pid: int) -> float | None:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def run(self) -> None:
        while not self.stopping.is_set():
            for name, pid in self.pids.items():
                rss = self.rss_mb(pid)
                if rss is not None:
                    self.samples[name].append(rss)
            self.stopping.wait(1.0)

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU time each process used so far (and this test process)."""
        tick = os.sysconf("SC_CLK_TCK")
        used = {"tests": round(sum(os.times()[:2]), 1)}
        for name, pid in self.pids.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                used[name] = round((int(fields[11]) + int(fields[12])) / tick, 1)
            except (OSError, IndexError, ValueError):
                pass
        return used

    def peaks(self) -> dict[str, float]:
        return {name: round(max(s, default=0.0), 1) for name, s in self.samples.items()}

    def growth(self) -> dict[str, float]:
        """Mean of the last third of the samples over the mean of the first third."""
        ratios = {}
        for name, s in self.samples.items():
            third = max(1, len(s) // 3)
            ratios[name] = round(statistics.fmean(s[-third:]) / statistics.fmean(s[:third]), 3) if s else 0.0
        return ratios


# --- the websocket watchers ---------------------------------------------------------------------

class Watchers(threading.Thread):
    """`count` websocket clients on /ws/flows/, all in one asyncio loop in this thread.

    Each records the message id of every hop it receives, and when it connected
    and (if the server closed it) when it disconnected.
    """

    def __init__(self, url: str, count: int):
        super().__init__(daemon=True, name="ws-watchers")
        self.ws_url = url.replace("http://", "ws://") + "/ws/flows/"
        self.origin = url
        self.count = count
        self.received: list[set[str]] = [set() for _ in range(count)]
        self.duplicates = [0] * count
        self.flow_events = [0] * count
        self.connected_at: list[float | None] = [None] * count
        self.closed_at: list[float | None] = [None] * count
        self.errors: list[str] = []
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        opened = [asyncio.Event() for _ in range(self.count)]
        tasks = [asyncio.create_task(self._watch(i, opened[i])) for i in range(self.count)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), timeout=60)
        self.ready.set()
        await asyncio.gather(*tasks)

    async def _watch(self, i: int, opened: asyncio.Event) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        try:
            async with connect(self.ws_url, origin=self.origin, max_size=None, open_timeout=30,
                               ping_interval=None, max_queue=None) as ws:
                self.connected_at[i] = time.time()
                opened.set()
                stop = asyncio.create_task(self.stop_event.wait())
                while True:
                    recv = asyncio.create_task(ws.recv())
                    done, _ = await asyncio.wait({recv, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if recv not in done:
                        recv.cancel()
                        return
                    try:
                        raw = recv.result()
                    except ConnectionClosed as exc:
                        self.closed_at[i] = time.time()
                        self.errors.append(f"watcher {i} closed by the server: {exc}")
                        stop.cancel()
                        return
                    event = json.loads(raw)
                    if event.get("type") == "hop":
                        msg_id = event["message"]["id"]
                        if msg_id in self.received[i]:
                            self.duplicates[i] += 1
                        self.received[i].add(msg_id)
                    elif event.get("type") == "flow":
                        self.flow_events[i] += 1
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.closed_at[i] = time.time()
            self.errors.append(f"watcher {i}: {type(exc).__name__}: {exc}")
            opened.set()

    def stop(self) -> None:
        if self.loop is not None and self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.join(30)


# --- the wallets --------------------------------------------------------------------------------

class Wallet:
    def __init__(self, base: str, index: int, tag: str):
        self.base = base
        self.username = f"load-{tag}-{index}"
        self.password = secrets.token_urlsafe(12)
        self.session = requests.Session()
        self.token = ""
        self.flows: list[str] = []
        self.statuses: Counter = Counter()
        self.errors: list[str] = []

    def call(self, method: str, path: str, body: dict | None = None) -> requests.Response | None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = self.session.request(method, f"{self.base}{path}", json=body, headers=headers, timeout=60)
        except requests.RequestException as exc:
            self.statuses["error"] += 1
            self.errors.append(f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        self.statuses[str(response.status_code)] += 1
        if response.status_code >= 500:
            self.errors.append(f"{method} {path} -> {response.status_code}: {response.text[:200]}")
        return response

    def setup(self) -> None:
        creds = {"username": self.username, "password": self.password}
        r = self.call("POST", "/api/register", creds)
        assert r is not None and r.status_code == 201, f"register: {r and r.status_code} {r and r.text[:200]}"
        r = self.call("POST", "/api/token", creds)
        assert r is not None and r.status_code == 200, f"token: {r and r.status_code} {r and r.text[:200]}"
        self.token = r.json()["token"]
        self.move("/api/faucet", {"quantity": str(FAUCET)})

    def move(self, path: str, body: dict) -> None:
        r = self.call("POST", path, body)
        if r is not None and r.status_code == 202:
            self.flows.append(r.json()["flow_id"])

    def loop(self, deadline: float, rng: random.Random, ended: "EndedFlows") -> None:
        """Deposit, then redeem, alternating modes, until the deadline.

        After each request the wallet waits for that flow to end (at most FLOW_WAIT
        seconds: a closed loop, so the offered load follows what the two workers
        deliver and the backlog at the deadline stays small), then pauses briefly.
        """
        n = 0
        time.sleep(rng.uniform(0, PAUSE[1]))  # spread the first requests
        while ended.wait_for_watchers(deadline):
            mode = ("deposit", "lock")[(n // 2) % 2]
            if n % 2 == 0:
                self.move("/api/deposits", {"quantity": str(rng.randint(1, 3) * U), "mode": mode})
            else:
                self.move("/api/redemptions", {"quantity": str(rng.randint(1, 5) * U // 10), "mode": mode})
            n += 1
            if self.flows:
                ended.wait(self.flows[-1], min(FLOW_WAIT, max(0.0, deadline - time.monotonic())))
            time.sleep(min(rng.uniform(*PAUSE), max(0.0, deadline - time.monotonic())))


class EndedFlows(threading.Thread):
    """Polls the database for the flows that ended, so wallets need not poll the API.

    It also measures how far the slowest watcher is behind the database (messages
    settled since the watchers connected, minus the hops it received) and holds
    the wallets back while that exceeds MAX_WS_LAG: the offered load follows what
    Daphne fans out to 100 sockets, and no event waits in the channel layer long
    enough to be dropped (a lag beyond its capacity is a loss, not a slowdown).
    """

    def __init__(self, flow_lists: list[list[str]], watchers: "Watchers", settled_before: int):
        super().__init__(daemon=True, name="ended-flows")
        self.flow_lists = flow_lists
        self.watchers = watchers
        self.settled_before = settled_before
        self.ended: set[str] = set()
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.lag = 0
        self.peak_lag = 0
        self.held_seconds = 0.0

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                candidates = [f for flows in self.flow_lists for f in flows[-3:] if f not in self.ended]
                if candidates:
                    done = set(Flow.objects.filter(id__in=candidates).exclude(status=Flow.PENDING)
                               .values_list("id", flat=True))
                    if done:
                        with self.cond:
                            self.ended |= done
                            self.cond.notify_all()
                settled = Message.objects.exclude(status=Message.PENDING).count() - self.settled_before
                self.lag = max(0, settled - min(len(got) for got in self.watchers.received))
                self.peak_lag = max(self.peak_lag, self.lag)
                self.stopping.wait(0.2)
        finally:
            connection.close()

    def wait_for_watchers(self, deadline: float) -> bool:
        """False at the deadline; else True once the slowest watcher is close enough behind."""
        began = time.monotonic()
        try:
            while self.lag > MAX_WS_LAG:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.2)
            return time.monotonic() < deadline
        finally:
            self.held_seconds += time.monotonic() - began

    def wait(self, flow_id: str, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: flow_id in self.ended, timeout=timeout)


def wait_for(predicate, *, timeout: float, what: str, stack, every: float = 0.25) -> float:
    began = time.monotonic()
    while not predicate():
        stack.check_alive()
        if time.monotonic() - began > timeout:
            pytest.fail(f"{what}: not reached within {timeout:.0f}s\n{stack.logs()}")
        time.sleep(every)
    return time.monotonic() - began


def pending_flows(ids: list[str]) -> int:
    return Flow.objects.filter(id__in=ids, status=Flow.PENDING).count()


# --- the test -----------------------------------------------------------------------------------

def test_load_two_hundred_wallets_one_hundred_watchers_one_minute(load_stack, request):
    stack = load_stack
    began = time.monotonic()
    bootstrap_system(environment="test")
    workers = stack.start_workers(WORKERS)
    web, url = start_daphne(stack)
    sampler = RssSampler({"daphne": web.popen.pid, **{f"worker{i + 1}": w.popen.pid for i, w in enumerate(workers)}})
    sampler.start()

    # Watchers first: connected before the first request, until after the last flow ended.
    watchers = Watchers(url, WATCHERS)
    settled_before = Message.objects.exclude(status=Message.PENDING).count()
    watchers.start()
    assert watchers.ready.wait(90), "the websocket watchers did not connect"
    assert not watchers.errors, watchers.errors[:5]

    # 200 wallets: register, token, faucet, all through the API.
    tag = secrets.token_hex(3)
    wallets = [Wallet(url, i, tag) for i in range(WALLETS)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda w: w.setup(), wallets))
    funding = [f for w in wallets for f in w.flows]
    assert len(funding) == WALLETS, f"only {len(funding)} faucet requests accepted"
    wait_for(lambda: pending_flows(funding) == 0, timeout=DRAIN_TIMEOUT, what="faucet flows ended", stack=stack)
    setup_seconds = time.monotonic() - began

    # One minute of load.
    load_began = time.monotonic()
    deadline = load_began + SECONDS
    seed = random.randrange(10**9)
    ended = EndedFlows([w.flows for w in wallets], watchers, settled_before)
    ended.start()
    try:
        with ThreadPoolExecutor(max_workers=WALLETS) as pool:
            futures = [pool.submit(w.loop, deadline, random.Random(seed + i), ended) for i, w in enumerate(wallets)]
            for future in futures:
                future.result(timeout=SECONDS + 120)  # bounded: each loop stops by itself at the deadline
    finally:
        ended.stopping.set()
        ended.join(10)
    load_seconds = time.monotonic() - load_began

    # Drain: every accepted flow ends, nothing stays pending.
    flow_ids = [f for w in wallets for f in w.flows]
    drain_seconds = wait_for(lambda: pending_flows(flow_ids) == 0 and pending_count() == 0, timeout=DRAIN_TIMEOUT,
                             what=f"all {len(flow_ids)} flows ended", stack=stack)
    connection.close()  # a fresh read of what the workers committed
    settled = set(Message.objects.filter(pushed_for__in=flow_ids).exclude(status=Message.PENDING)
                  .values_list("msg_id", flat=True))

    # The watchers get the last events within a few seconds.
    # The watchers get the last events within a few seconds (longer only while they still arrive).
    grace_began = last_progress = time.monotonic()
    received = -1
    while (any(settled - got for got in watchers.received) and time.monotonic() - last_progress < 10
           and time.monotonic() - grace_began < 60):
        now_received = sum(len(got) for got in watchers.received)
        if now_received != received:
            received, last_progress = now_received, time.monotonic()
        time.sleep(0.5)
    grace_seconds = time.monotonic() - grace_began
    sampler.stopping.set()
    sampler.join(5)
    watchers.stop()
    stack.check_alive()

    # --- figures ------------------------------------------------------------------------------
    status_counts = sum((w.statuses for w in wallets), Counter())
    flow_statuses = Counter(Flow.objects.filter(id__in=flow_ids).values_list("status", flat=True))
    load_flows = [f for f in flow_ids if f not in set(funding)]
    lost = [len(settled - got) for got in watchers.received]
    summary = {
        "wallets": WALLETS,
        "watchers": WATCHERS,
        "workers": WORKERS,
        "seconds": SECONDS,
        "requests": sum(status_counts.values()),
        "status_counts": dict(sorted(status_counts.items())),
        "flows": {"accepted": len(flow_ids), "load": len(load_flows), "faucet": len(funding),
                  **dict(sorted(flow_statuses.items()))},
        "flow_errors": dict(Counter(e[:80] for e in Flow.objects.filter(id__in=flow_ids)
                                    .exclude(status=Flow.COMPLETED).values_list("error", flat=True)).most_common(5)),
        "hops": len(settled),
        "hop_events_received": sum(len(got) for got in watchers.received),
        "lost_hop_events": sum(lost),
        "watchers_missing_hops": sum(1 for n in lost if n),
        "duplicate_hop_events": sum(watchers.duplicates),
        "watcher_disconnects": sum(1 for t in watchers.closed_at if t is not None),
        "peak_rss_mb": sampler.peaks(),
        "rss_growth_last_over_first_third": sampler.growth(),
        "rss_samples": {name: len(s) for name, s in sampler.samples.items()},
        "setup_seconds": round(setup_seconds, 1),
        "load_seconds": round(load_seconds, 1),
        "drain_seconds": round(drain_seconds, 1),
        "ws_grace_seconds": round(grace_seconds, 1),
        "ws_peak_lag_events": ended.peak_lag,
        "wallet_seconds_held_for_watchers": round(ended.held_seconds, 1),
        "cpu_seconds": sampler.cpu_seconds(),
        "flows_per_s": round(len(load_flows) / load_seconds, 1),
        "hops_per_s": round(len(settled) / (load_seconds + drain_seconds), 1),
        "total_seconds": round(time.monotonic() - began, 1),
    }
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps(summary, indent=2) + "\n")
    print("\nTIM3 load:", json.dumps(summary, indent=2))
    request.node.user_properties.append(("tim3-timing", f"load: {json.dumps(summary)}"))

    # --- the checks -----------------------------------------------------------------------------
    errors = [e for w in wallets for e in w.errors]
    assert not errors, f"{len(errors)} 5xx / transport errors, e.g. {errors[:5]}"
    assert not any(code.startswith("5") for code in status_counts), status_counts
    unexpected = {c: n for c, n in status_counts.items() if c not in ("200", "201", "202", "429")}
    assert not unexpected, f"unexpected answers: {unexpected}"
    assert set(flow_statuses) <= set(FINAL_STATUSES), flow_statuses
    assert sum(flow_statuses.values()) == len(flow_ids)
    assert not watchers.errors, watchers.errors[:5]
    assert summary["duplicate_hop_events"] == 0
    for name, peak in summary["peak_rss_mb"].items():
        assert 0 < peak < RSS_BOUND_MB, f"{name} peaked at {peak} MB"
    for name, ratio in summary["rss_growth_last_over_first_third"].items():
        assert ratio <= GROWTH_BOUND, f"{name} RSS kept growing: last third / first third = {ratio}"
    assert sum(lost) == 0, (f"{sum(lost)} hop events lost across {summary['watchers_missing_hops']} watchers "
                            f"(of {len(settled)} settled messages each)\n{stack.logs()}")
