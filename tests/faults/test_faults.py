"""Can this lose or duplicate my money? Faults on the real scaled stack.

Postgres (pytest-django's test database), a private Redis, three `celery
worker` processes, `celery beat` (sweeper every 1 s, CleanupExpired every 2 s)
and Daphne, driven through the HTTP API by 20 wallets in threads (register,
Bearer token, faucet, deposits and redemptions in both modes, each POST with an
Idempotency-Key and retried with it on a 5xx or a lost answer). For about 75 s
the suite, all at once:

- SIGKILLs a random worker every few seconds and starts a replacement;
- shuts Redis down (`SHUTDOWN NOSAVE`: every queued doorbell is lost) and starts
  it again, twice; the API must keep answering (the database is the truth, the
  sweeper re-rings what was lost);
- terminates a worker's database connection in the middle of a write
  transaction (pg_terminate_backend on its application_name), and cancels a
  worker's running statement (pg_cancel_backend: what a lock or statement
  timeout looks like);
- enqueues duplicate doorbells, and delayed ones whose countdowns make them
  arrive in the opposite order to the one they were sent in;
- with PendingTimeout at 1 s, stops every worker for several seconds, so that
  CleanupExpired ticks and the delayed replies race when they come back.

While Redis is down the wallets keep sending (and watch their flows through
GET /api/flows/{id}); 5xx answers are counted. Afterwards, with no manual
step: every flow ended (completed, refunded or failed), every wallet holds
exactly what its accepted flows' outcomes say,
no 5xx moved funds, each message has one slot and was applied once (mints and
burns recorded by the tokens == Mint-/Burn-Responses sent), every SPEC §4
invariant holds and `manage.py verify` (with replay) is clean. The figures are
printed and written to test-artifacts/reliability/faults.json.

Knobs (environment): TIM3_FAULT_SECONDS (75), TIM3_FAULT_WALLETS (20),
TIM3_FAULT_SEED (random; printed so a run can be repeated).
"""

import json
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path

import pytest
import requests
from django.core.management import call_command
from django.db import connection, connections

from processes.actions import configure_coordinator
from processes.blueprints.coordinator import FAILED_ACTION, REFUNDED_ACTION, SUCCESS_ACTION
from processes.blueprints.state import CoordinatorState, Operation, TokenAccount, TokenOperation, TokenState
from processes.flows import FINAL_STATUSES, Flow
from processes.invariants import check_invariants
from processes.runtime.models import Message, Process
from processes.runtime.quantities import UNIT
from processes.services import bootstrap_system
from processes.tasks import drain
from tests.faults.conftest import FIGURES
from tests.scaled.stack import Service, purge_broker, reset_broker_connections, wait_until_idle

