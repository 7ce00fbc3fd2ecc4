"""The four flows of SPEC §4 and every way they fail, through the real processes.

Nothing of ours is mocked: users act through `processes.actions`, the operator
configures through ordinary messages, and delivery is the same drain the
workers run (`run_until_idle`), or, where a test needs a message to stay in
flight, `drain_mailbox` for chosen processes only. Each test ends with
`assert_consistent()`: every invariant holds and a replay of the message log
rebuilds exactly the live state.
"""

import time

import pytest

from processes import actions
from processes.blueprints.state import (
    CollateralLock,
    CoordinatorPosition,
    CoordinatorState,
    Operation,
    Position,
    TokenAccount,
    TokenOperation,
    TokenState,
)
from processes.flows import Flow
from processes.invariants import check_invariants, reserves_snapshot
from processes.runtime.delivery import drain_mailbox, processes_with_pending, run_until_idle, send_message, spawn_process
from processes.runtime.models import Message, Process
from processes.runtime.quantities import UNIT
from processes.runtime.replay import replay_all
from processes.services import (
    activate_coordinator,
    active_coordinator,
    operator_address,
    rollback_coordinator,
    send_check_risk_alerts,
    send_cleanup_expired,
    spawn_coordinator,
)

U = UNIT  # one whole token in base units

# --- helpers ----------------------------------------------------------------------------


def names() -> dict[str, str]:
    return dict(Process.objects.values_list("id", "name"))


def flow_messages(flow) -> list[Message]:
    return list(Message.objects.filter(pushed_for=flow.id).order_by("seq"))


def hops(flow) -> list[tuple[str, str, str]]:
    """(action, from, to) of every message the flow's first message caused, in arrival (seq) order.

    Processes appear by name; wallets (the user, the operator) as "user".
    """
    n = names()
    return [(m.action, n.get(m.sender, "user"), n.get(m.target, "user")) for m in flow_messages(flow)]


def account(token: str, who: str) -> TokenAccount | None:
    return TokenAccount.objects.filter(process__name=token, account=who).first()


def balances(who: str) -> dict[str, int]:
    usda, tim3 = account("usda", who), account("tim3", who)
    return {"USDA": usda.balance if usda else 0, "TIM3": tim3.balance if tim3 else 0,
            "locked": usda.locked if usda else 0}


def positions(who: str) -> dict[str, tuple[int, int]]:
    """State Manager positions: {collateral type: (TIM3, collateral)}."""
    return {p.collateral_type: (p.tim3, p.collateral) for p in Position.objects.filter(user=who)}


def supply() -> int:
    return TokenState.objects.get(process__name="tim3").total_supply


def reserves() -> dict[str, int]:
    r = reserves_snapshot()
    return {k: r[k] for k in ("tim3_supply", "usda_held", "usda_locked", "pending_operations", "pending_messages")}


def books(name: str = "coordinator") -> dict[str, int]:
    c = CoordinatorState.objects.get(process__name=name)
    return {"custody": c.custody, "collateral": c.collateral, "outstanding": c.outstanding,
            "payouts_committed": c.payouts_committed}


def coordinator_state(name: str = "coordinator") -> CoordinatorState:
    return CoordinatorState.objects.get(process__name=name)


def assert_consistent() -> None:
    """Nothing in flight, every invariant holds, and the log replays to the live state."""
    assert not Message.objects.filter(status=Message.PENDING).exists()
    assert check_invariants() == []
    report = replay_all()
    assert report.clean, report.differences


def settle(flow: Flow) -> Flow:
    run_until_idle()
    flow.refresh_from_db()
    return flow


def fund(who: str, quantity: int) -> None:
    """USDA from the faucet (at most 1,000 per request)."""
    while quantity > 0:
        chunk = min(quantity, 1_000 * U)
        assert settle(actions.request_faucet(wallet=who, quantity=str(chunk))).status == Flow.COMPLETED
        quantity -= chunk


def deposit(who: str, quantity: int, mode: str = "deposit") -> Flow:
    return settle(actions.request_deposit(wallet=who, quantity=str(quantity), mode=mode))


def redeem(who: str, quantity: int, mode: str = "deposit") -> Flow:
    return settle(actions.request_redemption(wallet=who, quantity=str(quantity), mode=mode))


def operator_send(process: Process | str, tags: dict) -> Message:
    """A configuration message from the operator (the processes' owner), delivered."""
    target = process if isinstance(process, str) else process.id
    msg = send_message(sender=operator_address(), target=target, tags=tags)
    run_until_idle()
    msg.refresh_from_db()
    assert msg.status == Message.APPLIED, msg.error
    return msg


def configure(config_type: str, value: int | str) -> None:
    sent = actions.configure_coordinator(config_type=config_type, value=str(value))
    run_until_idle()
    for msg in sent:
        msg.refresh_from_db()
        assert msg.status == Message.APPLIED, msg.error


def set_process(kind: str, process_id: str, coordinator: str = "coordinator") -> None:
    operator_send(Process.objects.get(name=coordinator), {
        "Action": "SetProcessConfig", "Process-Type": kind, "Process-Id": process_id})


def drain(*process_names: str) -> None:
    """Deliver only to these processes until none of them has anything pending."""
    ids = set(Process.objects.filter(name__in=process_names).values_list("id", flat=True))
    while targets := [t for t in processes_with_pending() if t in ids]:
        for target in targets:
            drain_mailbox(process_id=target)


def operation(flow: Flow) -> Operation:
    return Operation.objects.get(flow_id=flow.id)


def user_message(flow: Flow) -> Message:
    """The coordinator's last word to the user (Deposit-Complete, Redeem-Refunded, ...)."""
    return [m for m in Message.objects.filter(target=flow.user).order_by("seq")
            if m.get("Flow-Status") and m.get("Operation-Id") == operation(flow).op_id][-1]


def assert_operation_id_on_every_hop(flow: Flow) -> Operation:
    """From the message that opened the operation on, every hop between two processes
    carries its id as X-Operation-Id, and the user's final message names it."""
    op = operation(flow)
    process_ids = set(names())
    msgs = flow_messages(flow)
    opened = [i for i, m in enumerate(msgs) if m.msg_id == op.request_id]
    assert opened, "the operation was not opened by a message of this flow"
    between = 0
    for m in msgs[opened[0] + 1:]:
        if m.sender in process_ids and m.target in process_ids:
            assert m.get("X-Operation-Id") == op.op_id, (m.action, m.tags)
            between += 1
        elif m.get("X-Operation-Id") is not None:  # a notice to the user forwarded from a hop
            assert m.get("X-Operation-Id") == op.op_id, (m.action, m.tags)
    assert between >= 2
    final = user_message(flow)
    assert final.get("Operation-Id") == op.op_id
    assert final.get("Flow-Status") == flow.status
    return op


def debit_then_credit(flow: Flow, payer: str) -> None:
    """One Transfer handler sends Debit-Notice then Credit-Notice: they arrive in that order."""
    msgs = flow_messages(flow)
    n = names()
    for i, m in enumerate(msgs):
        if m.action == "Debit-Notice" and n.get(m.target, "user") == payer:
            assert msgs[i + 1].action == "Credit-Notice"
            assert msgs[i + 1].parent_id == m.parent_id  # both from the same Transfer
            assert m.seq < msgs[i + 1].seq
            assert m.msg_id != msgs[i + 1].msg_id
            return
    raise AssertionError(f"no Debit-Notice to {payer} in {hops(flow)}")


