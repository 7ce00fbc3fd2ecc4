"""The four flows of SPEC §4 on the real scaled stack: Postgres, Redis and two
separate `celery -A tim3web worker` processes delivering every hop.

1. Each flow, hop by hop: the same sequence as in-process (tests/test_flows.py),
   the same balances, positions, supply and reserves.
2. 50 wallets depositing and redeeming at once (both modes) against tight
   per-user and system mint limits: no limit exceeded, every flow ends, the
   books balance.
3. `manage.py integration_suite` (SPEC §6) as a console process while the two
   workers deliver.
"""

import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from functools import partial

import pytest

from processes import actions
from processes.blueprints.state import Operation, Position, TokenAccount
from processes.flows import FINAL_STATUSES, Flow
from processes.invariants import check_invariants
from processes.runtime.ids import new_id
from processes.runtime.models import Message
from processes.runtime.quantities import UNIT
from processes.services import bootstrap_system
from tests.scaled.stack import ROOT, drains_run, in_threads, report, verify_clean, wait_until_idle
from tests.test_flows import (
    BURN_HOPS,
    LOCK_MINT_HOPS,
    assert_operation_id_on_every_hop,
    balances,
    books,
    debit_then_credit,
    deposit_hops,
    flow_messages,
    hops,
    positions,
    redeem_hops,
    reserves,
    supply,
)

pytestmark = [pytest.mark.scaled, pytest.mark.django_db(transaction=True)]

U = UNIT


# --- helpers ---------------------------------------------------------------------------

def wait_flows(flows: list[Flow], scaled, *, timeout: float = 120.0) -> list[Flow]:
    """Wait until the workers ended these flows and nothing at all is in flight; return them fresh."""
    ids = [f.id for f in flows]
    deadline = time.monotonic() + timeout
    while Flow.objects.filter(id__in=ids, status=Flow.PENDING).exists():
        scaled.check_alive()
        if time.monotonic() > deadline:
            pending = list(Flow.objects.filter(id__in=ids, status=Flow.PENDING).values_list("kind", "mode")[:10])
            pytest.fail(f"flows still pending after {timeout:.0f}s: {pending}\n{scaled.logs()}")
        time.sleep(0.02)
    wait_until_idle(scaled, timeout=timeout)
    fresh = Flow.objects.in_bulk(ids)
    return [fresh[i] for i in ids]


def run_flow(flow: Flow, scaled) -> Flow:
    [flow] = wait_flows([flow], scaled)
    return flow


def configure_and_wait(scaled, **limits: int) -> None:
    sent = [m for name, value in limits.items()
            for m in actions.configure_coordinator(config_type=name, value=str(value))]
    wait_until_idle(scaled)
    for msg in sent:
        msg.refresh_from_db()
        assert msg.status == Message.APPLIED, (msg.get("ConfigType"), msg.error)


def assert_settled_clean() -> None:
    assert not Message.objects.filter(status=Message.PENDING).exists()
    assert not Operation.objects.filter(status=Operation.PENDING).exists()
    assert check_invariants() == []
    verify_clean()


# --- 1. the four flows, hop by hop, on two workers -------------------------------------------

