"""The engine in scaled mode on the real stack: Postgres, Redis and separate
`celery -A tim3web worker` processes. Exactly once under concurrency, under
duplicate doorbells, under a worker killed mid-drain, and with a doorbell that
was never rung (the sweeper, from a real `celery beat`)."""

import asyncio
import random
import signal
import time
from collections import Counter, defaultdict
from functools import partial

import pytest
from django.db import connection

from processes.blueprints.state import TokenAccount, TokenState
from processes.runtime.delivery import send_message
from processes.runtime.ids import new_id
from processes.runtime.models import Message, Process
from processes.runtime.quantities import UNIT
from processes.services import bootstrap_system
from processes.tasks import drain, sweep
from tests.scaled.stack import broker_backlog, drains_run, in_threads, pending_count, report, verify_clean, wait_until_idle

pytestmark = [pytest.mark.scaled, pytest.mark.django_db(transaction=True)]

FAUCET = 100 * UNIT  # what each wallet asks the USDA faucet for
OVERDRAFT = 1_000_000 * UNIT  # more than the whole supply: always fails


# --- helpers ---------------------------------------------------------------------

def send_concurrently(jobs: list[tuple[str, str, dict]], *, threads: int = 8) -> list[Message]:
    """send_message for each (sender, target, tags), from `threads` threads at once."""
    return in_threads([partial(send_message, sender=sender, target=target, tags=tags) for sender, target, tags in jobs],
                      threads=threads)


def fund(usda: Process, wallets: list[str], scaled) -> dict[str, int]:
    """Each wallet asks the USDA faucet for FAUCET (concurrently); wait until applied."""
    send_concurrently([(w, usda.id, {"Action": "Mint", "Quantity": str(FAUCET)}) for w in wallets], threads=4)
    wait_until_idle(scaled)
    failed = list(Message.objects.filter(target=usda.id, action="Mint").exclude(status=Message.APPLIED))
    assert not failed, [(m.status, m.error) for m in failed]
    return {w: FAUCET for w in wallets}


def transfer_jobs(usda: Process, wallets: list[str], count: int, *, seed: int, overdrafts: int = 10):
    """`count` random transfers between the wallets, plus `overdrafts` that cannot succeed."""
    rng = random.Random(seed)
    jobs = []
    for _ in range(count):
        sender, recipient = rng.sample(wallets, 2)
        quantity = rng.randint(1, 45) * UNIT + rng.randint(0, UNIT - 1)
        jobs.append((sender, usda.id, {"Action": "Transfer", "Recipient": recipient, "Quantity": str(quantity)}))
    for _ in range(overdrafts):
        sender, recipient = rng.sample(wallets, 2)
        jobs.append((sender, usda.id, {"Action": "Transfer", "Recipient": recipient, "Quantity": str(OVERDRAFT)}))
    rng.shuffle(jobs)
    return jobs


