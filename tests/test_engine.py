"""The message engine (SPEC §1): ordering, exactly-once, failures, inbox,
dead-lettering, deterministic ids, tag validation.

Delivery is driven in-process (`run_until_idle` / `drain_mailbox`, the same
drain the Celery workers run); the doorbell is off (tests/conftest.py), which
is exactly "committed, but the doorbell never rang".
"""

import io
import random
import threading
from contextlib import contextmanager

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models import F

from processes.blueprints.state import TokenAccount, TokenState
from processes.invariants import check_invariants
from processes.runtime import delivery, sql
from processes.runtime.delivery import (
    ProcessBusy,
    drain_mailbox,
    lock_process,
    processes_with_pending,
    record_drain_failure,
    run_until_idle,
    send_message,
    sweep_mailboxes,
)
from processes.runtime.handlers import HandlerError, Handlers
from processes.runtime.ids import derive_id, is_id, new_id
from processes.runtime.models import Message, Process, Wallet
from processes.runtime.quantities import UNIT
from processes.runtime.registry import BLUEPRINTS, Blueprint, register_blueprint
from processes.runtime.replay import replay_all, snapshot_state
from processes.runtime.tags import MAX_DATA, MAX_TAG_VALUE, MAX_TAGS, TagError
from tests.conftest import send

TEST_KIND = "test-engine"
APPLIED: list[str] = []  # msg ids, in the order the "Record" handler ran


def _test_handlers() -> Handlers:
    handlers = Handlers()

    @handlers.add("Record")
    def record(msg, ctx):
        APPLIED.append(msg.msg_id)

    @handlers.add("Write-Then-Fail")
    def write_then_fail(msg, ctx):
        # Writes real state (a token's account) and sends, then refuses: none of it may stay.
        token, account = msg.get("Token"), msg.get("Account")
        TokenAccount.objects.filter(process_id=token, account=account).update(balance=F("balance") + 5 * UNIT)
        TokenAccount.objects.create(process_id=token, account=new_id(), balance=1)
        TokenState.objects.filter(process_id=token).update(total_supply=F("total_supply") + 5 * UNIT + 1)
        ctx.send(target=token, tags={"Action": "Transfer", "Recipient": account, "Quantity": "1"})
        ctx.reply({"Action": "Written"})
        ctx.note(account=account, change="+5")
        raise HandlerError("refused after writing")

    @handlers.add("Crash")
    def crash(msg, ctx):
        ctx.reply({"Action": "Never-Sent"})
        return 1 // 0

    @handlers.add("Ping-Self")
    def ping_self(msg, ctx):
        ctx.send(target=ctx.id, tags={"Action": "Record", "Hop": "2"})
        ctx.reply({"Action": "Ping-Self-Response"})

    @handlers.add("Start-Poke")
    def start_poke(msg, ctx):
        ctx.send(target=msg.get("Other"), tags={"Action": msg.get("Poke", "Poke"), "X-Flow": msg.get("X-Flow")})

    @handlers.add("Poke")
    def poke(msg, ctx):
        raise HandlerError("poke refused")

    @handlers.add("Doomed-Poke")
    def doomed_poke(msg, ctx):
        # An inner atomic block without a savepoint that fails dooms the whole transaction.
        with transaction.atomic(savepoint=False):
            raise HandlerError("poke refused after dooming the transaction")

    @handlers.add("Move-Later")
    def move_later(msg, ctx):
        # Moves units between two accounts of a token with writes queued for the drain's next
        # statement (sql.writing_later): an overdraw fails only when they go out.
        token, quantity = msg.get("Token"), int(msg.get("Quantity"))
        sql.update_later(TokenAccount, set="balance = balance - %s", where="process_id = %s AND account = %s",
                         params=[quantity, token, msg.get("From-Account")], rows=1)
        sql.insert_or_add(TokenAccount(process_id=token, account=msg.get("To-Account"), balance=quantity),
                          unique=("process_id", "account"), add=("balance",))
        ctx.reply({"Action": "Moved"})

    @handlers.add("Poke-Error")
    def poke_error(msg, ctx):
        raise HandlerError("cannot handle this error either")

    return handlers


@pytest.fixture
def test_blueprint():
    APPLIED.clear()
    register_blueprint(Blueprint(kind=TEST_KIND, handlers=_test_handlers(), state_models=[]))
    yield
    BLUEPRINTS.pop(TEST_KIND, None)
    APPLIED.clear()


@pytest.fixture
def test_process(db, test_blueprint, operator):
    """A factory of processes run by the test blueprint (no Spawn: their log starts empty)."""
    def make(name="test-proc"):
        return Process.objects.create(id=new_id(), name=name, kind=TEST_KIND, owner=operator)
    return make


# --- helpers ---------------------------------------------------------------------

def balance(process, address) -> int:
    row = TokenAccount.objects.filter(process=process, account=address).first()
    return row.balance if row else 0