def test_four_flows_hop_by_hop_on_two_workers(scaled, request):
    # No following: every hop is a doorbell through Redis, picked up by either worker.
    workers = scaled.start_workers(2, TIM3_FOLLOW_SECONDS=0)
    bootstrap_system(environment="test")
    user = new_id()
    started = time.monotonic()
    assert run_flow(actions.request_faucet(wallet=user, quantity=str(500 * U)), scaled).status == Flow.COMPLETED
    assert balances(user) == {"USDA": 500 * U, "TIM3": 0, "locked": 0}

    # v2 deposit 120
    flow = run_flow(actions.request_deposit(wallet=user, quantity=str(120 * U), mode="deposit"), scaled)
    assert (flow.status, flow.error, flow.kind, flow.mode) == (Flow.COMPLETED, "", "deposit", "deposit")
    assert hops(flow) == deposit_hops()
    assert all(m.status == Message.APPLIED for m in flow_messages(flow))
    debit_then_credit(flow, payer="user")
    op = assert_operation_id_on_every_hop(flow)
    assert op.op_id == flow_messages(flow)[2].msg_id and op.status == Operation.COMPLETED
    assert balances(user) == {"USDA": 380 * U, "TIM3": 120 * U, "locked": 0}
    assert positions(user) == {"USDA-custody": (120 * U, 120 * U)}
    assert supply() == 120 * U
    assert reserves() == {"tim3_supply": 120 * U, "usda_held": 120 * U, "usda_locked": 0,
                          "pending_operations": 0, "pending_messages": 0}
    assert books() == {"custody": 120 * U, "collateral": 0, "outstanding": 120 * U, "payouts_committed": 0}
    assert_settled_clean()

    # v2 redeem 75
    flow = run_flow(actions.request_redemption(wallet=user, quantity=str(75 * U), mode="deposit"), scaled)
    assert (flow.status, flow.error, flow.kind, flow.mode) == (Flow.COMPLETED, "", "redeem", "deposit")
    assert hops(flow) == redeem_hops()
    assert all(m.status == Message.APPLIED for m in flow_messages(flow))
    debit_then_credit(flow, payer="coordinator")
    assert assert_operation_id_on_every_hop(flow).op_id == flow.id
    assert balances(user) == {"USDA": 455 * U, "TIM3": 45 * U, "locked": 0}
    assert positions(user) == {"USDA-custody": (45 * U, 45 * U)}
    assert supply() == 45 * U
    assert books() == {"custody": 45 * U, "collateral": 0, "outstanding": 45 * U, "payouts_committed": 0}
    assert_settled_clean()

    # v1 lock mint 150: the USDA stays in the user's account, locked
    flow = run_flow(actions.request_deposit(wallet=user, quantity=str(150 * U), mode="lock"), scaled)
    assert (flow.status, flow.error, flow.kind, flow.mode) == (Flow.COMPLETED, "", "deposit", "lock")
    assert hops(flow) == LOCK_MINT_HOPS
    assert all(m.status == Message.APPLIED for m in flow_messages(flow))
    op = assert_operation_id_on_every_hop(flow)
    assert op.op_id == flow.id and op.kind == Operation.LOCK_MINT
    assert balances(user) == {"USDA": 455 * U, "TIM3": 195 * U, "locked": 150 * U}
    assert positions(user) == {"USDA-custody": (45 * U, 45 * U), "USDA-locked": (150 * U, 150 * U)}
    assert supply() == 195 * U
    assert reserves() == {"tim3_supply": 195 * U, "usda_held": 45 * U, "usda_locked": 150 * U,
                          "pending_operations": 0, "pending_messages": 0}
    assert books() == {"custody": 45 * U, "collateral": 150 * U, "outstanding": 195 * U, "payouts_committed": 0}
    assert_settled_clean()

    # v1 burn 60
    flow = run_flow(actions.request_redemption(wallet=user, quantity=str(60 * U), mode="lock"), scaled)
    assert (flow.status, flow.error, flow.kind, flow.mode) == (Flow.COMPLETED, "", "redeem", "lock")
    assert hops(flow) == BURN_HOPS
    assert all(m.status == Message.APPLIED for m in flow_messages(flow))
    assert_operation_id_on_every_hop(flow)
    assert balances(user) == {"USDA": 455 * U, "TIM3": 135 * U, "locked": 90 * U}
    assert positions(user) == {"USDA-custody": (45 * U, 45 * U), "USDA-locked": (90 * U, 90 * U)}
    assert supply() == 135 * U
    assert reserves() == {"tim3_supply": 135 * U, "usda_held": 45 * U, "usda_locked": 90 * U,
                          "pending_operations": 0, "pending_messages": 0}
    assert books() == {"custody": 45 * U, "collateral": 90 * U, "outstanding": 135 * U, "payouts_committed": 0}
    assert_settled_clean()

    per_worker = drains_run(workers)
    assert len(per_worker) == 2 and all(per_worker.values()), f"both workers should have delivered hops: {per_worker}"
    report(request, f"faucet + 4 flows hop by hop in {time.monotonic() - started:.2f}s; "
                    f"drains per worker {sorted(per_worker.values())}")


# --- 2. 50 wallets at once against tight limits ---------------------------------------------

WALLETS = 50
FAUCET = 1_000 * U
FIRST = 40 * U  # each wallet's first deposit, under the default limits: v2 for even wallets, v1 for odd ones
DEPOSIT = 60 * U  # each of the 2 concurrent deposits per wallet (one v2, one v1)
REDEEM = 10 * U  # one concurrent redemption per wallet, in the mode of its first deposit
# Tight limits, set after the first deposits (which count against them: same day, same hour).
USER_DAILY = 100 * U  # 40 already used: room for exactly one more 60 deposit per wallet
SYSTEM_HOURLY = WALLETS * FIRST + 30 * DEPOSIT  # room for exactly 30 more deposits system-wide