pytestmark = [pytest.mark.scaled, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACT = ROOT / "test-artifacts" / "reliability" / "faults.json"
FAULT_SECONDS = float(os.environ.get("TIM3_FAULT_SECONDS", "75"))
WALLETS = int(os.environ.get("TIM3_FAULT_WALLETS", "20"))
WORKERS = 3
MAX_IN_FLIGHT = 2  # per wallet: the load follows what the system can take
REDIS_DOWN_SECONDS = 4.0
ALL_STOPPED_SECONDS = 6.0  # > PendingTimeout (1 s) and > two CleanupExpired ticks
PENDING_TIMEOUT_S = 1
SETTLE_SECONDS = 150.0  # after the faults, for every accepted flow to end: generous, not a speed check
FINAL_ACTIONS = {*SUCCESS_ACTION.values(), *REFUNDED_ACTION.values(), *FAILED_ACTION.values()}


# --- what happened, shared by the threads ------------------------------------------------

@dataclass
class Figures:
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    counts: Counter = field(default_factory=Counter)
    http: Counter = field(default_factory=Counter)  # "POST /api/deposits 202" -> n
    server_errors: list = field(default_factory=list)  # every 5xx and lost answer, with when and what
    outages: list = field(default_factory=list)  # [down_at, up_at] (monotonic) of Redis
    events: list = field(default_factory=list)  # (seconds since start, what) for the report
    timings: list = field(default_factory=list)  # (t0, t1, status, "METHOD path") of every request

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def event(self, started: float, text: str) -> None:
        with self.lock:
            self.events.append((round(time.monotonic() - started, 1), text))

    def redis_down(self) -> bool:
        with self.lock:
            return bool(self.outages) and self.outages[-1][1] is None

    def during_outage(self, t0: float, t1: float, grace: float = 5.0) -> bool:
        with self.lock:
            return any(t0 <= (up if up else time.monotonic()) + grace and t1 >= down for down, up in self.outages)


@dataclass
class Answer:
    status: int | None  # None: no answer (connection refused, reset, timeout)
    body: dict | None
    replayed: bool
    error: str = ""


class Api:
    """A JSON client for one wallet (one keep-alive connection)."""

    def __init__(self, base: str, figures: Figures):
        self.base, self.figures = base, figures
        self.session = requests.Session()
        self.token = ""

    def call(self, method: str, path: str, body: dict | None = None, *, key: str | None = None,
             timeout: float = 30.0) -> Answer:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if key:
            headers["Idempotency-Key"] = key
        t0 = time.monotonic()
        try:
            r = self.session.request(method, self.base + path, json=body, headers=headers, timeout=timeout)
        except requests.RequestException as exc:
            answer = Answer(None, None, False, f"{type(exc).__name__}: {exc}"[:300])
        else:
            try:
                parsed = r.json()
            except ValueError:
                parsed = None
            answer = Answer(r.status_code, parsed, r.headers.get("Idempotent-Replayed") == "true",
                            "" if r.status_code < 500 else r.text[:300])
        t1 = time.monotonic()
        label = f"{method} {path.split('?')[0] if not path.startswith('/api/flows/') else '/api/flows/{id}'}"
        with self.figures.lock:
            self.figures.timings.append((t0, t1, answer.status, label))
        with self.figures.lock:
            self.figures.http[f"{label} {answer.status or 'no answer'}"] += 1
        if answer.status is None or answer.status >= 500:
            with self.figures.lock:
                self.figures.server_errors.append({
                    "request": label, "status": answer.status, "key": key, "error": answer.error,
                    "during_redis_outage": None, "t0": t0, "t1": t1})
        return answer


# --- the wallets ------------------------------------------------------------------------------

@dataclass
class WalletRun:
    index: int
    api: Api
    username: str = ""
    address: str = ""
    accepted: dict = field(default_factory=dict)  # flow id -> {"kind", "mode", "quantity"}
    in_flight: list = field(default_factory=list)
    faucet_asked: int = 0
    five_xx_committed: list = field(default_factory=list)  # keys whose 5xx had moved funds (must stay empty)
    gave_up: list = field(default_factory=list)  # keys never answered 2xx/4xx after retries


def register(wallet: WalletRun, run_id: str) -> None:
    wallet.username = f"w{wallet.index}-{run_id}"
    password = f"pw-{uuid.uuid4().hex}"
    answer = wallet.api.call("POST", "/api/register", {"username": wallet.username, "password": password})
    assert answer.status == 201, (answer.status, answer.body, answer.error)
    wallet.address = answer.body["address"]
    answer = wallet.api.call("POST", "/api/token", {"username": wallet.username, "password": password})
    assert answer.status == 200, (answer.status, answer.body, answer.error)
    wallet.api.token = answer.body["token"]


def post_flow(wallet: WalletRun, path: str, body: dict, figures: Figures, stop: threading.Event) -> str | None:
    """One fund-moving request, retried with the same Idempotency-Key on a 5xx or a lost answer,
    the way a careful client would. Returns the flow id if accepted."""
    key = uuid.uuid4().hex
    saw_5xx = False
    for attempt in range(8):
        answer = wallet.api.call("POST", path, body, key=key)
        if answer.status == 202:
            if answer.replayed and saw_5xx:
                # The server said "something went wrong, nothing was changed" but it had accepted the request.
                wallet.five_xx_committed.append(key)
            figures.add("requests_accepted")
            if attempt:
                figures.add("requests_accepted_after_retry")
            return answer.body["flow_id"]
        if answer.status is not None and answer.status < 500:
            figures.add(f"refused_{answer.status}_{(answer.body or {}).get('code', '?')}")
            return None
        saw_5xx = saw_5xx or answer.status is not None
        if stop.is_set() and attempt >= 2:
            break
        time.sleep(min(0.5 * 2 ** attempt, 4.0))
    wallet.gave_up.append(key)
    figures.add("requests_given_up")
    return None


def choose(rng: random.Random, wallet: WalletRun, balances: dict) -> tuple[str, dict, str, str, int] | None:
    """(path, body, kind, mode, quantity): mostly requests that can succeed, a few that cannot."""
    usda = int(balances["available"]["USDA"])
    tim3 = int(balances["available"]["TIM3"])
    locked = int(balances["locked"]["USDA"])

    def q(top: int) -> int:
        return rng.randint(UNIT, max(UNIT, top)) // 1000 * 1000 + rng.randint(0, 999)

    if usda < 60 * UNIT and wallet.faucet_asked < 9_000 * UNIT:
        return "/api/faucet", {"quantity": str(500 * UNIT)}, "faucet", "", 500 * UNIT
    roll = rng.random()
    if roll < 0.04:  # below the coordinator's minimum: v2 is refunded, v1 fails
        mode = rng.choice(["deposit", "lock"])
        return "/api/deposits", {"quantity": str(UNIT // 2), "mode": mode}, "deposit", mode, UNIT // 2
    if roll < 0.07 and tim3 < 10**6 * UNIT:  # more than the wallet holds: the burn fails
        mode = rng.choice(["deposit", "lock"])
        quantity = tim3 + 5 * UNIT
        return "/api/redemptions", {"quantity": str(quantity), "mode": mode}, "redeem", mode, quantity
    options = []
    if usda >= 2 * UNIT:
        options += ["deposit", "deposit", "lock"]
    if tim3 >= 2 * UNIT:
        options += ["redeem", "redeem"]
    if tim3 >= 2 * UNIT and locked >= 2 * UNIT:
        options += ["burn"]
    if not options:
        return None
    match rng.choice(options):
        case "deposit":
            quantity = q(min(usda // 2, 25 * UNIT))
            return "/api/deposits", {"quantity": str(quantity), "mode": "deposit"}, "deposit", "deposit", quantity
        case "lock":
            quantity = q(min(usda // 2, 25 * UNIT))
            return "/api/deposits", {"quantity": str(quantity), "mode": "lock"}, "deposit", "lock", quantity
        case "redeem":
            quantity = q(min(tim3 // 2, 20 * UNIT))
            return "/api/redemptions", {"quantity": str(quantity), "mode": "deposit"}, "redeem", "deposit", quantity
        case _:
            quantity = q(min(tim3 // 2, locked // 2, 20 * UNIT))
            return "/api/redemptions", {"quantity": str(quantity), "mode": "lock"}, "redeem", "lock", quantity


def wallet_loop(wallet: WalletRun, rng: random.Random, figures: Figures, stop: threading.Event,
                ended: dict, errors: list) -> None:
    try:
        flow_id = post_flow(wallet, "/api/faucet", {"quantity": str(1_000 * UNIT)}, figures, stop)
        if flow_id:
            wallet.accepted[flow_id] = {"kind": "faucet", "mode": "", "quantity": 1_000 * UNIT}
            wallet.in_flight.append(flow_id)
            wallet.faucet_asked += 1_000 * UNIT
        while not stop.is_set():
            wallet.in_flight = [f for f in wallet.in_flight if f not in ended]
            # While Redis is down no doorbell rings and flows stall: keep sending anyway (a couple more
            # than usual), so the API is exercised exactly then.
            if len(wallet.in_flight) >= MAX_IN_FLIGHT + (2 if figures.redis_down() else 0):
                # Watch the oldest one, the way a client would (public, not rate limited).
                wallet.api.call("GET", f"/api/flows/{wallet.in_flight[0]}")
                time.sleep(rng.uniform(0.3, 0.7))
                continue
            answer = wallet.api.call("GET", "/api/wallet")
            if answer.status != 200:
                time.sleep(0.5)
                continue
            move = choose(rng, wallet, answer.body)
            if move is None:
                time.sleep(0.3)
                continue
            path, body, kind, mode, quantity = move
            flow_id = post_flow(wallet, path, body, figures, stop)
            if flow_id:
                if flow_id not in wallet.accepted:
                    wallet.accepted[flow_id] = {"kind": kind, "mode": mode, "quantity": quantity}
                    wallet.in_flight.append(flow_id)
                if kind == "faucet":
                    wallet.faucet_asked += quantity
            time.sleep(rng.uniform(0.1, 0.8))
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(f"wallet {wallet.index}: {type(exc).__name__}: {exc}")


# --- the faults -------------------------------------------------------------------------------

class Faults(threading.Thread):
    """Injects every fault on a timeline of FAULT_SECONDS; leaves WORKERS workers running."""

    def __init__(self, stack, rng: random.Random, figures: Figures, started: float, process_ids: list[str]):
        super().__init__(name="faults", daemon=True)
        self.stack, self.rng, self.figures, self.started = stack, rng, figures, started
        self.process_ids = process_ids
        self.error: BaseException | None = None
        self.generation = 0
        self.redis_is_down = False
        self.all_stopped = False
        self.last_redis_up_ms = 0  # wall clock, like message timestamps

    # workers
    def start_worker(self) -> Service:
        self.generation += 1
        return self.stack.start_worker(f"w{self.generation}", wait=False)

    def kill_random_worker(self) -> None:
        alive = self.stack.workers()
        if not alive:
            return
        victim = self.rng.choice(alive)
        self.stack.kill(victim, signal.SIGKILL)
        self.figures.add("workers_killed")
        self.start_worker()
        self.figures.add("workers_restarted")

    def stop_all_workers(self) -> None:
        """Every worker down (a warm shutdown, SIGTERM): replies wait in the database while
        operations pass PendingTimeout; CleanupExpired ticks pile up in Redis."""
        for worker in self.stack.workers():
            worker.popen.send_signal(signal.SIGTERM)
        for worker in self.stack.workers(alive=False):
            try:
                worker.popen.wait(timeout=20)
            except Exception:  # noqa: BLE001 - a worker stuck in shutdown is killed
                self.stack.kill(worker, signal.SIGKILL)
        self.all_stopped = True
        self.figures.add("all_workers_stopped")

    def top_up_workers(self) -> None:
        for _ in range(WORKERS - len(self.stack.workers())):
            self.start_worker()
            self.figures.add("workers_restarted")

    # the database
    def drop_worker_connection(self, window: float = 2.0) -> None:
        """pg_terminate_backend a worker's connection, preferably inside a write transaction."""
        names = [w.appname for w in self.stack.workers()]
        if not names:
            return
        deadline = time.monotonic() + window
        fallback = None
        with connection.cursor() as cursor:
            while time.monotonic() < deadline:
                cursor.execute(
                    "SELECT pid, backend_xid IS NOT NULL FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = ANY(%s) AND state IN ('active', 'idle in transaction') "
                    "AND xact_start IS NOT NULL AND pid <> pg_backend_pid()", [names])
                rows = cursor.fetchall()
                writing = [pid for pid, xid in rows if xid]
                if writing:
                    cursor.execute("SELECT pg_terminate_backend(%s)", [self.rng.choice(writing)])
                    if cursor.fetchone()[0]:
                        self.figures.add("connections_dropped")
                        self.figures.add("connections_dropped_mid_write")
                    return
                fallback = fallback or (rows[0][0] if rows else None)
                time.sleep(0.003)
            if fallback is not None:
                cursor.execute("SELECT pg_terminate_backend(%s)", [fallback])
                if cursor.fetchone()[0]:
                    self.figures.add("connections_dropped")
                    return
        self.figures.add("connection_drop_missed")  # no worker was in a transaction at the time

    def cancel_worker_statement(self, window: float = 2.0) -> None:
        """pg_cancel_backend a worker's running statement inside a write transaction: what a
        statement or lock timeout, a deadlock victim or an operator's cancel looks like. The
        connection survives; only that statement fails."""
        names = [w.appname for w in self.stack.workers()]
        if not names:
            return
        deadline = time.monotonic() + window
        with connection.cursor() as cursor:
            while time.monotonic() < deadline:
                cursor.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = ANY(%s) "
                    "AND state = 'active' AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()", [names])
                pids = [row[0] for row in cursor.fetchall()]
                if pids:
                    cursor.execute("SELECT pg_cancel_backend(%s)", [self.rng.choice(pids)])
                    if cursor.fetchone()[0]:
                        self.figures.add("statements_canceled")
                    return
                time.sleep(0.002)
        self.figures.add("statement_cancel_missed")

    # the broker
    def duplicate_doorbells(self) -> None:
        """Each of two random processes: three immediate doorbells, and three delayed ones
        enqueued longest-countdown first, so they arrive in the opposite order."""
        for process_id in self.rng.sample(self.process_ids, 2):
            try:
                for _ in range(3):
                    drain.delay(process_id)
                    self.figures.add("duplicate_doorbells")
                for countdown in sorted((self.rng.uniform(0.2, 4.0) for _ in range(3)), reverse=True):
                    drain.apply_async((process_id,), countdown=countdown)
                    self.figures.add("duplicate_doorbells")
                    self.figures.add("reordered_doorbells")
            except Exception:  # noqa: BLE001 - the broker went away under us
                self.figures.add("doorbells_refused")
                reset_broker_connections()
                return

    def redis_down(self) -> None:
        self.stack.redis.shutdown()
        with self.figures.lock:
            self.figures.outages.append([time.monotonic(), None])
        self.redis_is_down = True

    def redis_up(self) -> None:
        self.stack.redis.start()
        self.last_redis_up_ms = int(time.time() * 1000)
        self.stack.redis.restarts += 1
        with self.figures.lock:
            self.figures.outages[-1][1] = time.monotonic()
        self.redis_is_down = False
        self.figures.add("redis_restarts")

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            self.error = exc
        finally:
            connections.close_all()

    def _run(self) -> None:
        rng, t = self.rng, lambda: time.monotonic() - self.started
        redis_plan = [0.22 * FAULT_SECONDS, 0.55 * FAULT_SECONDS]  # when Redis goes down
        redis_back_at = None
        stop_all_at, restart_all_at = 0.8 * FAULT_SECONDS, None
        next_kill, next_drop, next_bells = rng.uniform(2, 4), rng.uniform(1, 3), 0.5
        next_cancel = rng.uniform(1, 3)
        while t() < FAULT_SECONDS or self.redis_is_down or self.all_stopped:
            now = t()
            if redis_plan and now >= redis_plan[0] and not self.all_stopped:
                redis_plan.pop(0)
                self.figures.event(self.started, "Redis SHUTDOWN NOSAVE")
                self.redis_down()
                redis_back_at = now + REDIS_DOWN_SECONDS
            elif self.redis_is_down and now >= redis_back_at:
                self.redis_up()
                self.figures.event(self.started, "Redis started again (empty)")
            elif stop_all_at is not None and now >= stop_all_at and not self.redis_is_down:
                stop_all_at = None
                self.figures.event(self.started, "every worker stopped")
                self.stop_all_workers()
                restart_all_at = t() + ALL_STOPPED_SECONDS
            elif self.all_stopped and now >= restart_all_at:
                self.all_stopped = False
                self.top_up_workers()
                self.figures.event(self.started, f"{WORKERS} workers started again")
            elif now >= next_kill and not self.all_stopped and now < FAULT_SECONDS:
                self.kill_random_worker()
                next_kill = now + rng.uniform(3, 5)
            elif now >= next_drop and not self.all_stopped and now < FAULT_SECONDS:
                self.drop_worker_connection()
                next_drop = t() + rng.uniform(2, 4)
            elif now >= next_cancel and not self.all_stopped and now < FAULT_SECONDS:
                self.cancel_worker_statement()
                next_cancel = t() + rng.uniform(2, 4)
            elif now >= next_bells and not self.redis_is_down:
                self.duplicate_doorbells()
                next_bells = now + rng.uniform(0.6, 1.4)
            else:
                time.sleep(0.05)
        self.top_up_workers()


# --- checks -----------------------------------------------------------------------------------

def expected_holdings(accepted: dict, outcome: dict) -> dict[str, int]:
    """What a wallet must hold, from its accepted flows' outcomes alone."""
    usda = locked = tim3 = 0
    for flow_id, request in accepted.items():
        if outcome[flow_id] != Flow.COMPLETED:
            continue  # refunded and failed flows leave the wallet as it was
        q = request["quantity"]
        match request["kind"], request["mode"]:
            case "faucet", _:
                usda += q
            case "deposit", "deposit":
                usda, tim3 = usda - q, tim3 + q
            case "deposit", "lock":
                locked, tim3 = locked + q, tim3 + q
            case "redeem", "deposit":
                usda, tim3 = usda + q, tim3 - q
            case "redeem", "lock":
                locked, tim3 = locked - q, tim3 - q
    return {"USDA": usda, "USDA locked": locked, "TIM3": tim3}


def actual_holdings(address: str) -> dict[str, int]:
    rows = {name: (balance, locked) for name, balance, locked in TokenAccount.objects.filter(
        account=address).values_list("process__name", "balance", "locked")}
    usda, tim3 = rows.get("usda", (0, 0)), rows.get("tim3", (0, 0))
    return {"USDA": usda[0], "USDA locked": usda[1], "TIM3": tim3[0]}


def slot_problems() -> list[str]:
    """Each message to a process has exactly one slot; each process's slots are 1..n, each used once."""
    problems = []
    for process in Process.objects.all():
        slots = Counter(Message.objects.filter(target=process.id).values_list("slot", flat=True))
        if None in slots:
            slotless = list(Message.objects.filter(target=process.id, slot__isnull=True).values_list(
                "action", "status", "sender")[:5])
            problems.append(f"{process.name}: {slots[None]} message(s) without a slot: {slotless}")
        used = sorted(s for s in slots if s is not None)
        if used != list(range(1, process.next_slot)):
            problems.append(f"{process.name}: slots are not 1..{process.next_slot - 1}")
        doubles = [s for s, n in slots.items() if s is not None and n > 1]
        if doubles:
            problems.append(f"{process.name}: slots used twice: {doubles[:5]}")
    return problems


def applied_once_problems() -> tuple[list[str], dict]:
    """Tokens: one mint/burn record per Mint-/Burn-Response sent, one per message; coordinators:
    one final word per operation, agreeing with the operation and its flow."""
    problems, figures = [], {}
    for token in TokenState.objects.select_related("process"):
        name = token.process.name
        for kind, action in (("mint", "Mint-Response"), ("burn", "Burn-Response")):
            records = TokenOperation.objects.filter(process=token.process, kind=kind)
            replies = Message.objects.filter(sender=token.process_id, action=action).count()
            if records.count() != replies:
                problems.append(f"{name}: {records.count()} {kind} records but {replies} {action} messages")
            per_message = Counter(records.values_list("message_id", flat=True))
            if any(n > 1 for n in per_message.values()):
                problems.append(f"{name}: a message recorded more than one {kind}")
            figures[f"{name}_{kind}s"] = replies
    coordinator_ids = list(Process.objects.filter(kind="coordinator").values_list("id", flat=True))
    finals = Counter()
    final_status = {}
    for m in Message.objects.filter(sender__in=coordinator_ids, action__in=FINAL_ACTIONS):
        key = (m.sender, m.get("Operation-Id"))
        finals[key] += 1
        final_status[key] = m.get("Flow-Status")
    flows = dict(Flow.objects.values_list("id", "status"))
    for op in Operation.objects.all():
        key = (op.process_id, op.op_id)
        if finals[key] != 1:
            problems.append(f"operation {op.op_id} ({op.kind}, {op.status}) has {finals[key]} final messages")
        elif final_status[key] != op.status:
            problems.append(f"operation {op.op_id}: final message says {final_status[key]}, operation {op.status}")
        elif op.flow_id in flows and flows[op.flow_id] != op.status:
            problems.append(f"flow {op.flow_id} is {flows[op.flow_id]} but its operation {op.status}")
    figures["operations"] = Operation.objects.count()
    return problems, figures


def timeout_figures(coordinator_ids: list[str]) -> dict:
    asked = Message.objects.filter(sender__in=coordinator_ids, action="Message-Status")
    answers = Message.objects.filter(target__in=coordinator_ids, action="Message-Status-Response")
    late = sum(1 for r in Message.objects.filter(target__in=coordinator_ids).exclude(result={})
               .values_list("result", flat=True) for change in (r or {}).get("changes", []) if "late_reply" in change)
    return {
        "cleanup_ticks": Message.objects.filter(target__in=coordinator_ids, action="CleanupExpired").count(),
        "operations_timed_out": asked.count(),  # each: the coordinator asked what became of its request
        "timed_out_still_handled": sum(1 for m in answers if m.get("Handled") == "true"),
        "compensated_after_timeout": Operation.objects.filter(error__startswith="Timed out").count(),
        "late_replies_ignored": late,
    }


def database_connections(web: Service) -> dict[str, int]:
    """Open Postgres connections now: the web process's, the workers', and the whole server's."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT application_name, count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                       "GROUP BY 1")
        rows = cursor.fetchall()
    return {"web": sum(n for name, n in rows if name == web.appname),
            "workers": sum(n for name, n in rows if name.startswith("tim3-w") and name != web.appname),
            "server": sum(n for _, n in rows)}


def latency(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ordered = sorted(seconds)
    pick = lambda p: round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))])  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(1000 * ordered[-1])}


def verify_output() -> tuple[bool, str]:
    out = StringIO()
    try:
        call_command("verify", stdout=out)
    except SystemExit as exc:
        return exc.code in (0, None), out.getvalue()
    return "verify: clean" in out.getvalue(), out.getvalue()


def wait_for(condition, *, timeout: float, what: str, stack, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached within {timeout:.0f}s\n{stack.logs()}")
        time.sleep(every)


# --- the test ---------------------------------------------------------------------------------

def write_artifact(result: dict) -> None:
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps(result, indent=2, default=str) + "\n")


def test_money_survives_crashes_broker_loss_dropped_connections_duplicates_and_timeouts(fault_stack, request):
    seed = int(os.environ.get("TIM3_FAULT_SEED") or random.randrange(1, 10**9))
    done = {"written": False}
    unfinished = {"generated_at": datetime.now(UTC).isoformat(timespec="seconds"), "passed": False, "seed": seed}
    write_artifact({**unfinished, "problems": ["the run did not finish"]})  # never a stale report
    try:
        run_faults(fault_stack, request, seed, done)
    except BaseException as exc:
        if not done["written"]:
            write_artifact({**unfinished, "problems": [f"the run did not finish: {type(exc).__name__}: {exc}"[:4000]]})
        raise


def run_faults(stack, request, seed: int, done: dict) -> None:
    rng = random.Random(seed)
    run_id = uuid.uuid4().hex[:6]
    began = time.monotonic()
    figures = Figures()

    # The stack: bootstrap, PendingTimeout 1 s, workers, beat, Daphne.
    procs = bootstrap_system(environment="test")
    stack.start_workers(WORKERS)
    configure_coordinator(config_type="PendingTimeout", value=str(PENDING_TIMEOUT_S))
    stack.start_beat(TIM3_SWEEP_SECONDS=1, TIM3_CLEANUP_SECONDS=2)
    web = stack.start_web(settings_module="tests.faults.web_settings")
    wait_for(lambda: CoordinatorState.objects.filter(pending_timeout_ms=PENDING_TIMEOUT_S * 1000).exists(),
             timeout=60, what="PendingTimeout configured", stack=stack, every=0.1)

    wallets = [WalletRun(index=i, api=Api(web.url, figures)) for i in range(WALLETS)]
    setup_threads = [threading.Thread(target=register, args=(w, run_id)) for w in wallets]
    for thread in setup_threads:
        thread.start()
    for thread in setup_threads:
        thread.join()
    assert all(w.api.token for w in wallets), "a wallet could not register or get a token"
    setup_seconds = time.monotonic() - began

    # Load and faults together.
    stop, ended, errors = threading.Event(), {}, []
    threads = [threading.Thread(target=wallet_loop, args=(w, random.Random(rng.random()), figures, stop, ended, errors),
                                name=f"wallet-{w.index}", daemon=True) for w in wallets]
    started = time.monotonic()
    faults = Faults(stack, random.Random(rng.random()), figures, started, [p.id for p in procs.values()])
    for thread in threads:
        thread.start()
    faults.start()
    peak_connections = Counter()
    while faults.is_alive():  # the wallets learn here which of their flows ended
        in_flight = [f for w in wallets for f in w.in_flight if f not in ended]
        ended.update(Flow.objects.filter(id__in=in_flight).exclude(status=Flow.PENDING).values_list("id", "status"))
        for kind, n in database_connections(web).items():
            peak_connections[kind] = max(peak_connections[kind], n)
        time.sleep(0.25)
    faults.join()
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    fault_seconds = time.monotonic() - started
    if faults.error:
        raise faults.error
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a wallet thread did not stop"

    # Every flow the API accepted ends, with no manual step (sweeper and CleanupExpired still running).
    settle_began = time.monotonic()
    for worker in stack.workers():
        stack.wait_ready(worker, timeout=60)
    accepted = {f: w for w in wallets for f in w.accepted}
    wait_for(lambda: not Flow.objects.filter(status=Flow.PENDING).exists(), timeout=SETTLE_SECONDS,
             what=f"all {Flow.objects.count()} flows ended "
                  f"({Flow.objects.filter(status=Flow.PENDING).count()} still pending)", stack=stack)
    settle_seconds = time.monotonic() - settle_began

    # Quiet: stop beat, drop what it queued (a CleanupExpired task a killed worker held comes back
    # after the visibility timeout and would start a cascade mid-check; the database holds every
    # message, so no doorbell is needed), then sweep until nothing is pending or queued.
    beat = next(s for s in stack.services if s.kind == "beat")
    beat.popen.send_signal(signal.SIGTERM)
    beat.popen.wait(timeout=30)
    reset_broker_connections()
    purge_broker(stack.redis_url)
    wait_until_idle(stack, timeout=90, sweep_every=1.0, quiet_broker=True)
    assert not Operation.objects.filter(status=Operation.PENDING).exists(), "an operation is still pending"
    stack.check_alive()

    # --- the checks: each a list of problems, empty when it holds ----------------------------
    checks: dict[str, list[str]] = {}
    flows = dict(Flow.objects.values_list("id", "status"))
    checks["every flow ended (completed, refunded or failed)"] = [
        f"flow {f} is {s}" for f, s in flows.items() if s not in FINAL_STATUSES]

    # The client's view: exactly its accepted flows exist, and its holdings follow from their outcomes.
    unaccepted, holdings = [], []
    for w in wallets:
        mine = set(Flow.objects.filter(user=w.address).values_list("id", flat=True))
        if mine != set(w.accepted):
            unaccepted.append(f"wallet {w.index}: flows {sorted(mine - set(w.accepted))[:3]} were never accepted; "
                              f"{sorted(set(w.accepted) - mine)[:3]} were accepted but do not exist")
        unaccepted += [f"wallet {w.index}: request {key} answered 5xx but had moved funds"
                       for key in w.five_xx_committed]
        if all(f in flows for f in w.accepted):
            expected, actual = expected_holdings(w.accepted, flows), actual_holdings(w.address)
            if expected != actual:
                holdings.append(f"wallet {w.index} ({w.address}): holds {actual}, its flows say {expected}")
    checks["each wallet holds exactly what its accepted flows' outcomes say"] = holdings
    checks["no flow the API did not accept, no 5xx that moved funds"] = unaccepted
    checks["each message to a process has one slot; slots 1..n, each once"] = slot_problems()
    once, token_figures = applied_once_problems()
    checks["mint/burn records == Mint/Burn-Responses; one final message per operation, agreeing with its flow"] = once
    checks["no dead letter"] = [f"dead letter: {action}: {error[:200]}" for action, error in
                                Message.objects.filter(dead=True).values_list("action", "error")]
    checks["no stuck operation"] = [f"stuck operation {op} {step}: {error[:200]}" for op, step, error in
                                    Operation.objects.filter(step__startswith="stuck-").values_list(
                                        "op_id", "step", "error")]
    # The periodic machinery survived the broker restarts: beat's ticks reached a worker afterwards.
    ticks_after_restart = Message.objects.filter(action="CleanupExpired", timestamp__gt=faults.last_redis_up_ms).count()
    checks["beat's ticks reached a worker after the last Redis restart"] = (
        ["no CleanupExpired tick after the last Redis restart: beat or the workers did not reconnect"]
        if faults.last_redis_up_ms and not ticks_after_restart else [])
    # The API kept answering while Redis was down, fund-moving requests included (their flows ended: above).
    answered_in_outage = [t for t in figures.timings if t[2] and t[2] < 500 and figures.during_outage(*t[:2], grace=0)]
    checks["the API accepted fund-moving requests while Redis was down"] = (
        [] if any(t[2] == 202 for t in answered_in_outage) or not figures.outages
        else ["no fund-moving request was accepted while Redis was down"])
    invariant_problems = check_invariants()
    checks["SPEC §4 invariants (check_invariants)"] = [f"invariant: {p}" for p in invariant_problems]
    verify_started = time.monotonic()
    verify_clean, verify_text = verify_output()
    verify_seconds = time.monotonic() - verify_started
    checks["manage.py verify (invariants + replay)"] = [] if verify_clean else ["verify:\n" + verify_text[-4000:]]
    problems = [p for found in checks.values() for p in found]
    dead = checks["no dead letter"]
    stuck = checks["no stuck operation"]

    # --- the figures ----------------------------------------------------------------------
    for error in figures.server_errors:
        error["during_redis_outage"] = figures.during_outage(error["t0"], error["t1"])
    coordinator_ids = list(Process.objects.filter(kind="coordinator").values_list("id", flat=True))
    by_status = Counter(flows.values())
    by_kind = Counter(f"{kind}/{mode or '-'} {status}" for kind, mode, status in
                      Flow.objects.filter(id__in=list(accepted)).values_list("kind", "mode", "status"))
    http_total = sum(figures.http.values())
    five_xx = [e for e in figures.server_errors if e["status"] is not None]
    no_answer = [e for e in figures.server_errors if e["status"] is None]
    result = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "passed": not problems,
        "seed": seed,
        "stack": {"workers": WORKERS, "beat": True, "web": "daphne", "wallets": WALLETS,
                  "database": "postgres", "broker": "redis (private, restarted)", "pending_timeout_s": PENDING_TIMEOUT_S},
        "seconds": {"setup": round(setup_seconds, 1), "faults": round(fault_seconds, 1),
                    "settle": round(settle_seconds, 1), "verify": round(verify_seconds, 1),
                    "total": round(time.monotonic() - began, 1)},
        "flows": {"total": len(flows), "accepted_by_api": len(accepted), **{s: by_status.get(s, 0) for s in
                                                                             ("completed", "refunded", "failed", "pending")},
                  "by_kind": dict(sorted(by_kind.items()))},
        "hops": Message.objects.filter(slot__isnull=False).count(),
        "peak_database_connections": dict(peak_connections),
        "messages": Message.objects.count(),
        "faults": {
            "workers_killed": figures.counts["workers_killed"],
            "workers_restarted": figures.counts["workers_restarted"],
            "all_workers_stopped": figures.counts["all_workers_stopped"],
            "redis_restarts": figures.counts["redis_restarts"],
            "redis_down_seconds": round(sum((up or down) - down for down, up in figures.outages), 1),
            "connections_dropped": figures.counts["connections_dropped"],
            "connections_dropped_mid_write": figures.counts["connections_dropped_mid_write"],
            "connection_drops_missed": figures.counts["connection_drop_missed"],
            "statements_canceled": figures.counts["statements_canceled"],
            "duplicate_doorbells": figures.counts["duplicate_doorbells"],
            "reordered_doorbells": figures.counts["reordered_doorbells"],
            "doorbells_refused": figures.counts["doorbells_refused"],
        },
        "timeouts": {**timeout_figures(coordinator_ids), "cleanup_ticks_after_last_redis_restart": ticks_after_restart},
        "http": {
            "requests": http_total,
            "accepted": figures.counts["requests_accepted"],
            "accepted_after_retry": figures.counts["requests_accepted_after_retry"],
            "given_up": figures.counts["requests_given_up"],
            "5xx": len(five_xx),
            "5xx_during_redis_outage": sum(1 for e in five_xx if e["during_redis_outage"]),
            "no_answer": len(no_answer),
            "5xx_that_moved_funds": sum(len(w.five_xx_committed) for w in wallets),
            "answered_during_redis_outage": len(answered_in_outage),
            "accepted_during_redis_outage": sum(1 for *_, status, label in answered_in_outage if status == 202),
            "latency_ms": latency([t1 - t0 for t0, t1, *_ in figures.timings]),
            "latency_ms_during_redis_outage": latency([t1 - t0 for t0, t1, *_ in answered_in_outage]),
            "refused_4xx": {k.removeprefix("refused_"): v for k, v in sorted(figures.counts.items())
                            if k.startswith("refused_")},
            "by_endpoint": dict(sorted(figures.http.items())),
            "server_errors": [{k: v for k, v in e.items() if k not in ("t0", "t1")} for e in figures.server_errors[:20]],
        },
        "exactly_once": {**token_figures, "dead_letters": len(dead), "stuck_operations": len(stuck)},
        "checks": {name: not found for name, found in checks.items()},
        "invariants": invariant_problems,
        "verify": verify_text.strip().splitlines()[-2:],
        "timeline": figures.events,
        "problems": problems,
    }
    write_artifact(result)
    done["written"] = True

    summary = (
        f"seed {seed}: {len(flows)} flows ({by_status.get('completed', 0)} completed, "
        f"{by_status.get('refunded', 0)} refunded, {by_status.get('failed', 0)} failed, "
        f"{by_status.get('pending', 0)} pending), {result['hops']} hops in {fault_seconds:.0f}s of faults + "
        f"{settle_seconds:.0f}s to settle; {result['faults']['workers_killed']} workers SIGKILLed, "
        f"{result['faults']['all_workers_stopped']}x all workers stopped, {result['faults']['redis_restarts']} Redis "
        f"restarts ({result['faults']['redis_down_seconds']}s down), {result['faults']['connections_dropped']} DB "
        f"connections dropped ({result['faults']['connections_dropped_mid_write']} mid-write), "
        f"{result['faults']['duplicate_doorbells']} duplicate doorbells "
        f"({result['faults']['reordered_doorbells']} delayed out of order), "
        f"{result['timeouts']['operations_timed_out']} operations timed out "
        f"({result['timeouts']['compensated_after_timeout']} compensated); HTTP {http_total} requests, "
        f"{len(five_xx)} 5xx ({result['http']['5xx_during_redis_outage']} during Redis outages), "
        f"{len(no_answer)} unanswered, {result['http']['5xx_that_moved_funds']} 5xx moved funds"
    )
    print("\n" + summary + "\n" + json.dumps({k: result[k] for k in ("flows", "faults", "timeouts")}, indent=1))
    request.node.user_properties.append((FIGURES, summary))
    assert not problems, "\n".join(problems[:40])