def supply(process) -> int:
    return TokenState.objects.get(process=process).total_supply


def faucet(usda, address, whole_usda=1000):
    msg = send(address, usda, {"Action": "Mint", "Quantity": str(whole_usda * UNIT)})
    assert msg.status == Message.APPLIED, msg.error
    assert balance(usda, address) >= whole_usda * UNIT
    return msg


def children(msg) -> list[Message]:
    return list(Message.objects.filter(parent_id=msg.msg_id).order_by("seq"))


@contextmanager
def another_worker_holding(*process_ids):
    """These processes' row locks held on another connection, as a drain holds them,
    until the block ends or the yielded event is set (Postgres)."""
    from django.db import connections

    has_locks, release = threading.Event(), threading.Event()

    def hold():
        try:
            with transaction.atomic():
                for process_id in process_ids:
                    lock_process(process_id)
                has_locks.set()
                release.wait(timeout=10)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold)
    holder.start()
    assert has_locks.wait(timeout=10)
    try:
        yield release
    finally:
        release.set()
        holder.join(timeout=10)


def slots_of(process) -> list[int]:
    return list(Message.objects.filter(target=process.id, slot__isnull=False).order_by("slot").values_list("slot", flat=True))


# --- ordering --------------------------------------------------------------------

def test_200_messages_from_several_senders_get_gap_free_slots_in_per_sender_order(test_process, wallet, settings):
    settings.TIM3_DRAIN_BATCH = 16  # several drains, so slots must continue across batches
    target = test_process("orderly")
    senders = [wallet() for _ in range(5)]
    plan = [s for s in senders for _ in range(40)]
    random.Random(7).shuffle(plan)  # interleaved arrivals
    sent_count = {s: 0 for s in senders}
    sent = []
    for sender in plan:
        sent.append(send_message(sender=sender, target=target.id, tags={"Action": "Record", "N": str(sent_count[sender])}))
        sent_count[sender] += 1

    assert run_until_idle() == 200

    log = list(Message.objects.filter(target=target.id).order_by("slot"))
    assert len(log) == 200
    assert [m.slot for m in log] == list(range(1, 201))
    assert all(m.status == Message.APPLIED and m.handled for m in log)
    # Slot order is arrival order, and it is the order the handler actually ran in.
    assert [m.msg_id for m in log] == [m.msg_id for m in sent]
    assert APPLIED == [m.msg_id for m in log]
    target.refresh_from_db()
    assert target.next_slot == 201
    for sender in senders:
        mine = sorted((m for m in log if m.sender == sender), key=lambda m: m.reference)
        assert [m.reference for m in mine] == list(range(1, 41))  # each wallet's own counter
        assert [m.get("N") for m in mine] == [str(i) for i in range(40)]
        assert [m.slot for m in mine] == sorted(m.slot for m in mine)


# --- exactly once --------------------------------------------------------------------

def test_same_doorbell_rung_five_times_applies_each_message_once(system, wallet):
    usda = system["usda"]
    alice, bob = wallet(), wallet()
    faucet(usda, alice)
    supply_before = supply(usda)
    transfers = [
        send_message(sender=alice, target=usda.id, tags={"Action": "Transfer", "Recipient": bob, "Quantity": str(7 * UNIT)})
        for _ in range(10)
    ]

    counts = [drain_mailbox(process_id=usda.id) for _ in range(5)]

    assert counts == [10, 0, 0, 0, 0]
    assert balance(usda, alice) == 1000 * UNIT - 70 * UNIT
    assert balance(usda, bob) == 70 * UNIT
    assert supply(usda) == supply_before
    for msg in transfers:
        msg.refresh_from_db()
        assert msg.status == Message.APPLIED
    credit_notices = Message.objects.filter(target=bob, action="Credit-Notice")
    assert credit_notices.count() == 10
    assert processes_with_pending() == []
    assert run_until_idle() == 0
    assert check_invariants() == []


@pytest.mark.django_db(transaction=True)
def test_two_threads_draining_one_process_apply_each_message_once(system, wallet):
    if connection.vendor == "sqlite":
        pytest.skip("concurrent drains need row locks (select_for_update): this test runs on Postgres only")
    usda = system["usda"]
    alice, bob, carol, dave = wallet(), wallet(), wallet(), wallet()
    faucet(usda, alice)
    faucet(usda, dave)
    supply_before = supply(usda)
    expected = {alice: 1000 * UNIT, bob: 0, carol: 0, dave: 1000 * UNIT}
    for i in range(40):
        sender, recipient = (alice, bob) if i % 2 else (dave, carol)
        quantity = (i + 1) * 1000
        tags = {"Action": "Transfer", "Recipient": recipient, "Quantity": str(quantity)}
        send_message(sender=sender, target=usda.id, tags=tags)
        expected[sender] -= quantity
        expected[recipient] += quantity
    pending = Message.objects.filter(target=usda.id, status=Message.PENDING).count()
    assert pending == 40

    start = threading.Barrier(2)
    applied: list[int] = []
    errors: list[BaseException] = []

    def worker():
        try:
            start.wait(timeout=10)
            while True:
                n = drain_mailbox(process_id=usda.id, batch_size=3)
                if not n:
                    return
                applied.append(n)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []

    assert sum(applied) == 40  # a message applied twice would make this larger
    for address, amount in expected.items():
        assert balance(usda, address) == amount
    assert supply(usda) == supply_before
    usda.refresh_from_db()
    assert slots_of(usda) == list(range(1, usda.next_slot))
    assert Message.objects.filter(action="Credit-Notice", target__in=[bob, carol]).count() == 40
    assert check_invariants() == []