def check_transfers(usda: Process, funded: dict[str, int], sent: list[Message]) -> tuple[int, int]:
    """Everything that exactly-once promises, checked against the database.

    Replays the transfers in slot order against a plain dict ledger: each must
    have succeeded exactly when its sender could pay at that point, and the
    live balances must equal the ledger's. Returns (applied, failed).
    """
    ids = [m.msg_id for m in sent]
    rows = list(Message.objects.filter(msg_id__in=ids))
    assert len(rows) == len(ids), "a sent message is missing"
    assert all(m.status != Message.PENDING and m.slot is not None for m in rows), "a transfer was never applied"
    ledger = dict(funded)
    applied = failed = 0
    for m in sorted(rows, key=lambda m: m.slot):
        quantity, recipient = int(m.get("Quantity")), m.get("Recipient")
        if ledger.get(m.sender, 0) >= quantity:
            assert m.status == Message.APPLIED, f"slot {m.slot}: {m.error}"
            ledger[m.sender] -= quantity
            ledger[recipient] = ledger.get(recipient, 0) + quantity
            applied += 1
        else:
            assert m.status == Message.FAILED, f"slot {m.slot}: overdraft applied"
            assert m.error.startswith("Insufficient balance"), m.error
            failed += 1

    live = dict(TokenAccount.objects.filter(process=usda).values_list("account", "balance"))
    assert {a: b for a, b in live.items() if b} == {a: b for a, b in ledger.items() if b}, "balances differ"
    assert min(live.values()) >= 0, "a balance is negative"
    token = TokenState.objects.get(process=usda)
    assert token.total_supply == sum(funded.values()) == sum(live.values()), "supply not conserved"

    # Each transfer was applied once: one slot each, and exactly one set of replies.
    children = defaultdict(list)
    for parent, action in Message.objects.filter(parent_id__in=ids).values_list("parent_id", "action"):
        children[parent].append(action)
    for m in rows:
        expected = ["Credit-Notice", "Debit-Notice"] if m.status == Message.APPLIED else ["Transfer-Error"]
        assert sorted(children[m.msg_id]) == expected, (m.msg_id, children[m.msg_id])
    credit_notices = Message.objects.filter(parent_id__in=ids, action="Credit-Notice", status=Message.APPLIED)
    assert credit_notices.count() == applied
    return applied, failed


def check_slots() -> None:
    """Every message to a process has exactly one slot; each process's slots are 1..n."""
    assert pending_count() == 0
    for process in Process.objects.all():
        slots = Counter(Message.objects.filter(target=process.id).values_list("slot", flat=True))
        assert None not in slots, f"{process.name}: a message has no slot"
        assert sorted(slots) == list(range(1, process.next_slot)), f"{process.name}: slots not gap-free"
        assert set(slots.values()) == {1}, f"{process.name}: a slot is used twice"