def mode_of(i: int) -> str:
    return ("deposit", "lock")[i % 2]


def limit_value(config_type: str, base_units: int) -> int:
    """Configure's Value for a limit given in base units (LIMIT_FIELDS scaling)."""
    from processes.blueprints.coordinator import LIMIT_FIELDS

    _, scale = LIMIT_FIELDS[config_type]
    assert base_units % scale == 0
    return base_units // scale


def expected_books(flows: list[Flow]) -> dict[str, dict]:
    """Per wallet, what its completed flows must have left (a plain ledger)."""
    ledger = defaultdict(lambda: {"usda": FAUCET, "tim3": 0, "locked": 0, "custody": 0})
    for f in flows:
        row = ledger[f.user]
        if f.kind not in ("deposit", "redeem") or f.status != Flow.COMPLETED:
            continue  # the faucet is the starting balance; refunded or refused: nothing may have moved
        sign = 1 if f.kind == "deposit" else -1
        row["tim3"] += sign * f.quantity
        if f.mode == "deposit":
            row["usda"] -= sign * f.quantity
            row["custody"] += sign * f.quantity
        else:
            row["locked"] += sign * f.quantity
    return ledger


def test_fifty_wallets_deposit_and_redeem_at_once_within_the_limits(scaled, request):
    workers = scaled.start_workers(2)
    bootstrap_system(environment="test")
    wallets = [new_id() for _ in range(WALLETS)]
    started = time.monotonic()

    funding = in_threads([partial(actions.request_faucet, wallet=w, quantity=str(FAUCET)) for w in wallets])
    funding = wait_flows(funding, scaled)
    assert {f.status for f in funding} == {Flow.COMPLETED}
    first = in_threads([partial(actions.request_deposit, wallet=w, quantity=str(FIRST), mode=mode_of(i))
                        for i, w in enumerate(wallets)])
    first = wait_flows(first, scaled)
    assert {f.status for f in first} == {Flow.COMPLETED}
    funded = time.monotonic() - started

    configure_and_wait(scaled, UserDailyLimit=limit_value("UserDailyLimit", USER_DAILY),
                       SystemHourlyLimit=limit_value("SystemHourlyLimit", SYSTEM_HOURLY))

    # Everyone at once, shuffled: per wallet a v2 deposit, a v1 lock mint and a redemption (v2 redeem
    # or v1 burn, as it holds).
    rng = random.Random(7)
    jobs = []
    for i, w in enumerate(wallets):
        for k in range(2):
            jobs.append(partial(actions.request_deposit, wallet=w, quantity=str(DEPOSIT), mode=mode_of(i + k)))
        jobs.append(partial(actions.request_redemption, wallet=w, quantity=str(REDEEM), mode=mode_of(i)))
    rng.shuffle(jobs)
    burst_started = time.monotonic()
    burst = in_threads(jobs, threads=10)
    sending = time.monotonic() - burst_started
    burst = wait_flows(burst, scaled)
    drained = time.monotonic() - burst_started

    # Every flow ended, and nothing is left in flight anywhere.
    assert all(f.status in FINAL_STATUSES for f in burst)
    assert not Flow.objects.filter(status=Flow.PENDING).exists()
    assert not Operation.objects.filter(status=Operation.PENDING).exists()

    deposits = [f for f in burst if f.kind == "deposit"]
    redemptions = [f for f in burst if f.kind == "redeem"]
    statuses = Counter((f.kind, f.mode, f.status) for f in burst)
    refused = [f for f in deposits if f.status != Flow.COMPLETED]
    reasons = Counter(f.error.split(":")[0] for f in refused)
    # A refused v2 deposit was transferred first, so it is refunded; a refused v1 lock mint fails up front.
    assert all(f.status == (Flow.REFUNDED if f.mode == "deposit" else Flow.FAILED) for f in refused), statuses
    assert set(reasons) <= {"Daily limit", "System limit"}, [f.error for f in refused if not f.error.startswith(
        ("Daily limit", "System limit"))][:5]
    assert all(f.status == Flow.COMPLETED for f in redemptions), [(f.mode, f.error) for f in redemptions
                                                                   if f.status != Flow.COMPLETED][:5]

    # The limits, from the coordinator's operations: completed mints per user and system-wide.
    ops = list(Operation.objects.filter(kind__in=Operation.MINT_KINDS, status=Operation.COMPLETED))
    per_user = Counter()
    for op in ops:
        per_user[op.user] += op.quantity
    system_total = sum(per_user.values())
    assert max(per_user.values()) <= USER_DAILY, max(per_user.values())
    assert system_total <= SYSTEM_HOURLY, system_total
    # ... and the same from the flows (every completed deposit flow is one completed mint operation).
    flow_total = sum(f.quantity for f in first + deposits if f.status == Flow.COMPLETED)
    assert flow_total == system_total
    # The demand exceeded the system's room, so the limiter filled it exactly: one deposit for each of
    # 30 wallets; their other one was refused by the daily limit, the other 20 wallets' two by the system limit.
    accepted = [f for f in deposits if f.status == Flow.COMPLETED]
    assert system_total == SYSTEM_HOURLY and len(accepted) == 30, (system_total, len(accepted))
    assert len({f.user for f in accepted}) == 30
    assert reasons == {"Daily limit": 30, "System limit": 40}, reasons

    # Funds: each wallet's balances, locked USDA and positions are what its completed flows say.
    ledger = expected_books(funding + first + burst)
    for w in wallets:
        want = ledger[w]
        assert balances(w) == {"USDA": want["usda"], "TIM3": want["tim3"], "locked": want["locked"]}, w
        got = {p.collateral_type: (p.tim3, p.collateral) for p in Position.objects.filter(user=w)}
        expected = {"USDA-custody": (want["custody"], want["custody"]), "USDA-locked": (want["locked"], want["locked"])}
        assert {t: v for t, v in got.items() if v != (0, 0)} == {t: v for t, v in expected.items() if v != (0, 0)}, w
    tim3_total = sum(TokenAccount.objects.filter(process__name="tim3").values_list("balance", flat=True))
    assert supply() == tim3_total == sum(row["tim3"] for row in ledger.values())
    verify_started = time.monotonic()
    assert_settled_clean()
    verified = time.monotonic() - verify_started

    per_worker = drains_run(workers)
    assert len(per_worker) == 2 and all(per_worker.values()), f"both workers should have delivered: {per_worker}"
    counts = ", ".join(f"{kind} {mode} {status} {n}" for (kind, mode, status), n in sorted(statuses.items()))
    report(request, f"{WALLETS} wallets funded + first deposits in {funded:.2f}s; burst of {len(burst)} requests "
                    f"sent in {sending:.2f}s, all ended {drained:.2f}s after the first: {counts}; refusals {dict(reasons)}; "
                    f"minted this hour {system_total // U} of {SYSTEM_HOURLY // U} TIM3, max per wallet "
                    f"{max(per_user.values()) // U} of {USER_DAILY // U}; drains per worker {sorted(per_worker.values())}; "
                    f"{Message.objects.count()} messages verified (replayed) in {verified:.2f}s")