# --- crash between commit and doorbell ----------------------------------------------

def test_message_committed_without_doorbell_is_found_by_the_sweeper_and_applied(system, wallet, monkeypatch):
    usda = system["usda"]
    alice, bob = wallet(), wallet()
    faucet(usda, alice)
    rung: list[str] = []
    monkeypatch.setattr(delivery, "ring_doorbells", lambda ids: rung.extend(sorted(set(ids))))

    # Committed, but the process "crashed" before ringing: nothing was rung.
    msg = send_message(sender=alice, target=usda.id, tags={"Action": "Transfer", "Recipient": bob, "Quantity": str(3 * UNIT)})
    assert rung == []
    assert processes_with_pending() == [usda.id]

    # Too fresh for the sweeper (its doorbell may still be on the way) ...
    assert sweep_mailboxes(older_than_ms=60_000) == []
    assert rung == []
    # ... until it has waited longer than a doorbell should take.
    Message.objects.filter(pk=msg.pk).update(timestamp=F("timestamp") - 60_000)
    assert processes_with_pending(older_than_ms=30_000) == [usda.id]
    assert sweep_mailboxes() == [usda.id]
    assert rung == [usda.id]

    for process_id in rung:  # what the rung doorbell's worker does
        drain_mailbox(process_id=process_id)
    msg.refresh_from_db()
    assert msg.status == Message.APPLIED
    assert balance(usda, bob) == 3 * UNIT
    assert balance(usda, alice) == 997 * UNIT
    assert processes_with_pending() == []
    assert sweep_mailboxes(older_than_ms=0) == []


def test_message_between_processes_left_pending_is_swept_too(test_process, wallet, monkeypatch):
    proc = test_process("self-sender")
    root = send_message(sender=wallet(), target=proc.id, tags={"Action": "Ping-Self"})
    assert drain_mailbox(process_id=proc.id) == 1  # applied Ping-Self; its Record to itself is pending
    hop = Message.objects.get(parent_id=root.msg_id, target=proc.id)
    assert hop.status == Message.PENDING
    rung: list[str] = []
    monkeypatch.setattr(delivery, "ring_doorbells", lambda ids: rung.extend(ids))
    assert sweep_mailboxes(older_than_ms=0) == [proc.id]
    drain_mailbox(process_id=rung[0])
    hop.refresh_from_db()
    assert (hop.status, hop.slot, hop.sender) == (Message.APPLIED, 2, proc.id)
    assert APPLIED == [hop.msg_id]


# --- a handler that raises --------------------------------------------------------------

def test_handler_that_writes_then_raises_changes_nothing_and_answers_error(system, test_process, wallet):
    usda = system["usda"]
    proc = test_process("refuser")
    alice = wallet()
    faucet(usda, alice)
    accounts_before = TokenAccount.objects.filter(process=usda).count()
    supply_before, alice_before = supply(usda), balance(usda, alice)
    pending_before = Message.objects.filter(status=Message.PENDING).count()

    msg = send(alice, proc, {
        "Action": "Write-Then-Fail", "Token": usda.id, "Account": alice, "X-Flow": "flow-42", "X-Note": "keep me",
    })

    # No state change: the handler's writes were rolled back.
    assert balance(usda, alice) == alice_before
    assert supply(usda) == supply_before
    assert TokenAccount.objects.filter(process=usda).count() == accounts_before
    # The failure is recorded on the message, in its slot.
    assert msg.status == Message.FAILED
    assert msg.error == "refused after writing"
    assert msg.handled is True
    assert msg.slot == 1
    assert msg.result["changes"] == []
    # Only the runtime's error reply left: not the Transfer, not the "Written" reply.
    (reply,) = children(msg)
    assert msg.result["messages"] == [reply.msg_id]
    assert not Message.objects.filter(action__in=["Transfer", "Written"], sender=proc.id).exists()
    assert Message.objects.filter(status=Message.PENDING).count() == pending_before
    # The error reply, delivered to the sender.
    assert reply.target == alice
    assert reply.sender == proc.id
    assert reply.action == "Write-Then-Fail-Error"
    assert reply.status == Message.APPLIED
    assert reply.get("Error") == "refused after writing"
    assert reply.get("Message-Id") == msg.msg_id
    assert reply.x_reference == str(msg.reference)
    assert reply.get("X-Flow") == "flow-42"
    assert reply.get("X-Note") == "keep me"
    assert reply.pushed_for == msg.msg_id
    assert check_invariants() == []