# Hop sequences -------------------------------------------------------------------------

def deposit_start(coordinator: str = "coordinator") -> list[tuple[str, str, str]]:
    return [("Transfer", "user", "usda"), ("Debit-Notice", "usda", "user"),
            ("Credit-Notice", "usda", coordinator)]


def deposit_hops(coordinator: str = "coordinator") -> list[tuple[str, str, str]]:
    return deposit_start(coordinator) + [
        ("Mint", coordinator, "tim3"), ("Mint-Response", "tim3", coordinator),
        ("UpdatePosition", coordinator, "state-manager"), ("UpdatePosition-Response", "state-manager", coordinator),
        ("Deposit-Complete", coordinator, "user"),
    ]


def refund_hops(coordinator: str = "coordinator") -> list[tuple[str, str, str]]:
    return [("Transfer", coordinator, "usda"), ("Debit-Notice", "usda", coordinator),
            ("Credit-Notice", "usda", "user"), ("Deposit-Refunded", coordinator, "user")]


def redeem_hops(coordinator: str = "coordinator") -> list[tuple[str, str, str]]:
    return [
        ("RedeemTIM3", "user", coordinator), ("Burn", coordinator, "tim3"), ("Burn-Response", "tim3", coordinator),
        ("Transfer", coordinator, "usda"), ("Debit-Notice", "usda", coordinator), ("Credit-Notice", "usda", "user"),
        ("UpdatePosition", coordinator, "state-manager"), ("UpdatePosition-Response", "state-manager", coordinator),
        ("Redeem-Complete", coordinator, "user"),
    ]


LOCK_MINT_HOPS = [
    ("MintTIM3", "user", "coordinator"), ("LockCollateral", "coordinator", "lock-manager"),
    ("Lock", "lock-manager", "usda"), ("Lock-Response", "usda", "lock-manager"),
    ("LockCollateral-Success", "lock-manager", "coordinator"),
    ("Mint", "coordinator", "tim3"), ("Mint-Response", "tim3", "coordinator"),
    ("UpdatePosition", "coordinator", "state-manager"), ("UpdatePosition-Response", "state-manager", "coordinator"),
    ("MintTIM3-Response", "coordinator", "user"),
]

BURN_HOPS = [
    ("BurnTIM3", "user", "coordinator"), ("Burn", "coordinator", "tim3"), ("Burn-Response", "tim3", "coordinator"),
    ("UnlockCollateral", "coordinator", "lock-manager"), ("Unlock", "lock-manager", "usda"),
    ("Unlock-Response", "usda", "lock-manager"), ("UnlockCollateral-Success", "lock-manager", "coordinator"),
    ("UpdatePosition", "coordinator", "state-manager"), ("UpdatePosition-Response", "state-manager", "coordinator"),
    ("BurnTIM3-Response", "coordinator", "user"),
]


# --- 1. the four flows, hop by hop ------------------------------------------------------


def test_v2_deposit_hops_balances_position_and_reserves(system, wallet):
    user = wallet()
    fund(user, 500 * U)
    flow = deposit(user, 120 * U)

    assert (flow.status, flow.error, flow.kind, flow.mode) == (Flow.COMPLETED, "", "deposit", "deposit")
    assert hops(flow) == deposit_hops()
    assert all(m.status == Message.APPLIED for m in flow_messages(flow))
    debit_then_credit(flow, payer="user")
    op = assert_operation_id_on_every_hop(flow)
    # The operation is opened by the Credit-Notice: its id is that message's id.
    credit_notice = flow_messages(flow)[2]
    assert op.op_id == credit_notice.msg_id and op.status == Operation.COMPLETED and op.kind == Operation.DEPOSIT

    assert balances(user) == {"USDA": 380 * U, "TIM3": 120 * U, "locked": 0}
    assert positions(user) == {"USDA-custody": (120 * U, 120 * U)}
    assert supply() == 120 * U
    assert reserves() == {"tim3_supply": 120 * U, "usda_held": 120 * U, "usda_locked": 0,
                          "pending_operations": 0, "pending_messages": 0}
    assert books() == {"custody": 120 * U, "collateral": 0, "outstanding": 120 * U, "payouts_committed": 0}
    assert_consistent()


def test_v2_redeem_hops_balances_position_and_reserves(system, wallet):
    user = wallet()
    fund(user, 500 * U)
    assert deposit(user, 200 * U).status == Flow.COMPLETED
    flow = redeem(user, 75 * U)

    assert (flow.status, flow.error, flow.kind, flow.mode) == (Flow.COMPLETED, "", "redeem", "deposit")
    assert hops(flow) == redeem_hops()
    assert all(m.status == Message.APPLIED for m in flow_messages(flow))
    debit_then_credit(flow, payer="coordinator")
    op = assert_operation_id_on_every_hop(flow)
    assert op.op_id == flow.id  # the user's RedeemTIM3 opens it
    assert balances(user) == {"USDA": 375 * U, "TIM3": 125 * U, "locked": 0}
    assert positions(user) == {"USDA-custody": (125 * U, 125 * U)}
    assert supply() == 125 * U
    assert reserves()["usda_held"] == 125 * U and reserves()["usda_locked"] == 0
    assert books() == {"custody": 125 * U, "collateral": 0, "outstanding": 125 * U, "payouts_committed": 0}
    assert_consistent()


def test_v1_lock_mint_hops_balances_position_and_reserves(system, wallet):
    user = wallet()
    fund(user, 500 * U)
    flow = deposit(user, 150 * U, mode="lock")

    assert (flow.status, flow.error, flow.mode) == (Flow.COMPLETED, "", "lock")
    assert hops(flow) == LOCK_MINT_HOPS
    assert all(m.status == Message.APPLIED for m in flow_messages(flow))
    op = assert_operation_id_on_every_hop(flow)
    assert op.op_id == flow.id and op.kind == Operation.LOCK_MINT
    # The USDA stays in the user's account, locked.
    assert balances(user) == {"USDA": 500 * U, "TIM3": 150 * U, "locked": 150 * U}
    assert positions(user) == {"USDA-locked": (150 * U, 150 * U)}
    assert CollateralLock.objects.get(user=user).locked == 150 * U
    assert supply() == 150 * U
    assert reserves()["usda_held"] == 0 and reserves()["usda_locked"] == 150 * U
    assert books() == {"custody": 0, "collateral": 150 * U, "outstanding": 150 * U, "payouts_committed": 0}
    assert_consistent()


def test_v1_burn_hops_balances_position_and_reserves(system, wallet):
    user = wallet()
    fund(user, 500 * U)
    assert deposit(user, 150 * U, mode="lock").status == Flow.COMPLETED
    flow = redeem(user, 60 * U, mode="lock")

    assert (flow.status, flow.error, flow.mode) == (Flow.COMPLETED, "", "lock")
    assert hops(flow) == BURN_HOPS
    assert all(m.status == Message.APPLIED for m in flow_messages(flow))
    assert_operation_id_on_every_hop(flow)
    assert balances(user) == {"USDA": 500 * U, "TIM3": 90 * U, "locked": 90 * U}
    assert positions(user) == {"USDA-locked": (90 * U, 90 * U)}
    assert CollateralLock.objects.get(user=user).locked == 90 * U
    assert CoordinatorPosition.objects.get(user=user).locked == 90 * U
    assert supply() == 90 * U
    assert reserves()["usda_locked"] == 90 * U
    assert books() == {"custody": 0, "collateral": 90 * U, "outstanding": 90 * U, "payouts_committed": 0}
    assert_consistent()