def open_write_transaction(service) -> tuple[int, str, float] | None:
    """(backend pid, xid, seconds open) if the worker holds an open write transaction."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, backend_xid::text, extract(epoch FROM now() - xact_start) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s AND backend_xid IS NOT NULL",
            [service.appname],
        )
        row = cursor.fetchone()
    return (row[0], row[1], float(row[2])) if row else None


def waits_on_frozen_client(service, *, xid: str) -> bool:
    """After SIGSTOP: Postgres holds `service`'s transaction `xid` and waits for it to say more
    ('idle in transaction', seen twice 20 ms apart, so nothing it sent before the stop is still
    buffered). Then no COMMIT can come until it runs again. False if `xid` ended first."""
    deadline = time.monotonic() + 5
    idle_seen = 0
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT state FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = %s AND backend_xid::text = %s", [service.appname, xid])
            row = cursor.fetchone()
        if row is None:
            return False
        idle_seen = idle_seen + 1 if row[0] == "idle in transaction" else 0
        if idle_seen == 2:
            return True
        time.sleep(0.02)  # a statement sent before the stop is still running
    return False


def backend_gone(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
        return cursor.fetchone()[0] == 0


# --- tests -------------------------------------------------------------------------

def test_concurrent_transfers_on_two_workers(scaled, request):
    workers = scaled.start_workers(2)
    usda = bootstrap_system(environment="test")["usda"]
    wallets = [new_id() for _ in range(20)]
    funded = fund(usda, wallets, scaled)

    jobs = transfer_jobs(usda, wallets, 400, seed=1)
    started = time.monotonic()
    sent = send_concurrently(jobs, threads=8)
    sending = time.monotonic() - started
    waited = wait_until_idle(scaled)

    applied, failed = check_transfers(usda, funded, sent)
    assert failed >= 10 and applied >= 100, (applied, failed)
    check_slots()
    verify_clean()
    per_worker = drains_run(workers)
    assert len(per_worker) == 2 and all(per_worker.values()), f"both workers should have drained: {per_worker}"
    report(request, f"{len(sent)} transfers ({applied} applied, {failed} failed) sent in {sending:.2f}s, "
                    f"all applied {waited:.2f}s later; drains per worker {sorted(per_worker.values())}")


def test_worker_killed_mid_drain_loses_and_duplicates_nothing(scaled, request, settings):
    batch = 200
    worker = scaled.start_worker(TIM3_DRAIN_BATCH=batch)
    usda = bootstrap_system(environment="test")["usda"]
    wallets = [new_id() for _ in range(20)]
    funded = fund(usda, wallets, scaled)

    # Queue 600 transfers without ringing, then ring once: one worker drains 200 per transaction.
    settings.TIM3_DOORBELL = "none"
    sent = send_concurrently(transfer_jobs(usda, wallets, 590, seed=2), threads=8)
    settings.TIM3_DOORBELL = "celery"
    assert pending_count() == len(sent) == 600
    drain.delay(usda.id)

    # Kill it in the middle of its drain transaction: open, written to (Postgres shows an xid),
    # some way into its batch, and still the same transaction after we counted what is pending.
    deadline = time.monotonic() + 60
    while True:
        assert worker.alive(), worker.log_tail()
        assert time.monotonic() < deadline, "never caught the worker inside a drain:\n" + worker.log_tail()
        seen = open_write_transaction(worker)
        if seen is None:
            time.sleep(0.002)
            continue
        time.sleep(0.01)  # let it apply part of the batch
        # Frozen, it cannot reach its COMMIT between our count and the kill (on a fast machine it did).
        worker.popen.send_signal(signal.SIGSTOP)
        if waits_on_frozen_client(worker, xid=seen[1]):
            in_flight = pending_count()
            now = open_write_transaction(worker)
            break
        worker.popen.send_signal(signal.SIGCONT)  # that transaction ended before the stop: catch the next
    pid, _, open_for = now
    scaled.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not backend_gone(pid):  # Postgres sees the socket close and rolls the transaction back
        assert time.monotonic() < deadline, "the killed worker's transaction is still open"
        time.sleep(0.05)
    left = pending_count()
    assert left == in_flight and left > 0, (in_flight, left)
    assert (len(sent) - left) % batch == 0, f"a partial batch was committed: {left} pending"
    assert broker_backlog() >= 1, "acks_late: the dead worker's doorbell should still be unacknowledged in Redis"

    # A fresh worker; the sweeper (as beat would) rings again for the doorbell the dead worker held.
    fresh = scaled.restart(worker)
    # (The dead worker's task stays unacked in Redis until its visibility timeout: ignore the broker.)
    waited = wait_until_idle(scaled, sweep_every=1.0, quiet_broker=False)

    applied, failed = check_transfers(usda, funded, sent)
    assert failed >= 10
    check_slots()
    verify_clean()
    report(request, f"SIGKILL {open_for * 1000:.0f} ms into a drain transaction, {left}/{len(sent)} still pending; "
                    f"{fresh.name} finished in {waited:.2f}s ({applied} applied, {failed} failed)")


def test_same_drain_enqueued_five_times_on_two_workers(scaled, request, settings):
    workers = scaled.start_workers(2, TIM3_DRAIN_BATCH=25)
    usda = bootstrap_system(environment="test")["usda"]
    wallets = [new_id() for _ in range(20)]
    funded = fund(usda, wallets, scaled)

    settings.TIM3_DOORBELL = "none"
    sent = send_concurrently(transfer_jobs(usda, wallets, 290, seed=3), threads=8)
    settings.TIM3_DOORBELL = "celery"
    before = drains_run(workers)
    for _ in range(5):
        drain.delay(usda.id)
    waited = wait_until_idle(scaled)

    applied, failed = check_transfers(usda, funded, sent)
    check_slots()
    verify_clean()
    after = drains_run(workers)
    ran = {node: after[node] - before.get(node, 0) for node in after}
    assert len(ran) == 2 and all(ran.values()), f"both workers should have run the drain: {ran}"
    report(request, f"{len(sent)} transfers, drain x5 on 2 workers (batch 25): drains run {sorted(ran.values())}, "
                    f"idle after {waited:.2f}s ({applied} applied, {failed} failed)")


def subscribe_hops() -> tuple:
    """A channel on the real Redis channel layer, in the group every hop event goes to."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from tim3web.events import ALL_HOPS

    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(ALL_HOPS, channel)
    return layer, channel