def test_a_queued_write_that_a_constraint_refuses_fails_only_its_own_message(system, test_process, wallet):
    usda, proc = system["usda"], test_process("mover")
    alice, bob = wallet(), wallet()
    faucet(usda, alice, whole_usda=10)
    moves = [(1, "first"), (100, "overdraw"), (2, "last")]
    # Sent, then drained as one batch: its writes are queued (no savepoints at first).
    sent = [send_message(sender=alice, target=proc.id, tags={
        "Action": "Move-Later", "Token": usda.id, "Quantity": str(units * UNIT), "From-Account": alice,
        "To-Account": bob, "X-Note": note}) for units, note in moves]
    assert drain_mailbox(process_id=proc.id) == 3
    first, overdraw, last = (Message.objects.get(pk=m.pk) for m in sent)
    assert [m.slot for m in (first, overdraw, last)] == [1, 2, 3]
    assert (first.status, last.status) == (Message.APPLIED, Message.APPLIED)
    assert overdraw.status == Message.FAILED and "token_balance_not_negative" in overdraw.error
    assert [c.action for c in children(overdraw)] == ["Move-Later-Error"]
    assert (balance(usda, alice), balance(usda, bob)) == (7 * UNIT, 3 * UNIT)  # the two moves, nothing of the third
    assert check_invariants() == []


def test_unexpected_exception_is_recorded_as_internal_error_with_reply(test_process, wallet):
    proc = test_process("crasher")
    alice = wallet()
    msg = send(alice, proc, {"Action": "Crash", "X-Request": "r1"})
    assert msg.status == Message.FAILED
    assert msg.error == "Internal error: ZeroDivisionError: integer division or modulo by zero"
    (reply,) = children(msg)
    assert (reply.action, reply.target, reply.get("Error"), reply.get("X-Request")) == (
        "Crash-Error", alice, msg.error, "r1")
    assert not Message.objects.filter(action="Never-Sent").exists()


def test_failing_token_transfer_moves_nothing_and_sender_gets_transfer_error(system, wallet):
    usda = system["usda"]
    alice, bob = wallet(), wallet()
    faucet(usda, alice, whole_usda=5)
    msg = send(alice, usda, {"Action": "Transfer", "Recipient": bob, "Quantity": str(6 * UNIT), "X-Order": "o-1"})
    assert msg.status == Message.FAILED
    assert "Insufficient balance" in msg.error
    assert balance(usda, alice) == 5 * UNIT
    assert balance(usda, bob) == 0
    (reply,) = children(msg)
    assert reply.action == "Transfer-Error"
    assert reply.target == alice
    assert reply.get("Error") == msg.error
    assert reply.x_reference == str(msg.reference)
    assert reply.get("X-Order") == "o-1"
    assert not Message.objects.filter(target=bob).exists()


def test_failing_error_message_does_not_bounce_another_error(test_process, wallet):
    first, second = test_process("poker"), test_process("pokee")
    root = send(wallet(), first, {"Action": "Start-Poke", "Other": second.id, "X-Flow": "f-9"})
    assert root.status == Message.APPLIED

    cascade = list(Message.objects.filter(pushed_for=root.msg_id).order_by("seq"))
    assert [m.action for m in cascade] == ["Start-Poke", "Poke", "Poke-Error"]
    poke, poke_error = cascade[1], cascade[2]
    assert (poke.status, poke.error) == (Message.FAILED, "poke refused")
    # The error reply went back to the process that poked, with its Reference and X-* tags ...
    assert (poke_error.sender, poke_error.target) == (second.id, first.id)
    assert poke_error.x_reference == str(poke.reference)
    assert poke_error.get("X-Flow") == "f-9"
    # ... and failed there too, without an error about the error.
    assert (poke_error.status, poke_error.error) == (Message.FAILED, "cannot handle this error either")
    assert poke_error.result["messages"] == []
    assert not Message.objects.filter(action__endswith="-Error-Error").exists()
    assert processes_with_pending() == []


# --- inbox ------------------------------------------------------------------------------