# --- 2. failure paths ------------------------------------------------------------------------


def test_deposit_while_mint_is_paused_by_the_operator_is_refunded_and_redeem_still_works(system, operator, wallet):
    user = wallet()
    fund(user, 500 * U)
    assert deposit(user, 200 * U).status == Flow.COMPLETED
    pauses = actions.request_pause(wallet=operator, scope="mint", reason="audit in progress", role="admin")
    assert [settle(f).status for f in pauses] == [Flow.COMPLETED]
    c = coordinator_state()
    assert (c.paused_mint, c.paused_redeem, c.pause_reason, c.paused_by) == (True, False, "audit in progress", operator)
    assert actions.pause_state()["mint"] is True

    flow = deposit(user, 100 * U)
    assert flow.status == Flow.REFUNDED
    assert flow.error == "Minting is paused: audit in progress"
    assert hops(flow) == deposit_start() + refund_hops()
    assert user_message(flow).get("Reason") == "Minting is paused: audit in progress"
    assert_operation_id_on_every_hop(flow)
    assert balances(user) == {"USDA": 300 * U, "TIM3": 200 * U, "locked": 0}

    # v1 lock mint is refused up front: nothing is locked.
    lock = deposit(user, 50 * U, mode="lock")
    assert lock.status == Flow.FAILED and lock.error == "Minting is paused: audit in progress"
    assert hops(lock) == [("MintTIM3", "user", "coordinator"), ("MintTIM3-Error", "coordinator", "user")]

    # Users can still redeem while minting is paused.
    out = redeem(user, 50 * U)
    assert out.status == Flow.COMPLETED
    assert balances(user) == {"USDA": 350 * U, "TIM3": 150 * U, "locked": 0}
    assert positions(user) == {"USDA-custody": (150 * U, 150 * U)}
    assert supply() == 150 * U
    assert_consistent()

    assert [settle(f).status for f in actions.request_resume(wallet=operator, scope="mint")] == [Flow.COMPLETED]
    assert deposit(user, 100 * U).status == Flow.COMPLETED
    assert balances(user)["TIM3"] == 250 * U
    assert_consistent()


def test_a_guardian_pauses_minting_but_only_an_admin_resumes(system, wallet):
    user, guardian, stranger = wallet(), wallet(), wallet()
    fund(user, 300 * U)
    coordinator = system["coordinator"]

    refused = send_message(sender=stranger, target=coordinator.id, tags={
        "Action": "EmergencyPause", "Scope": "mint", "Reason": "prank"})
    run_until_idle()
    refused.refresh_from_db()
    assert (refused.status, refused.error) == (Message.FAILED, "Only a guardian or an admin may EmergencyPause.")
    assert coordinator_state().paused_mint is False

    [pause] = actions.request_pause(wallet=guardian, scope="mint", reason="suspicious mint volume", role="guardian")
    assert settle(pause).status == Flow.COMPLETED
    c = coordinator_state()
    assert (c.paused_mint, c.pause_reason, c.paused_by) == (True, "suspicious mint volume", guardian)

    flow = deposit(user, 100 * U)
    assert (flow.status, flow.error) == (Flow.REFUNDED, "Minting is paused: suspicious mint volume")
    assert balances(user) == {"USDA": 300 * U, "TIM3": 0, "locked": 0}

    resume = send_message(sender=guardian, target=coordinator.id, tags={"Action": "Resume", "Scope": "mint"})
    run_until_idle()
    resume.refresh_from_db()
    assert (resume.status, resume.error) == (Message.FAILED, "Only an admin may Resume.")
    assert coordinator_state().paused_mint is True

    admin = wallet()
    assert [settle(f).status for f in actions.request_resume(wallet=admin, scope="mint")] == [Flow.COMPLETED]
    c = coordinator_state()
    assert (c.paused_mint, c.pause_reason, c.paused_by) == (False, "", "")
    assert deposit(user, 100 * U).status == Flow.COMPLETED
    assert_consistent()


def test_redeem_while_redemption_is_paused_fails_and_moves_nothing(system, operator, wallet):
    user = wallet()
    fund(user, 300 * U)
    assert deposit(user, 100 * U).status == Flow.COMPLETED
    assert deposit(user, 50 * U, mode="lock").status == Flow.COMPLETED
    for f in actions.request_pause(wallet=operator, scope="redeem", reason="bank holiday", role="admin"):
        assert settle(f).status == Flow.COMPLETED
    before = (balances(user), positions(user), supply(), books())

    flow = redeem(user, 40 * U)
    assert (flow.status, flow.error) == (Flow.FAILED, "Redemption is paused: bank holiday")
    assert hops(flow) == [("RedeemTIM3", "user", "coordinator"), ("RedeemTIM3-Error", "coordinator", "user")]
    burn = redeem(user, 40 * U, mode="lock")
    assert (burn.status, burn.error) == (Flow.FAILED, "Redemption is paused: bank holiday")
    assert hops(burn) == [("BurnTIM3", "user", "coordinator"), ("BurnTIM3-Error", "coordinator", "user")]
    assert (balances(user), positions(user), supply(), books()) == before
    assert not Operation.objects.filter(kind__in=[Operation.REDEEM, Operation.BURN]).exists()

    # Minting is not paused by a redeem-only pause.
    assert deposit(user, 10 * U).status == Flow.COMPLETED
    assert_consistent()