def receive_hops(layer, channel, *, flow: str, actions: set[str], timeout: float = 20.0) -> dict[str, dict]:
    """Hop events of `flow` (by action) until all `actions` were seen."""
    from asgiref.sync import async_to_sync

    async def collect():
        seen, deadline = {}, time.monotonic() + timeout
        while not actions <= seen.keys():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                message = await asyncio.wait_for(layer.receive(channel), remaining)
            except TimeoutError:
                break
            for event in message["events"]:  # one batch per publish (tim3web.events)
                if event["type"] == "hop" and event["flow"] == flow:
                    seen[event["message"]["action"]] = event["message"]
        return seen

    return async_to_sync(collect)()


def _send_without_doorbell(settings, usda: Process) -> tuple[str, str, list[Message]]:
    """A committed mint and transfer whose doorbells never rang (a crash right after commit)."""
    wait_until_idle()  # no doorbell of the bootstrap still on its way
    payer, payee = new_id(), new_id()
    settings.TIM3_DOORBELL = "none"
    sent = [
        send_message(sender=payer, target=usda.id, tags={"Action": "Mint", "Quantity": str(FAUCET)}),
        send_message(sender=payer, target=usda.id, tags={"Action": "Transfer", "Recipient": payee, "Quantity": "7"}),
    ]
    settings.TIM3_DOORBELL = "celery"
    return payer, payee, sent


def _check_delivered(usda: Process, payer: str, payee: str, sent: list[Message]) -> None:
    for msg in sent:
        msg.refresh_from_db()
        assert msg.status == Message.APPLIED, (msg.action, msg.status, msg.error)
    balances = dict(TokenAccount.objects.filter(process=usda).values_list("account", "balance"))
    assert balances == {payer: FAUCET - 7, payee: 7}
    check_slots()
    verify_clean()


def test_sweep_task_rings_a_lost_doorbell(scaled, request, settings):
    scaled.start_worker(TIM3_SWEEP_AFTER_MS=500)
    usda = bootstrap_system(environment="test")["usda"]
    layer, channel = subscribe_hops()
    payer, payee, sent = _send_without_doorbell(settings, usda)
    time.sleep(1.0)
    assert pending_count() == 2, "nothing rang, so nothing may have been delivered yet"

    started = time.monotonic()
    sweep.delay()  # what celery beat enqueues
    wait_until_idle(scaled, timeout=60)
    _check_delivered(usda, payer, payee, sent)

    # The worker published each settled message as a hop event on the Redis channel layer.
    transfer = sent[1]
    hops = receive_hops(layer, channel, flow=transfer.msg_id, actions={"Transfer", "Debit-Notice", "Credit-Notice"})
    assert hops.keys() == {"Transfer", "Debit-Notice", "Credit-Notice"}, f"hop events seen: {sorted(hops)}"
    assert hops["Transfer"]["status"] == "applied" and hops["Transfer"]["slot"] == transfer.slot
    report(request, f"sweep task delivered the lost messages in {time.monotonic() - started:.2f}s")


def test_celery_beat_sweeps_lost_doorbells(scaled, request, settings):
    scaled.start_worker(TIM3_SWEEP_AFTER_MS=500)
    beat = scaled.start_beat(TIM3_SWEEP_SECONDS=1)
    usda = bootstrap_system(environment="test")["usda"]
    started = time.monotonic()
    payer, payee, sent = _send_without_doorbell(settings, usda)

    waited = wait_until_idle(scaled, timeout=60)
    assert beat.alive(), beat.log_tail()
    _check_delivered(usda, payer, payee, sent)
    report(request, f"celery beat (every 1s) delivered messages sent without a doorbell in {waited:.2f}s "
                    f"({time.monotonic() - started:.2f}s after the send)")