def test_unmatched_messages_land_in_the_inbox_with_no_effect(system, wallet):
    usda = system["usda"]
    alice, bob = wallet(), wallet()
    faucet(usda, alice)
    state_before = snapshot_state(usda)
    dance = send(alice, usda, {"Action": "Dance", "X-Style": "tango"}, data="hello inbox")
    no_action = send(bob, usda, {"Colour": "blue"})
    handled = send(alice, usda, {"Action": "Balance"})

    for msg in (dance, no_action):
        assert msg.status == Message.APPLIED
        assert msg.handled is False
        assert msg.error == ""
        assert msg.slot is not None
        assert children(msg) == []
    assert snapshot_state(usda) == state_before
    assert handled.handled is True

    out = io.StringIO()
    call_command("inbox", "usda", stdout=out)
    text = out.getvalue()
    assert dance.msg_id in text and "Action=Dance" in text and "hello inbox" in text
    assert no_action.msg_id in text and "Action=-" in text
    assert handled.msg_id not in text
    assert text.index(no_action.msg_id) < text.index(dance.msg_id)  # newest first

    by_id = io.StringIO()
    call_command("inbox", usda.id, "--limit", "1", stdout=by_id)
    assert no_action.msg_id in by_id.getvalue() and dance.msg_id not in by_id.getvalue()

    empty = io.StringIO()
    call_command("inbox", "tim3", stdout=empty)
    assert empty.getvalue().strip() == "tim3: inbox is empty"


# --- dead-lettering ------------------------------------------------------------------------

def test_message_that_keeps_failing_to_drain_is_dead_lettered_and_the_queue_moves_on(system, wallet, settings):
    settings.TIM3_MAX_ATTEMPTS = 3
    usda = system["usda"]
    alice, bob = wallet(), wallet()
    faucet(usda, alice)
    usda.refresh_from_db()
    next_slot = usda.next_slot
    head = send_message(sender=alice, target=usda.id, tags={
        "Action": "Transfer", "Recipient": bob, "Quantity": str(1 * UNIT), "X-Flow": "dead-1"})
    second = send_message(sender=alice, target=usda.id, tags={"Action": "Transfer", "Recipient": bob, "Quantity": str(2 * UNIT)})
    third = send_message(sender=bob, target=usda.id, tags={"Action": "Balance"})

    for attempt in (1, 2):
        got = record_drain_failure(process_id=usda.id, error="RuntimeError: poisoned")
        assert got.msg_id == head.msg_id
        head.refresh_from_db()
        assert (head.attempts, head.status, head.slot, head.dead) == (attempt, Message.PENDING, None, False)

    record_drain_failure(process_id=usda.id, error="RuntimeError: poisoned")
    head.refresh_from_db()
    assert head.status == Message.FAILED
    assert head.dead is True
    assert head.attempts == 3
    assert head.slot == next_slot
    assert head.error == "Dead-lettered after 3 failed attempts: RuntimeError: poisoned"
    assert balance(usda, bob) == 0  # never applied
    (reply,) = children(head)
    assert (reply.action, reply.target, reply.status) == ("Transfer-Error", alice, Message.APPLIED)
    assert reply.get("Error") == head.error
    assert reply.get("Message-Id") == head.msg_id
    assert reply.x_reference == str(head.reference)
    assert reply.get("X-Flow") == "dead-1"

    # The queue behind it drains.
    assert run_until_idle() == 2
    second.refresh_from_db()
    third.refresh_from_db()
    assert (second.status, second.slot) == (Message.APPLIED, next_slot + 1)
    assert (third.status, third.slot) == (Message.APPLIED, next_slot + 2)
    assert balance(usda, bob) == 2 * UNIT
    assert balance(usda, alice) == 998 * UNIT
    assert record_drain_failure(process_id=usda.id, error="nothing pending") is None
    assert check_invariants() == []
    assert replay_all().differences == []


# --- deterministic ids and replay -------------------------------------------------------------

def test_child_ids_derive_from_the_parent_id(system, wallet):
    usda = system["usda"]
    alice, bob = wallet(), wallet()
    faucet(usda, alice)
    root = send(alice, usda, {"Action": "Transfer", "Recipient": bob, "Quantity": "5"})
    kids = children(root)
    assert [k.action for k in kids] == ["Debit-Notice", "Credit-Notice"]
    assert [k.msg_id for k in kids] == [derive_id(root.msg_id, 1), derive_id(root.msg_id, 2)]
    assert all(is_id(k.msg_id) for k in kids)
    assert all(k.pushed_for == root.msg_id and k.parent_id == root.msg_id for k in kids)
    assert root.is_root and not kids[0].is_root
    # derive_id is a pure function of its parts; new_id is not.
    assert derive_id("a", 1) == derive_id("a", 1) != derive_id("a", 2)
    assert new_id() != new_id()