# --- 3. the system check, as a console process, on two workers ------------------------------------

def suite_rows(output: str) -> dict[str, str]:
    """The integration suite's table: {check: PASS|FAIL}."""
    rows = {}
    for line in output.splitlines():
        parts = line.split("  ")
        cells = [c.strip() for c in parts if c.strip()]
        if len(cells) >= 2 and cells[1] in ("PASS", "FAIL"):
            rows[cells[0]] = cells[1]
    return rows


def test_integration_suite_passes_in_scaled_mode(scaled, request):
    workers = scaled.start_workers(2)
    bootstrap_system(environment="test")
    wait_until_idle(scaled)

    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "manage.py", "integration_suite"], cwd=ROOT, env={**scaled.base_env, "PGAPPNAME": "tim3-suite"},
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"integration_suite exited {result.returncode}:\n{output}\n{scaled.logs()}"
    rows = suite_rows(result.stdout)
    assert len(rows) == 12 and set(rows.values()) == {"PASS"}, output
    assert "12 passed, 0 failed" in result.stdout, output

    wait_until_idle(scaled)
    assert not Flow.objects.filter(status=Flow.PENDING).exists()
    assert_settled_clean()
    per_worker = drains_run(workers)
    report(request, f"integration_suite: 12 PASS in {took:.2f}s on 2 workers "
                    f"(drains per worker {sorted(per_worker.values())})")