def test_deposit_below_the_minimum_is_refunded(system, wallet):
    user = wallet()
    fund(user, 10 * U)
    flow = deposit(user, U // 2)  # 0.5 TIM3
    assert (flow.status, flow.error) == (Flow.REFUNDED, "Amount is below the minimum of 1 TIM3.")
    assert hops(flow) == deposit_start() + refund_hops()
    assert balances(user) == {"USDA": 10 * U, "TIM3": 0, "locked": 0}
    assert supply() == 0 and positions(user) == {}
    lock = deposit(user, U // 2, mode="lock")
    assert (lock.status, lock.error) == (Flow.FAILED, "Amount is below the minimum of 1 TIM3.")
    assert balances(user)["locked"] == 0
    assert_consistent()


def test_deposit_above_the_configured_maximum_is_refunded(system, wallet):
    user = wallet()
    fund(user, 500 * U)
    configure("MaxAmount", 100 * U)
    flow = deposit(user, 150 * U)
    assert (flow.status, flow.error) == (Flow.REFUNDED, "Amount is above the maximum of 100 TIM3 per operation.")
    assert balances(user) == {"USDA": 500 * U, "TIM3": 0, "locked": 0}
    assert deposit(user, 100 * U).status == Flow.COMPLETED
    assert balances(user) == {"USDA": 400 * U, "TIM3": 100 * U, "locked": 0}
    assert_consistent()


def test_per_user_daily_limit(system, wallet):
    alice, bob = wallet(), wallet()
    fund(alice, 500 * U)
    fund(bob, 500 * U)
    configure("UserDailyLimit", 300 * U)
    assert deposit(alice, 200 * U).status == Flow.COMPLETED
    over = deposit(alice, 200 * U)
    assert over.status == Flow.REFUNDED
    assert over.error.startswith("Daily limit: 200 of 300 TIM3 already used")
    assert deposit(alice, 100 * U).status == Flow.COMPLETED  # exactly up to the limit
    assert deposit(bob, 200 * U).status == Flow.COMPLETED  # the limit is per user
    # v1 lock mints count against the same limit
    lock = deposit(alice, 1 * U, mode="lock")
    assert lock.status == Flow.FAILED and lock.error.startswith("Daily limit: 300 of 300")
    assert balances(alice) == {"USDA": 200 * U, "TIM3": 300 * U, "locked": 0}
    assert_consistent()


def test_system_hourly_limit(system, wallet):
    alice, bob = wallet(), wallet()
    fund(alice, 500 * U)
    fund(bob, 500 * U)
    configure("SystemHourlyLimit", 300 * U)
    assert deposit(alice, 200 * U).status == Flow.COMPLETED
    over = deposit(bob, 200 * U)
    assert (over.status, over.error) == (
        Flow.REFUNDED, "System limit: the system mints at most 300 TIM3 per hour; try later.")
    assert balances(bob) == {"USDA": 500 * U, "TIM3": 0, "locked": 0}
    assert deposit(bob, 100 * U).status == Flow.COMPLETED
    assert supply() == 300 * U
    assert_consistent()


def test_system_hourly_limit_is_a_rolling_hour(system, wallet, monkeypatch):
    """The window slides: mints older than an hour stop counting, failed mints are released."""
    alice, bob = wallet(), wallet()
    fund(alice, 500 * U)
    fund(bob, 1_000 * U)
    configure("SystemHourlyLimit", 300 * U)
    assert deposit(alice, 200 * U).status == Flow.COMPLETED
    assert deposit(bob, 101 * U).status == Flow.REFUNDED  # 200 + 101 > 300 within the hour
    assert deposit(bob, 100 * U).status == Flow.COMPLETED  # the refused one was released

    from processes.runtime import delivery

    real_now = delivery.now_ms
    monkeypatch.setattr(delivery, "now_ms", lambda: real_now() + 60 * 60_000 + 1_000)  # 1 h later
    assert deposit(bob, 300 * U).status == Flow.COMPLETED  # the first 300 fell out of the window
    over = deposit(bob, 1 * U)
    assert (over.status, over.error) == (
        Flow.REFUNDED, "System limit: the system mints at most 300 TIM3 per hour; try later.")
    assert coordinator_state().hour_window_minted == 300 * U
    assert_consistent()  # includes check_mint_windows: the kept window equals the operations' sum


def test_mint_window_migration_starts_the_window_where_replaying_the_log_leaves_it(system, wallet):
    """Migration 0003 fills in the window of a coordinator with history. `manage.py verify`
    replays the log with the new code, which slides the window at every mint request that
    gets as far as the hourly check: the migrated state must be that one, or verify fails
    until the coordinator's next such request (forever for a retired coordinator version)."""
    import importlib

    from django.apps import apps

    alice = wallet()
    fund(alice, 1_000 * U)
    assert deposit(alice, 100 * U).status == Flow.COMPLETED
    assert deposit(alice, 100 * U, mode="lock").status == Flow.COMPLETED  # the last request to slide it
    configure("MaxAmount", 50 * U)
    refused = deposit(alice, 60 * U)  # refused before the hourly check: it does not slide the window
    assert refused.status == Flow.REFUNDED and refused.error.startswith("Amount is above")
    migrated = coordinator_state()
    CoordinatorState.objects.filter(pk=migrated.pk).update(hour_window_since=0, hour_window_minted=0)  # before 0003
    importlib.import_module("processes.migrations.0003_mint_window").start_windows(apps, None)
    assert coordinator_state().hour_window_since == migrated.hour_window_since
    assert coordinator_state().hour_window_minted == 200 * U
    assert_consistent()  # invariants, and the log replays to the migrated state


def test_large_operation_cooldown(system, wallet):
    alice, bob = wallet(), wallet()
    fund(alice, 4_000 * U)  # four faucet requests
    fund(bob, 1_000 * U)
    assert deposit(alice, 1_000 * U).status == Flow.COMPLETED
    second = deposit(alice, 1_000 * U)  # within 300 s of the first
    assert (second.status, second.error) == (Flow.REFUNDED, "Cooldown: one large operation per 300 seconds.")
    assert balances(alice) == {"USDA": 3_000 * U, "TIM3": 1_000 * U, "locked": 0}
    assert deposit(alice, 999 * U).status == Flow.COMPLETED  # below the threshold: no cooldown
    lock = deposit(alice, 1_000 * U, mode="lock")  # every mint path has the breaker
    assert (lock.status, lock.error) == (Flow.FAILED, "Cooldown: one large operation per 300 seconds.")
    assert balances(alice)["locked"] == 0
    assert deposit(bob, 1_000 * U).status == Flow.COMPLETED  # the cooldown is per user
    assert_consistent()


def test_rate_limit_per_wallet(system, wallet):
    user = wallet()
    fund(user, 100 * U)
    configure("RateLimitPerMinute", 2)
    assert deposit(user, 10 * U).status == Flow.COMPLETED
    assert deposit(user, 10 * U).status == Flow.COMPLETED
    third = deposit(user, 10 * U)
    assert (third.status, third.error) == (Flow.REFUNDED, "Too many requests: at most 2 per minute per wallet.")
    out = redeem(user, 5 * U)  # redemptions are fund-moving requests too
    assert (out.status, out.error) == (Flow.FAILED, "Too many requests: at most 2 per minute per wallet.")
    assert balances(user) == {"USDA": 80 * U, "TIM3": 20 * U, "locked": 0}
    assert_consistent()


def test_deposit_more_usda_than_held_fails_at_usda(system, wallet):
    user = wallet()
    fund(user, 100 * U)
    flow = deposit(user, 150 * U)
    assert flow.status == Flow.FAILED
    assert flow.error == "Insufficient balance: 100 available, 150 needed."
    assert hops(flow) == [("Transfer", "user", "usda"), ("Transfer-Error", "usda", "user")]
    assert balances(user) == {"USDA": 100 * U, "TIM3": 0, "locked": 0}
    assert not Operation.objects.exists()
    assert_consistent()


def test_redeem_more_tim3_than_held_fails_at_burn_and_releases_the_payout(system, wallet):
    alice, bob = wallet(), wallet()
    fund(alice, 200 * U)
    fund(bob, 200 * U)
    assert deposit(alice, 100 * U).status == Flow.COMPLETED
    assert deposit(bob, 50 * U).status == Flow.COMPLETED
    flow = redeem(bob, 80 * U)  # the coordinator could pay 80, but bob holds 50 TIM3
    assert flow.status == Flow.FAILED
    assert flow.error == "Insufficient balance: 50 available, 80 needed."
    assert hops(flow) == [("RedeemTIM3", "user", "coordinator"), ("Burn", "coordinator", "tim3"),
                          ("Burn-Error", "tim3", "coordinator"), ("Redeem-Failed", "coordinator", "user")]
    assert_operation_id_on_every_hop(flow)
    assert balances(bob) == {"USDA": 150 * U, "TIM3": 50 * U, "locked": 0}
    assert books() == {"custody": 150 * U, "collateral": 0, "outstanding": 150 * U, "payouts_committed": 0}
    # More than the coordinator can pay out is refused before anything moves.
    too_much = redeem(alice, 151 * U)
    assert (too_much.status, too_much.error) == (
        Flow.FAILED, "This coordinator can pay out at most 150 USDA right now.")
    assert redeem(bob, 50 * U).status == Flow.COMPLETED
    assert_consistent()


def test_v1_burn_beyond_the_locked_position_or_the_real_balance_fails(system, wallet):
    alice, bob = wallet(), wallet()
    fund(alice, 200 * U)
    assert deposit(alice, 100 * U, mode="lock").status == Flow.COMPLETED
    beyond = redeem(alice, 101 * U, mode="lock")
    assert (beyond.status, beyond.error) == (
        Flow.FAILED, "Only 100 TIM3 of yours is backed by collateral locked through this coordinator.")
    # Alice gives her TIM3 away: her position still says 100, but the burn checks the real balance.
    give = send_message(sender=alice, target=system["tim3"].id, tags={
        "Action": "Transfer", "Recipient": bob, "Quantity": str(70 * U)})
    run_until_idle()
    give.refresh_from_db()
    assert give.status == Message.APPLIED
    flow = redeem(alice, 50 * U, mode="lock")
    assert (flow.status, flow.error) == (Flow.FAILED, "Insufficient balance: 30 available, 50 needed.")
    assert hops(flow) == [("BurnTIM3", "user", "coordinator"), ("Burn", "coordinator", "tim3"),
                          ("Burn-Error", "tim3", "coordinator"), ("BurnTIM3-Failed", "coordinator", "user")]
    assert CoordinatorPosition.objects.get(user=alice).committed == 0  # released
    assert balances(alice) == {"USDA": 200 * U, "TIM3": 30 * U, "locked": 100 * U}
    assert redeem(alice, 30 * U, mode="lock").status == Flow.COMPLETED
    assert balances(alice) == {"USDA": 200 * U, "TIM3": 0, "locked": 70 * U}
    assert_consistent()


def test_limits_are_released_when_a_deposit_fails(system, operator, wallet):
    """A refunded deposit does not count against the daily limit, whether it was
    refused up front (paused) or accepted, reserved, and then failed (Mint-Error)."""
    user = wallet()
    fund(user, 500 * U)
    configure("UserDailyLimit", 300 * U)
    tim3, coordinator = system["tim3"], system["coordinator"]

    for f in actions.request_pause(wallet=operator, scope="mint", reason="maintenance", role="admin"):
        settle(f)
    assert deposit(user, 300 * U).status == Flow.REFUNDED
    for f in actions.request_resume(wallet=operator, scope="mint"):
        settle(f)

    operator_send(tim3, {"Action": "RemoveMinter", "Minter": coordinator.id})
    failed = deposit(user, 300 * U)
    assert failed.status == Flow.REFUNDED and failed.error.startswith("Mint failed:")
    assert operation(failed).reserved is False
    lock = deposit(user, 300 * U, mode="lock")
    assert lock.status == Flow.REFUNDED and operation(lock).reserved is False
    operator_send(tim3, {"Action": "AddMinter", "Minter": coordinator.id})

    assert deposit(user, 300 * U).status == Flow.COMPLETED  # the whole limit is still there
    over = deposit(user, 1 * U)
    assert over.status == Flow.REFUNDED and over.error.startswith("Daily limit: 300 of 300")
    assert balances(user) == {"USDA": 200 * U, "TIM3": 300 * U, "locked": 0}
    assert_consistent()


def test_mint_error_refunds_the_deposit_and_unlocks_the_lock_mint(system, wallet):
    user = wallet()
    fund(user, 500 * U)
    tim3, coordinator = system["tim3"], system["coordinator"]
    # The operator takes the coordinator's minting right away: TIM3 answers Mint-Error.
    operator_send(tim3, {"Action": "RemoveMinter", "Minter": coordinator.id})

    flow = deposit(user, 100 * U)
    assert flow.status == Flow.REFUNDED
    assert flow.error == "Mint failed: Only an authorized minter may Mint."
    assert hops(flow) == deposit_start() + [
        ("Mint", "coordinator", "tim3"), ("Mint-Error", "tim3", "coordinator")] + refund_hops()
    assert_operation_id_on_every_hop(flow)
    assert balances(user) == {"USDA": 500 * U, "TIM3": 0, "locked": 0}

    lock = deposit(user, 100 * U, mode="lock")
    assert lock.status == Flow.REFUNDED
    assert lock.error == "Only an authorized minter may Mint."
    assert hops(lock) == LOCK_MINT_HOPS[:5] + [
        ("Mint", "coordinator", "tim3"), ("Mint-Error", "tim3", "coordinator"),
        ("UnlockCollateral", "coordinator", "lock-manager"), ("Unlock", "lock-manager", "usda"),
        ("Unlock-Response", "usda", "lock-manager"), ("UnlockCollateral-Success", "lock-manager", "coordinator"),
        ("MintTIM3-Refunded", "coordinator", "user")]
    assert_operation_id_on_every_hop(lock)
    assert balances(user) == {"USDA": 500 * U, "TIM3": 0, "locked": 0}
    assert CollateralLock.objects.get(user=user).locked == 0
    assert supply() == 0 and positions(user) == {}
    assert books() == {"custody": 0, "collateral": 0, "outstanding": 0, "payouts_committed": 0}
    assert_consistent()

    operator_send(tim3, {"Action": "AddMinter", "Minter": coordinator.id})
    assert deposit(user, 100 * U).status == Flow.COMPLETED
    assert_consistent()


def test_usda_lock_failure_fails_the_lock_mint_and_locks_nothing(system, wallet):
    user = wallet()
    fund(user, 100 * U)
    flow = deposit(user, 150 * U, mode="lock")
    assert flow.status == Flow.FAILED
    assert flow.error == "Insufficient unlocked balance: 100 available to lock."
    assert hops(flow) == [
        ("MintTIM3", "user", "coordinator"), ("LockCollateral", "coordinator", "lock-manager"),
        ("Lock", "lock-manager", "usda"), ("Lock-Error", "usda", "lock-manager"),
        ("LockCollateral-Error", "lock-manager", "coordinator"), ("MintTIM3-Failed", "coordinator", "user")]
    assert_operation_id_on_every_hop(flow)
    assert operation(flow).reserved is False
    assert balances(user) == {"USDA": 100 * U, "TIM3": 0, "locked": 0}
    assert not CollateralLock.objects.filter(user=user, locked__gt=0).exists()
    assert books()["collateral"] == 0 and supply() == 0
    assert deposit(user, 100 * U, mode="lock").status == Flow.COMPLETED
    assert_consistent()


def test_failed_payout_remints_the_burned_tim3(system, wallet):
    """A payout Transfer that fails after the burn: the TIM3 is minted back.

    The coordinator's books make a real USDA payout failure impossible (custody
    is always held), so the failure is made the way an operator could cause it:
    between the burn and the payout the operator points the coordinator's
    `usda` at a freshly spawned, empty token. The payout Transfer goes there,
    fails for lack of balance (Transfer-Error, accepted because it comes from
    the configured USDA process), and the coordinator re-mints the burned TIM3.
    Delivery is by hand so the reconfiguration lands between the two steps.
    """
    user = wallet()
    fund(user, 300 * U)
    assert deposit(user, 200 * U).status == Flow.COMPLETED
    usda = system["usda"]
    empty = spawn_process(name="usda-b", kind="token", owner=operator_address(),
                          tags={"Token-Name": "USD Beta", "Ticker": "USDB", "Mint-Policy": "owner"})
    run_until_idle()

    flow = actions.request_redemption(wallet=user, quantity=str(80 * U))
    drain("coordinator")  # RedeemTIM3 applied: the Burn waits in tim3's mailbox
    assert operation(flow).step == "burning"
    # Sent while the Burn is still pending, so it reaches the coordinator's mailbox
    # before the Burn-Response can: the coordinator applies its messages in arrival order.
    switch = send_message(sender=operator_address(), target=system["coordinator"].id, tags={
        "Action": "SetProcessConfig", "Process-Type": "usda", "Process-Id": empty.id})
    assert Message.objects.get(pushed_for=flow.id, action="Burn").status == Message.PENDING
    drain("tim3", "coordinator")
    switch.refresh_from_db()
    assert switch.status == Message.APPLIED
    run_until_idle()
    flow.refresh_from_db()

    assert flow.status == Flow.REFUNDED
    assert flow.error == "Insufficient balance: 0 available, 80 needed."
    assert hops(flow) == [
        ("RedeemTIM3", "user", "coordinator"), ("Burn", "coordinator", "tim3"), ("Burn-Response", "tim3", "coordinator"),
        ("Transfer", "coordinator", "usda-b"), ("Transfer-Error", "usda-b", "coordinator"),
        ("Mint", "coordinator", "tim3"), ("Mint-Response", "tim3", "coordinator"),
        ("Redeem-Refunded", "coordinator", "user")]
    assert_operation_id_on_every_hop(flow)
    remint = Message.objects.get(pushed_for=flow.id, action="Mint")
    assert remint.get("X-Mint-Kind") == "remint"
    assert balances(user) == {"USDA": 100 * U, "TIM3": 200 * U, "locked": 0}  # TIM3 restored
    assert supply() == 200 * U
    assert positions(user) == {"USDA-custody": (200 * U, 200 * U)}
    assert books() == {"custody": 200 * U, "collateral": 0, "outstanding": 200 * U, "payouts_committed": 0}
    assert TokenOperation.objects.filter(process__name="tim3", account=user, kind="burn").count() == 1
    assert_consistent()

    set_process("usda", usda.id)
    assert redeem(user, 80 * U).status == Flow.COMPLETED
    assert balances(user) == {"USDA": 180 * U, "TIM3": 120 * U, "locked": 0}
    assert_consistent()


def test_failed_unlock_in_v1_burn_remints(system, wallet):
    """The v1 twin of the failed payout: after the burn, the coordinator is pointed
    at a fresh Lock Manager that does not know it, so UnlockCollateral fails and the
    burned TIM3 is minted back; the collateral stays locked for the user."""
    user = wallet()
    fund(user, 300 * U)
    assert deposit(user, 100 * U, mode="lock").status == Flow.COMPLETED
    lock_manager = system["lock-manager"]
    stranger = spawn_process(name="lock-manager-b", kind="lock-manager", owner=operator_address())
    run_until_idle()

    flow = actions.request_redemption(wallet=user, quantity=str(40 * U), mode="lock")
    drain("coordinator")
    assert operation(flow).step == "burning"
    send_message(sender=operator_address(), target=system["coordinator"].id, tags={
        "Action": "SetProcessConfig", "Process-Type": "lock-manager", "Process-Id": stranger.id})
    assert Message.objects.get(pushed_for=flow.id, action="Burn").status == Message.PENDING
    run_until_idle()
    flow.refresh_from_db()

    assert flow.status == Flow.REFUNDED
    assert flow.error == "Only a coordinator may UnlockCollateral."
    assert hops(flow) == [
        ("BurnTIM3", "user", "coordinator"), ("Burn", "coordinator", "tim3"), ("Burn-Response", "tim3", "coordinator"),
        ("UnlockCollateral", "coordinator", "lock-manager-b"),
        ("UnlockCollateral-Error", "lock-manager-b", "coordinator"),
        ("Mint", "coordinator", "tim3"), ("Mint-Response", "tim3", "coordinator"),
        ("BurnTIM3-Refunded", "coordinator", "user")]
    assert_operation_id_on_every_hop(flow)
    assert balances(user) == {"USDA": 300 * U, "TIM3": 100 * U, "locked": 100 * U}
    assert positions(user) == {"USDA-locked": (100 * U, 100 * U)}
    row = CoordinatorPosition.objects.get(user=user)
    assert (row.locked, row.committed) == (100 * U, 0)
    assert books() == {"custody": 0, "collateral": 100 * U, "outstanding": 100 * U, "payouts_committed": 0}
    assert_consistent()

    set_process("lock-manager", lock_manager.id)
    assert redeem(user, 40 * U, mode="lock").status == Flow.COMPLETED
    assert balances(user) == {"USDA": 300 * U, "TIM3": 60 * U, "locked": 60 * U}
    assert_consistent()


def test_failed_position_record_completes_and_still_counts_against_the_limit(system, wallet):
    """UpdatePosition fails after the mint: the deposit is complete (the money moved)
    and says so, and the minted TIM3 keeps counting against the daily limit."""
    user = wallet()
    fund(user, 300 * U)
    configure("UserDailyLimit", 150 * U)
    state_manager = system["state-manager"]
    unknown = spawn_process(name="state-manager-b", kind="state-manager", owner=operator_address())
    run_until_idle()
    set_process("state-manager", unknown.id)

    flow = deposit(user, 100 * U)
    assert (flow.status, flow.error) == (
        Flow.COMPLETED, "Position not recorded: Only a coordinator may UpdatePosition.")
    assert hops(flow) == deposit_hops()[:5] + [
        ("UpdatePosition", "coordinator", "state-manager-b"), ("UpdatePosition-Error", "state-manager-b", "coordinator"),
        ("Deposit-Complete", "coordinator", "user")]
    assert operation(flow).reserved is True
    assert balances(user) == {"USDA": 200 * U, "TIM3": 100 * U, "locked": 0}
    assert positions(user) == {}

    set_process("state-manager", state_manager.id)
    over = deposit(user, 100 * U)
    assert over.status == Flow.REFUNDED and over.error.startswith("Daily limit: 100 of 150")
    assert balances(user) == {"USDA": 200 * U, "TIM3": 100 * U, "locked": 0}
    assert_consistent()


def test_a_refund_that_fails_is_left_booked_for_an_operator(system, wallet):
    """Mint-Error, then the refund Transfer fails too (the operator pointed `usda` at
    an empty token in between): the operation is stuck, the USDA stays in custody
    and booked, and CleanupExpired leaves it (and its error) alone."""
    user = wallet()
    fund(user, 300 * U)
    usda, tim3, coordinator = system["usda"], system["tim3"], system["coordinator"]
    empty = spawn_process(name="usda-b", kind="token", owner=operator_address(),
                          tags={"Token-Name": "USD Beta", "Ticker": "USDB", "Mint-Policy": "owner"})
    run_until_idle()
    operator_send(tim3, {"Action": "RemoveMinter", "Minter": coordinator.id})

    flow = actions.request_deposit(wallet=user, quantity=str(100 * U))
    drain("usda", "coordinator")  # the Mint waits in tim3's mailbox
    send_message(sender=operator_address(), target=coordinator.id, tags={
        "Action": "SetProcessConfig", "Process-Type": "usda", "Process-Id": empty.id})
    run_until_idle()
    flow.refresh_from_db()
    op = operation(flow)
    assert flow.status == Flow.PENDING
    assert (op.status, op.step, op.error) == (
        Operation.PENDING, "stuck-refunding", "Insufficient balance: 0 available, 100 needed.")
    assert hops(flow)[-4:] == [("Mint", "coordinator", "tim3"), ("Mint-Error", "tim3", "coordinator"),
                               ("Transfer", "coordinator", "usda-b"), ("Transfer-Error", "usda-b", "coordinator")]
    assert balances(user) == {"USDA": 200 * U, "TIM3": 0, "locked": 0}
    assert books() == {"custody": 100 * U, "collateral": 0, "outstanding": 0, "payouts_committed": 100 * U}
    assert reserves()["usda_held"] == 100 * U and supply() == 0
    assert check_invariants() == []

    configure("PendingTimeout", 1)
    time.sleep(1.1)
    [cleanup] = send_cleanup_expired()
    run_until_idle()
    answer = Message.objects.get(pushed_for=cleanup.msg_id, action="CleanupExpired-Response")
    assert answer.get("Checked") == "0"
    op.refresh_from_db()
    assert (op.step, op.error, op.expiring) == ("stuck-refunding", "Insufficient balance: 0 available, 100 needed.",
                                                False)
    set_process("usda", usda.id)
    operator_send(tim3, {"Action": "AddMinter", "Minter": coordinator.id})
    assert_consistent()


def test_timeout_with_a_late_mint_response_completes_exactly_once(system, wallet):
    user = wallet()
    fund(user, 300 * U)
    configure("PendingTimeout", 1)  # seconds
    tim3 = system["tim3"]

    flow = actions.request_deposit(wallet=user, quantity=str(100 * U))
    # Deliver everything except tim3: the Mint stays pending there.
    while targets := [t for t in processes_with_pending() if t != tim3.id]:
        for target in targets:
            drain_mailbox(process_id=target)
    op = operation(flow)
    mint = Message.objects.get(pushed_for=flow.id, action="Mint")
    assert (op.step, op.awaiting, mint.status) == ("minting", mint.msg_id, Message.PENDING)

    time.sleep(1.1)
    [cleanup] = send_cleanup_expired()
    drain("coordinator")
    op.refresh_from_db()
    assert op.expiring is True
    status_query = Message.objects.get(pushed_for=cleanup.msg_id, action="Message-Status")
    assert (status_query.target, status_query.get("Message-Id")) == (tim3.id, mint.msg_id)

    run_until_idle()
    flow.refresh_from_db()
    assert (flow.status, flow.error) == (Flow.COMPLETED, "")
    assert hops(flow) == deposit_hops()
    # Per-sender FIFO: tim3 answered the Mint before the status query.
    response = Message.objects.get(pushed_for=flow.id, action="Mint-Response")
    answer = Message.objects.get(pushed_for=cleanup.msg_id, action="Message-Status-Response")
    assert response.seq < answer.seq and response.slot < answer.slot
    assert (answer.get("Status"), answer.get("Handled")) == ("applied", "true")
    # Minted once, never refunded.
    assert TokenOperation.objects.filter(process=tim3, kind="mint", account=user).count() == 1
    assert not Message.objects.filter(action__in=["Deposit-Refunded", "Deposit-Failed"]).exists()
    assert Message.objects.filter(action="Deposit-Complete", target=user).count() == 1
    assert balances(user) == {"USDA": 200 * U, "TIM3": 100 * U, "locked": 0}
    assert supply() == 100 * U
    assert operation(flow).status == Operation.COMPLETED
    assert_consistent()


def test_timeout_of_an_unhandled_mint_is_compensated(system, wallet):
    """The coordinator's tim3 points at the State Manager: the Mint lands there
    unhandled (inbox). After PendingTimeout, CleanupExpired asks the State Manager,
    which says it did not handle it, and the deposit is refunded."""
    user = wallet()
    fund(user, 300 * U)
    tim3, state_manager = system["tim3"], system["state-manager"]
    set_process("tim3", state_manager.id)

    flow = deposit(user, 100 * U)
    assert flow.status == Flow.PENDING
    mint = Message.objects.get(pushed_for=flow.id, action="Mint")
    assert (mint.target, mint.status, mint.handled) == (state_manager.id, Message.APPLIED, False)
    assert operation(flow).step == "minting"
    assert balances(user)["USDA"] == 200 * U

    configure("PendingTimeout", 1)
    time.sleep(1.1)
    [cleanup] = send_cleanup_expired()
    run_until_idle()
    flow.refresh_from_db()

    assert flow.status == Flow.REFUNDED
    assert flow.error == "Mint failed: Timed out after 1 s: the request was not handled (no handler took it)."
    # The compensation runs in the CleanupExpired tick's cascade (its Pushed-For), so the
    # flow's own cascade ends at the lost Mint; the flow is settled through its Operation-Id.
    assert hops(flow) == deposit_start() + [("Mint", "coordinator", "state-manager")]
    n = names()
    assert [(m.action, n.get(m.sender, "user"), n.get(m.target, "user"))
            for m in Message.objects.filter(pushed_for=cleanup.msg_id).order_by("seq")] == [
        ("CleanupExpired", "user", "coordinator"), ("Message-Status", "coordinator", "state-manager"),
        ("CleanupExpired-Response", "coordinator", "user"),
        ("Message-Status-Response", "state-manager", "coordinator")] + refund_hops()
    answer = Message.objects.get(pushed_for=cleanup.msg_id, action="Message-Status-Response")
    assert (answer.get("Handled"), answer.get("Message-Id")) == ("false", mint.msg_id)
    refunded = Message.objects.get(action="Deposit-Refunded", target=user)
    assert refunded.get("Operation-Id") == operation(flow).op_id
    assert balances(user) == {"USDA": 300 * U, "TIM3": 0, "locked": 0}
    assert supply() == 0 and positions(user) == {}
    assert books() == {"custody": 0, "collateral": 0, "outstanding": 0, "payouts_committed": 0}
    assert_consistent()

    set_process("tim3", tim3.id)
    assert deposit(user, 100 * U).status == Flow.COMPLETED
    assert_consistent()


def test_cleanup_expired_only_from_the_scheduler_or_owner(system, wallet):
    msg = send_message(sender=wallet(), target=system["coordinator"].id, tags={"Action": "CleanupExpired"})
    run_until_idle()
    msg.refresh_from_db()
    assert (msg.status, msg.error) == (Message.FAILED, "Only the owner or the scheduler may CleanupExpired.")


# --- 3. spoofed Credit-Notices -----------------------------------------------------------------


def test_spoofed_credit_notice_from_a_wallet_mints_nothing(system, wallet):
    attacker = wallet()
    coordinator = system["coordinator"]
    msg = send_message(sender=attacker, target=coordinator.id, tags={
        "Action": "Credit-Notice", "Sender": attacker, "Quantity": str(1_000 * U)})
    run_until_idle()
    msg.refresh_from_db()
    assert (msg.status, msg.error) == (
        Message.FAILED, "Credit-Notice is accepted only from the configured USDA process.")
    error = Message.objects.get(parent_id=msg.msg_id)
    assert (error.action, error.target) == ("Credit-Notice-Error", attacker)
    assert supply() == 0 and balances(attacker)["TIM3"] == 0
    assert books()["custody"] == 0 and not Operation.objects.exists()
    assert_consistent()


def test_credit_notice_from_another_token_mints_nothing(system, wallet):
    attacker = wallet()
    coordinator = system["coordinator"]
    fake = spawn_process(name="fakeusda", kind="token", owner=operator_address(),
                         tags={"Token-Name": "USD Alpha", "Ticker": "USDA", "Mint-Policy": "owner"})
    run_until_idle()
    operator_send(fake, {"Action": "Mint", "Recipient": attacker, "Quantity": str(5_000 * U)})

    pay = send_message(sender=attacker, target=fake.id, tags={
        "Action": "Transfer", "Recipient": coordinator.id, "Quantity": str(5_000 * U)})
    run_until_idle()
    notice = Message.objects.get(pushed_for=pay.msg_id, action="Credit-Notice")
    assert (notice.sender, notice.target) == (fake.id, coordinator.id)
    assert (notice.status, notice.error) == (
        Message.FAILED, "Credit-Notice is accepted only from the configured USDA process.")
    assert supply() == 0 and balances(attacker)["TIM3"] == 0
    assert books()["custody"] == 0 and not Operation.objects.exists()
    assert_consistent()


def test_tim3_sent_to_the_coordinator_is_returned_not_redeemed(system, wallet):
    user = wallet()
    fund(user, 100 * U)
    assert deposit(user, 50 * U).status == Flow.COMPLETED
    pay = send_message(sender=user, target=system["tim3"].id, tags={
        "Action": "Transfer", "Recipient": system["coordinator"].id, "Quantity": str(20 * U)})
    run_until_idle()
    n = names()
    assert [(m.action, n.get(m.sender, "user"), n.get(m.target, "user"))
            for m in Message.objects.filter(pushed_for=pay.msg_id).order_by("seq")] == [
        ("Transfer", "user", "tim3"), ("Debit-Notice", "tim3", "user"), ("Credit-Notice", "tim3", "coordinator"),
        ("Transfer", "coordinator", "tim3"), ("Debit-Notice", "tim3", "coordinator"),
        ("Credit-Notice", "tim3", "user")]
    assert balances(user) == {"USDA": 50 * U, "TIM3": 50 * U, "locked": 0}
    assert supply() == 50 * U
    assert_consistent()


# --- 4. coordinator versions --------------------------------------------------------------


def test_coordinator_versions_spawn_activate_redeem_old_and_roll_back(system, wallet):
    user = wallet()
    fund(user, 1_000 * U)
    assert deposit(user, 100 * U).status == Flow.COMPLETED
    assert deposit(user, 40 * U, mode="lock").status == Flow.COMPLETED

    new = spawn_coordinator()
    assert (new.name, new.version, new.active) == ("coordinator-v2", 2, False)
    assert active_coordinator().name == "coordinator"
    activate_coordinator(process=new)
    assert active_coordinator() == new

    flow = deposit(user, 50 * U)
    assert flow.status == Flow.COMPLETED
    assert hops(flow) == deposit_hops("coordinator-v2")
    assert books("coordinator-v2")["custody"] == 50 * U
    assert_consistent()  # two coordinators: supply == both custodies + locked

    # 80 is more than the new coordinator holds: the old one, which has the custody, pays.
    old = redeem(user, 80 * U)
    assert old.status == Flow.COMPLETED
    assert hops(old) == redeem_hops("coordinator")
    # TIM3 locked through the old coordinator is burned through it too.
    burn = redeem(user, 40 * U, mode="lock")
    assert burn.status == Flow.COMPLETED and burn.target == system["coordinator"].id
    active = redeem(user, 50 * U)  # the active one, when it can
    assert (active.status, active.target) == (Flow.COMPLETED, new.id)
    assert hops(active) == redeem_hops("coordinator-v2")
    assert balances(user) == {"USDA": 980 * U, "TIM3": 20 * U, "locked": 0}
    assert books("coordinator")["custody"] == 20 * U and books("coordinator-v2")["custody"] == 0
    assert supply() == 20 * U
    assert_consistent()

    assert rollback_coordinator().name == "coordinator"
    back = deposit(user, 10 * U)
    assert back.status == Flow.COMPLETED and hops(back) == deposit_hops("coordinator")
    # The inactive version keeps answering.
    info = send_message(sender=user, target=new.id, tags={"Action": "Info"})
    run_until_idle()
    assert Message.objects.get(parent_id=info.msg_id).action == "Info-Response"
    assert_consistent()


# --- 5. Risk-Alert --------------------------------------------------------------------------


def test_risk_alert_halts_minting_until_an_admin_resumes(system, wallet):
    user, admin = wallet(), wallet()
    fund(user, 500 * U)
    assert deposit(user, 200 * U).status == Flow.COMPLETED
    state_manager, coordinator = system["state-manager"], system["coordinator"]

    spoof = send_message(sender=user, target=coordinator.id, tags={"Action": "Risk-Alert", "Health-Score": "0"})
    run_until_idle()
    spoof.refresh_from_db()
    assert spoof.status == Message.FAILED and coordinator_state().risk_halt is False

    # The global ratio (1.0) falls below a 2.0 target: the State Manager raises an alert.
    operator_send(state_manager, {"Action": "SetTargetRatio", "Target-Ratio-Bp": "20000"})
    [check] = send_check_risk_alerts()
    run_until_idle()
    alert = Message.objects.get(pushed_for=check.msg_id, action="Risk-Alert")
    assert (alert.sender, alert.target, alert.status) == (state_manager.id, coordinator.id, Message.APPLIED)
    c = coordinator_state()
    assert c.risk_halt is True and c.paused_mint is False
    assert c.pause_reason == "Risk alert: health score 85, collateral ratio 1.0000"
    assert actions.system_health()["paused"]["mint"] is True

    flow = deposit(user, 100 * U)
    assert (flow.status, flow.error) == (
        Flow.REFUNDED, "Minting is paused: Risk alert: health score 85, collateral ratio 1.0000")
    assert hops(flow) == deposit_start() + refund_hops()
    assert redeem(user, 50 * U).status == Flow.COMPLETED  # redemption still works
    assert balances(user) == {"USDA": 350 * U, "TIM3": 150 * U, "locked": 0}
    assert_consistent()

    operator_send(state_manager, {"Action": "SetTargetRatio", "Target-Ratio-Bp": "10000"})
    assert [settle(f).status for f in actions.request_resume(wallet=admin, scope="mint")] == [Flow.COMPLETED]
    c = coordinator_state()
    assert (c.risk_halt, c.pause_reason) == (False, "")
    assert deposit(user, 100 * U).status == Flow.COMPLETED
    [check] = send_check_risk_alerts()
    run_until_idle()
    assert not Message.objects.filter(pushed_for=check.msg_id, action="Risk-Alert").exists()
    assert coordinator_state().risk_halt is False
    assert_consistent()


@pytest.mark.parametrize("mode", ["deposit", "lock"])
def test_pending_flow_then_settle_keeps_reserves_over_backed(system, wallet, mode):
    """While a flow is in flight TIM3 is never above the reserves (reserves move first)."""
    user = wallet()
    fund(user, 100 * U)
    flow = actions.request_deposit(wallet=user, quantity=str(60 * U), mode=mode)
    steps = 0
    while processes_with_pending():
        drain_mailbox(process_id=processes_with_pending()[0])
        assert check_invariants() == []
        steps += 1
    assert settle(flow).status == Flow.COMPLETED and steps >= 5
    assert_consistent()