def test_replay_of_a_system_after_transfers_mints_and_failures_is_clean(system, test_process, wallet):
    usda, tim3 = system["usda"], system["tim3"]
    alice, bob, carol = wallet(), wallet(), wallet()
    faucet(usda, alice)
    faucet(usda, bob, whole_usda=10)
    send(alice, usda, {"Action": "Transfer", "Recipient": bob, "Quantity": str(250 * UNIT), "X-Flow": "x"})
    send(bob, usda, {"Action": "Transfer", "Recipient": carol, "Quantity": "123456789"})
    failures = [
        send(carol, usda, {"Action": "Transfer", "Recipient": alice, "Quantity": str(10**12)}),  # over balance
        send(alice, usda, {"Action": "Transfer", "Recipient": bob, "Quantity": "1.5"}),  # not canonical
        send(alice, usda, {"Action": "Mint", "Quantity": str(1001 * UNIT)}),  # over the faucet cap
        send(alice, tim3, {"Action": "Mint", "Recipient": alice, "Quantity": "1"}),  # not a minter
    ]
    assert all(m.status == Message.FAILED for m in failures)
    send(carol, usda, {"Action": "Burn", "Quantity": "456789"})
    send(bob, usda, {"Action": "Unknown-Thing"})
    send(alice, usda, {"Action": "Balances"})
    proc = test_process("replayed")
    send(alice, proc, {"Action": "Write-Then-Fail", "Token": usda.id, "Account": alice})
    send(alice, proc, {"Action": "Ping-Self"})
    live = {p.name: snapshot_state(p) for p in Process.objects.all()}

    report = replay_all()

    assert report.differences == []
    assert report.clean
    assert report.processes == Process.objects.count()
    assert report.messages == Message.objects.filter(target__in=Process.objects.values("id")).exclude(
        status=Message.PENDING).count()
    # Replay ran in scratch state: the live state is untouched.
    assert {p.name: snapshot_state(p) for p in Process.objects.all()} == live


def test_replay_notices_when_the_log_does_not_rebuild_live_state(system, wallet):
    usda = system["usda"]
    alice, bob = wallet(), wallet()
    faucet(usda, alice)
    transfer = send(alice, usda, {"Action": "Transfer", "Recipient": bob, "Quantity": str(4 * UNIT)})
    tags = [[k, str(5 * UNIT) if k == "Quantity" else v] for k, v in transfer.tags]
    Message.objects.filter(pk=transfer.pk).update(tags=tags)  # the log now says 5, the state says 4
    report = replay_all()
    assert not report.clean
    assert any(bob in line and "TokenAccount" in line for line in report.differences)


# --- tag validation -----------------------------------------------------------------------------

BAD_TAGS = [
    pytest.param([["Action", "Transfer"], ["Action", "Mint"]], "appears more than once", id="duplicate"),
    pytest.param([["Action", "Balance"], ["Quantity", "1"], ["Quantity", "1"]], "appears more than once", id="duplicate-2"),
    *[pytest.param({"Action": "Balance", name: "x"}, "set by the system", id=f"reserved-{name}")
      for name in ("From", "X-Reference", "Reference", "Pushed-For", "Id", "Target", "Slot", "Nonce", "Timestamp", "Owner")],
    pytest.param({"Action": "Balance\n"}, "control characters", id="newline-in-value"),
    pytest.param({"Action": "Bal\x00ance"}, "control characters", id="nul-in-value"),
    pytest.param({"Action": "Balance", "Note": "a\x1b[31mred"}, "control characters", id="escape-in-value"),
    pytest.param({"Action": "Balance", "Note": "del\x7f"}, "control characters", id="del-in-value"),
    pytest.param({"Action\n": "Balance"}, "is not allowed", id="newline-in-name"),
    pytest.param({"Action": "Balance", "Bad Name": "x"}, "is not allowed", id="space-in-name"),
    pytest.param({"Action": "Balance", "": "x"}, "is not allowed", id="empty-name"),
    pytest.param({"Action": "Balance", "Note": "x" * (MAX_TAG_VALUE + 1)}, "longer than", id="long-value"),
    pytest.param({"Action": "Balance", **{f"T{i}": "x" for i in range(MAX_TAGS)}}, "Too many tags", id="too-many"),
]


@pytest.mark.parametrize(("tags", "message"), BAD_TAGS)
def test_send_refuses_bad_tags_and_writes_nothing(system, wallet, tags, message):
    usda = system["usda"]
    sender = wallet()
    before = (Message.objects.count(), Wallet.objects.count())
    with pytest.raises(TagError, match=message):
        send_message(sender=sender, target=usda.id, tags=tags)
    assert (Message.objects.count(), Wallet.objects.count()) == before
    assert processes_with_pending() == []


@pytest.mark.parametrize(("data", "message"), [
    pytest.param("x" * (MAX_DATA + 1), "Data is larger than", id="oversized"),
    pytest.param("abc\x00def", "NUL", id="nul"),
])
def test_send_refuses_bad_data_and_writes_nothing(system, wallet, data, message):
    before = (Message.objects.count(), Wallet.objects.count())
    with pytest.raises(TagError, match=message):
        send_message(sender=wallet(), target=system["usda"].id, tags={"Action": "Balance"}, data=data)
    assert (Message.objects.count(), Wallet.objects.count()) == before


def test_send_refuses_forged_or_unknown_addresses_and_writes_nothing(system, wallet):
    usda, tim3 = system["usda"], system["tim3"]
    before = (Message.objects.count(), Wallet.objects.count())
    with pytest.raises(TagError, match="43-character wallet address"):
        send_message(sender="not-an-address", target=usda.id, tags={"Action": "Balance"})
    with pytest.raises(TagError, match="43-character wallet address"):
        send_message(sender=wallet() + "\n", target=usda.id, tags={"Action": "Balance"})
    with pytest.raises(TagError, match="cannot claim to come from a process"):
        send_message(sender=tim3.id, target=usda.id, tags={"Action": "Mint", "Quantity": "1"})
    with pytest.raises(LookupError, match="No process"):
        send_message(sender=wallet(), target=new_id(), tags={"Action": "Balance"})
    assert (Message.objects.count(), Wallet.objects.count()) == before


def test_send_accepts_the_largest_valid_message(system, wallet):
    tags = {"Action": "Dance", **{f"X-T{i}": "v" * MAX_TAG_VALUE for i in range(MAX_TAGS - 1)}}
    msg = send(wallet(), system["usda"], tags, data="d" * MAX_DATA)
    assert (msg.status, msg.handled, len(msg.tags), len(msg.data)) == (Message.APPLIED, False, MAX_TAGS, MAX_DATA)


@pytest.mark.django_db(transaction=True)
def test_following_a_cascade_skips_a_process_another_worker_holds_and_comes_back(system, wallet):
    """A worker following a cascade does not wait on a process another worker is
    draining (it would idle), and does not drop it either: it tries again."""
    if connection.vendor == "sqlite":
        pytest.skip("row locks (select_for_update skip_locked): this test runs on Postgres only")

    from processes.tasks import follow_cascade

    usda = system["usda"]
    alice, bob = wallet(), wallet()
    faucet(usda, alice)
    send_message(sender=alice, target=usda.id, tags={"Action": "Transfer", "Recipient": bob, "Quantity": "5"})

    with another_worker_holding(usda.id) as release:
        with pytest.raises(ProcessBusy):
            drain_mailbox(process_id=usda.id, wait=False)
        threading.Timer(0.3, release.set).start()
        rung = {usda.id}
        follow_cascade(rung, seconds=10)  # busy at first; applied once the other lets go
    assert rung == set()
    assert balance(usda, bob) == 5
    assert processes_with_pending() == []


@pytest.mark.django_db(transaction=True)
def test_a_follower_left_with_only_busy_processes_waits_instead_of_polling(system, wallet, monkeypatch):
    if connection.vendor == "sqlite":
        pytest.skip("row locks (select_for_update skip_locked): this test runs on Postgres only")

    from processes import tasks

    usda, tim3 = system["usda"], system["tim3"]
    alice = wallet()
    faucet(usda, alice)
    send_message(sender=alice, target=usda.id, tags={"Action": "Transfer", "Recipient": wallet(), "Quantity": "5"})
    send_message(sender=alice, target=tim3.id, tags={"Action": "Balance"})

    busy_attempts = []
    real_drain = tasks.drain_mailbox

    def counting_drain(**kwargs):
        try:
            return real_drain(**kwargs)
        except ProcessBusy:
            busy_attempts.append(kwargs["process_id"])
            raise

    monkeypatch.setattr(tasks, "drain_mailbox", counting_drain)
    with another_worker_holding(usda.id, tim3.id) as release:
        threading.Timer(0.5, release.set).start()
        rung = {usda.id, tim3.id}
        tasks.follow_cascade(rung, seconds=10)
    assert rung == set() and processes_with_pending() == []
    assert len(busy_attempts) == 2  # one look at each, then it waits for the lock rather than asking again and again


# --- following a cascade inside one transaction --------------------------------------------

def test_one_drain_that_follows_its_cascade_completes_a_deposit_in_one_transaction(system, wallet):
    usda, tim3, coordinator = system["usda"], system["tim3"], system["coordinator"]
    alice = wallet()
    faucet(usda, alice)
    deposit = send_message(sender=alice, target=usda.id,
                           tags={"Action": "Transfer", "Recipient": coordinator.id, "Quantity": str(10 * UNIT)})

    # Transfer, Credit-Notice, Mint, Mint-Response, UpdatePosition, UpdatePosition-Response:
    # six handlers in four processes (the coordinator three times), one call.
    assert drain_mailbox(process_id=usda.id, follow=8) == 6
    assert processes_with_pending() == []
    assert balance(tim3, alice) == 10 * UNIT
    final = Message.objects.get(pushed_for=deposit.msg_id, action="Deposit-Complete")
    assert (final.target, final.status, final.get("Flow-Status")) == (alice, Message.APPLIED, "completed")
    for process in (usda, tim3, coordinator, system["state-manager"]):
        assert slots_of(process) == list(range(1, len(slots_of(process)) + 1))
    assert check_invariants() == []
    assert replay_all().differences == []  # the log rebuilds what the followed drains did


def test_following_drains_commit_together_or_not_at_all(system, wallet, monkeypatch):
    """The database's own trouble in a followed drain (a lost connection, a lock timeout)
    rolls the whole transaction back, the first drain too: the task retries it all."""
    from django.db import OperationalError

    from processes.blueprints import coordinator as coordinator_blueprint

    usda, coordinator = system["usda"], system["coordinator"]
    alice = wallet()
    faucet(usda, alice)
    usda_before = balance(usda, alice)
    transfer = send_message(sender=alice, target=usda.id,
                            tags={"Action": "Transfer", "Recipient": coordinator.id, "Quantity": str(UNIT)})

    def lost_connection(*args, **kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(coordinator_blueprint, "check_mint_allowed", lost_connection)
    with pytest.raises(OperationalError):
        drain_mailbox(process_id=usda.id, follow=8)
    transfer.refresh_from_db()
    assert transfer.status == Message.PENDING and transfer.slot is None
    assert balance(usda, alice) == usda_before
    assert not Message.objects.filter(parent_id=transfer.msg_id).exists()

    monkeypatch.undo()
    assert drain_mailbox(process_id=usda.id, follow=8) == 6
    assert check_invariants() == []


@pytest.mark.parametrize("poke,error", [("Poke", "poke refused"),
                                        ("Doomed-Poke", "poke refused after dooming the transaction")])
def test_a_handler_that_raises_in_a_followed_drain_is_left_to_a_drain_of_its_own(
        test_process, wallet, settings, django_capture_on_commit_callbacks, poke, error):
    """The cascade is rolled back and run again without the failing drain (the first drain
    commits), and its process is rung; its own drain then answers the error as usual."""
    from processes.runtime.delivery import collecting_doorbells

    settings.TIM3_DOORBELL = "celery"  # rung doorbells go to the collector below, never a broker
    starter, refuser = test_process("starter"), test_process("refuser")
    alice = wallet()
    start = send_message(sender=alice, target=starter.id,
                         tags={"Action": "Start-Poke", "Other": refuser.id, "Poke": poke})

    with collecting_doorbells() as rung, django_capture_on_commit_callbacks(execute=True):
        assert drain_mailbox(process_id=starter.id, follow=8) == 1
    assert rung == {refuser.id}
    sent = Message.objects.get(parent_id=start.msg_id)
    assert (sent.action, sent.status, sent.slot) == (poke, Message.PENDING, None)
    start.refresh_from_db()
    assert (start.status, start.slot) == (Message.APPLIED, 1)

    with collecting_doorbells():
        drain_mailbox(process_id=refuser.id, follow=8)
    sent.refresh_from_db()
    assert (sent.status, sent.error, sent.slot) == (Message.FAILED, error, 1)
    run_until_idle()
    reply = Message.objects.get(parent_id=sent.msg_id)
    # Poke-Error's handler refuses too (and is not answered again); Doomed-Poke-Error has none (inbox).
    expected = {"Poke": (Message.FAILED, "cannot handle this error either"), "Doomed-Poke": (Message.APPLIED, "")}
    assert (reply.action, reply.status, reply.error) == (f"{poke}-Error", *expected[poke])
    assert slots_of(starter) == [1, 2] and slots_of(refuser) == [1]
    assert processes_with_pending() == []


@pytest.mark.django_db(transaction=True)
def test_following_skips_a_process_another_worker_holds_and_rings_it(system, wallet, settings):
    """A followed process is locked only if free (SKIP LOCKED): holding locks, a drain never
    waits for another, so two workers following cascades cannot deadlock."""
    if connection.vendor == "sqlite":
        pytest.skip("row locks (select_for_update skip_locked): this test runs on Postgres only")

    from processes.runtime.delivery import collecting_doorbells
    from processes.tasks import follow_cascade

    settings.TIM3_DOORBELL = "celery"
    usda, tim3, coordinator = system["usda"], system["tim3"], system["coordinator"]
    alice = wallet()
    faucet(usda, alice)
    send_message(sender=alice, target=usda.id,
                 tags={"Action": "Transfer", "Recipient": coordinator.id, "Quantity": str(UNIT)})
    with another_worker_holding(coordinator.id), collecting_doorbells() as rung:
        assert drain_mailbox(process_id=usda.id, follow=8) == 1  # the Transfer; the coordinator is busy
    assert rung == {coordinator.id}
    assert Message.objects.get(target=coordinator.id, action="Credit-Notice").status == Message.PENDING
    with collecting_doorbells():
        follow_cascade(rung, seconds=10)
    assert processes_with_pending() == []
    assert balance(tim3, alice) == UNIT
    assert check_invariants() == []
