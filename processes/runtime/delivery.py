"""Delivery: the database is the mailbox, the doorbell only says "look".

- `send_message` inserts a pending row (a cascade's first message).
- `drain_mailbox` applies one process's pending messages in arrival order,
  one savepoint each, assigns gap-free slots, writes the outgoing messages in
  the same transaction, and after commit rings the targets' doorbells.
- A doorbell with nothing pending does nothing, so duplicate or late doorbells
  are harmless; `sweep_mailboxes` re-rings forgotten ones.
"""

import logging
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

from django.conf import settings
from django.db import DataError, IntegrityError, InterfaceError, OperationalError, connection, transaction

from processes.runtime import sql
from processes.runtime.context import Context, Outgoing
from processes.runtime.handlers import HandlerError
from processes.runtime.ids import derive_id, is_id, new_id, now_ms
from processes.runtime.models import Message, Process, Wallet
from processes.runtime.registry import get_blueprint
from processes.runtime.signals import messages_applied, messages_settled
from processes.runtime.tags import TagError, encode_data, normalize_tags, validate_data, validate_tags

log = logging.getLogger(__name__)


# --- doorbell -------------------------------------------------------------------

_local = threading.local()


@contextmanager
def collecting_doorbells():
    """Inside a worker's drain: collect the doorbells instead of enqueueing them,
    so the worker can follow the cascade itself (no broker round trip per hop).
    Whatever it does not get to is rung for real afterwards; if it dies first,
    the sweeper rings them (the messages are safe in the database)."""
    previous = getattr(_local, "collector", None)
    _local.collector = collected = set()
    try:
        yield collected
    finally:
        _local.collector = previous


def ring_doorbells(process_ids) -> None:
    """Wake the drainers of these processes (called after commit)."""
    process_ids = sorted(set(process_ids))
    if not process_ids or settings.TIM3_DOORBELL == "none":
        return
    collector = getattr(_local, "collector", None)
    if collector is not None:
        collector.update(process_ids)
        return
    from processes.doorbell import ring  # the broker; imported late to keep the engine free of it

    try:
        ring(process_ids)
    except Exception:  # the sweeper will ring again; the messages are safe in the database
        log.exception("could not ring doorbells for %s", ", ".join(process_ids))


def _after_commit(settled: list[Message], wake: set[str]) -> None:
    ring_doorbells(wake)
    if settled:
        messages_settled.send(sender=Message, messages=settled)


# --- sending --------------------------------------------------------------------

class ProcessBusy(Exception):
    """Another drainer holds the process's lock (drain_mailbox(wait=False))."""


def lock_process(process_id: str, *, wait: bool = True) -> Process:
    qs = Process.objects
    if connection.features.has_select_for_update:
        # no_key: messages referencing the row do not wait on us.
        qs = qs.select_for_update(no_key=connection.features.has_select_for_no_key_update,
                                  skip_locked=not wait and connection.features.has_select_for_update_skip_locked)
    try:
        return qs.get(pk=process_id)
    except Process.DoesNotExist:
        raise _not_locked(process_id, wait=wait) from None


def _not_locked(process_id: str, *, wait: bool) -> Exception:
    """Why locking found no row: another drainer holds it (SKIP LOCKED), or there is no such process."""
    if not wait and Process.objects.filter(pk=process_id).exists():
        return ProcessBusy(process_id)
    return Process.DoesNotExist(process_id)


def _next_wallet_reference(address: str) -> int:
    """Take the wallet's next reference in one statement (UPDATE ... RETURNING): its row
    lock orders concurrent sends from one wallet. A wallet's first message creates its row."""
    take = partial(sql.update_value, Wallet, set="next_reference = next_reference + 1", where="address = %s",
                   returning="next_reference - 1", params=[address])
    reference = take()
    if reference is None:
        # ON CONFLICT DO NOTHING: a concurrent first send may create it too, and no savepoint is needed.
        sql.insert_row(Wallet(address=address), unless_exists=("address",))
        reference = take()
    return reference


def send_message(*, sender: str, target: str, tags, data="", validate: bool = True) -> Message:
    """Start a cascade: a message from a wallet (user, operator, scheduler) to a process.

    Validates what a wallet may send and raises TagError / LookupError with a
    clear sentence; on success the message is pending and its doorbell rings
    after commit.
    """
    tag_list = normalize_tags(tags)
    data = encode_data(data)
    if validate:
        validate_tags(tag_list)
        validate_data(data)
        if not is_id(sender):
            raise TagError("From must be a 43-character wallet address.")
    # Both checks in one query, before the transaction: a refusal leaves the caller's
    # transaction usable (tests and callers catch it and go on).
    processes = {p.id for p in sql.select_rows(Process, where="id IN (%s, %s)", params=[target, sender])}
    if target not in processes:
        raise LookupError(f"No process with id {target[:50]!r}.")
    if sender in processes:
        raise TagError("A wallet message cannot claim to come from a process.")
    # No savepoint inside a caller's transaction (two round trips): if a write below fails,
    # the caller's transaction is doomed anyway and its rollback undoes everything.
    with transaction.atomic(savepoint=False):
        msg_id = new_id()
        msg = Message(
            msg_id=msg_id,
            sender=sender,
            target=target,
            action=dict(tag_list).get("Action", ""),
            tags=tag_list,
            data=data,
            timestamp=now_ms(),
            reference=_next_wallet_reference(sender),
            pushed_for=msg_id,  # a cascade's first message is its own root
        )
        sql.insert_row(msg)
        transaction.on_commit(partial(ring_doorbells, [target]))
    return msg


def spawn_process(*, name: str, kind: str, owner: str, tags=None, version: int = 1, active: bool = True) -> Process:
    """Create a process and send it its `Spawn` message (slot 1), from its owner.

    The Spawn message carries the initial configuration, so the process's
    whole state can be rebuilt from its message log.
    """
    get_blueprint(kind)  # fail early on an unknown kind
    with transaction.atomic():
        process = Process.objects.create(
            id=derive_id("process", name, version, new_id()), name=name, kind=kind, owner=owner,
            version=version, active=active,
        )
        send_message(sender=owner, target=process.id, tags={"Action": "Spawn", "Name": name, **dict(normalize_tags(tags))})
    return process


# --- applying -------------------------------------------------------------------

def _describe(exc: Exception) -> str:
    if isinstance(exc, (HandlerError, ValueError, LookupError)) and str(exc):
        return str(exc)
    return f"Internal error: {type(exc).__name__}: {exc}"


def _error_reply(msg: Message, error: str) -> list[Outgoing]:
    """`<Action>-Error` to the sender, so no flow waits forever (SPEC §1).

    Never for a message that is itself an error reply: two failing processes
    must not bounce errors forever.
    """
    if msg.action.endswith("-Error"):
        return []
    ctx = Context(process=None, msg=msg)
    ctx.reply({"Action": f"{msg.action or 'Message'}-Error", "Error": error, "Message-Id": msg.msg_id})
    return ctx.outbox


class HandlerRaised(Exception):
    """A handler raised while its drain ran without savepoints: redo the batch with them."""


class FollowedDrainFailed(Exception):
    """A drain followed inside the transaction failed: redo the cascade, stopping before it."""

    def __init__(self, *, before: int):
        super().__init__(before)
        self.before = before  # how many followed drains came before the one that failed


def run_handler(*, process: Process, msg: Message, blueprint, batch: dict | None = None,
                savepoint: bool = True, memo: dict | None = None) -> tuple[str, str, bool, Context]:
    """Run the matching handler inside a savepoint: (status, error, handled, ctx).

    A handler that raises leaves no trace but the error (its savepoint is rolled
    back and its outbox discarded). Shared by delivery and replay.

    Except the database's own trouble (OperationalError, InterfaceError: a lost
    connection, a lock or statement timeout, a deadlock or serialization
    victim): that is not the message's failure and would not happen on replay,
    so it propagates, the whole drain rolls back and the task retries it.

    `savepoint=False` (drain_mailbox's first try): no savepoint, and a handler
    that raises raises HandlerRaised, so the caller rolls everything back.
    """
    ctx = Context(process=process, msg=msg, batch=batch if batch is not None else {},
                  memo=memo if memo is not None else {})
    handler = blueprint.handlers.match(msg)
    if handler is None:
        return Message.APPLIED, "", False, ctx  # lands in the inbox
    if not savepoint:
        try:
            handler.handle(msg, ctx)
        except (OperationalError, InterfaceError):
            raise
        except Exception as exc:
            raise HandlerRaised from exc
        return Message.APPLIED, "", True, ctx
    try:
        with transaction.atomic():
            handler.handle(msg, ctx)
    except (OperationalError, InterfaceError):
        raise
    except Exception as exc:  # noqa: BLE001 - any handler failure is the message's failure
        error = _describe(exc)
        if not isinstance(exc, (HandlerError, ValueError, LookupError)):
            log.warning("handler %s of %s failed on %s", handler.name, process.name, msg.msg_id, exc_info=True)
        failed = Context(process=process, msg=msg)
        failed.outbox = _error_reply(msg, error)
        return Message.FAILED, error, True, failed
    return Message.APPLIED, "", True, ctx


def outgoing_rows(*, process: Process, msg: Message, outbox: list[Outgoing], now: int) -> list[Message]:
    """Message rows for what a handler sent; ids derive from the parent's id."""
    rows = []
    for index, out in enumerate(outbox, start=1):
        reference = process.next_reference
        process.next_reference += 1
        rows.append(
            Message(
                msg_id=out.msg_id or derive_id(msg.msg_id, index),
                sender=process.id,
                target=out.target,
                action=dict(out.tags).get("Action", ""),
                tags=out.tags,
                data=out.data,
                timestamp=now,
                reference=reference,
                x_reference=out.x_reference,
                pushed_for=msg.pushed_for,
                parent_id=msg.msg_id,
            )
        )
    return rows


# Which addresses are processes. Both answers are final: processes are never
# deleted, and a wallet address never becomes a process id (ids are fresh and
# random; a test's rolled-back process id is never used again), so each address
# is looked up once per worker. Bounded: cleared when full.
_is_process: dict[str, bool] = {}
_IS_PROCESS_MAX = 100_000


def _deliver_to_wallets(rows: list[Message], now: int) -> None:
    """A wallet has no handlers: a message to it is delivered as it is written."""
    known = {row.target: _is_process.get(row.target) for row in rows}  # a local copy: the cache may be cleared
    unknown = [address for address, is_process in known.items() if is_process is None]
    if unknown:
        found = set(Process.objects.filter(pk__in=unknown).values_list("id", flat=True))
        if len(_is_process) > _IS_PROCESS_MAX:
            _is_process.clear()
        for address in unknown:
            known[address] = _is_process[address] = address in found
    for row in rows:
        if not known[row.target]:
            row.status = Message.APPLIED
            row.applied_at = now


_APPLY_FIELDS = ("slot", "status", "error", "handled", "applied_at", "result")

@dataclass
class Drained:
    """One process's batch, applied in memory: what `write_statements` will write."""

    process: Process
    applied: list[Message]
    outgoing: list[Message]
    full: bool  # the batch was full: more may be waiting

    @property
    def settled(self) -> list[Message]:
        """The hops this batch settled: its messages, then what it delivered to wallets."""
        return self.applied + [row for row in self.outgoing if row.status != Message.PENDING]

    def woken(self, wake: set[str]) -> None:
        """Update the set of processes with work waiting, as far as this transaction knows."""
        if self.full:
            wake.add(self.process.id)
        else:
            wake.discard(self.process.id)  # its mailbox was emptied (it may get more below)
        wake.update(row.target for row in self.outgoing if row.status == Message.PENDING)


def write_statements(drained: Drained) -> list[sql.Statement]:
    """What a drain writes: the applied messages' outcome, the messages they sent,
    and the process's counters. None needs an answer (the new rows' seq is never
    read back), so they go out in a psycopg pipeline with the next statements
    (Django's bulk_update builds a CASE per row and field, which took longer than
    the handlers; bulk_create and save would each wait for their own answer)."""
    statements = []
    for rows in ([sql.update_statement(m, *_APPLY_FIELDS) for m in drained.applied],
                 [sql.insert_statement(m) for m in drained.outgoing]):
        if rows:  # one text per kind: the same fields of the same table
            statements.append(sql.Statement(rows[0][0], [params for _, params in rows], many=True))
    return [*statements, sql.Statement(*sql.update_statement(drained.process, "next_slot", "next_reference"))]


def drain_mailbox(*, process_id: str, batch_size: int | None = None, wait: bool = True, follow: int = 0) -> int:
    """Apply the process's pending messages in arrival order; return how many.

    Everything happens in one transaction under the process row lock: slots,
    state changes, statuses and outgoing messages commit together or not at all.
    With `wait=False`, raise ProcessBusy instead of waiting for another drainer.

    With `follow=N`, the same transaction goes on into the processes this drain
    woke, up to N more drains and about one batch of messages in all (a worker
    following a cascade: one commit for several hops instead of one per hop).
    It only takes processes no one else holds (SKIP LOCKED), so it never waits
    while holding a lock and cannot deadlock; what it leaves is rung after commit.
    The count returned is then the transaction's total.

    A savepoint per message costs two round trips, and handlers rarely raise;
    so the batch first runs without them, and if a handler raises the whole
    transaction is rolled back and the batch runs again with them (handlers
    are deterministic: the second run sees exactly what the first did).
    """
    batch_size = batch_size or settings.TIM3_DRAIN_BATCH
    while True:
        try:
            return _drain(process_id=process_id, batch_size=batch_size, savepoints=False, wait=wait, follow=follow)
        except (HandlerRaised, IntegrityError, DataError):
            # IntegrityError, DataError: a constraint refused a write, maybe one a handler queued
            # (sql.writing_later) and that failed later. With savepoints each write is immediate,
            # so it fails inside its own handler (or, if it was the drain's, raises again here).
            return _drain(process_id=process_id, batch_size=batch_size, savepoints=True, wait=wait, follow=0)
        except FollowedDrainFailed as failed:
            follow = failed.before  # fewer each time: the loop ends


_kinds: dict[str, str] = {}  # process id -> kind, learned from the locks taken (a process's kind never changes)


def open_mailbox(*, process_id: str, batch_size: int, wait: bool = True, before: list[sql.Statement] = (),
                 memo: dict | None = None) -> tuple[Process, list[Message]]:
    """Lock the process and read its pending messages, oldest first.

    On Postgres both statements (and the transaction's BEGIN, and the `before`
    statements: a previous drain's writes) go out in one psycopg pipeline: one
    round trip, where the ORM took three and spent more time building the
    queries than Postgres spent answering them. The server runs them in order,
    so the messages are read after the lock is held and the writes are done.
    Raises Process.DoesNotExist, or ProcessBusy (wait=False, locked by another).
    """
    # The status is written into the text, not passed: a prepared statement's generic plan can then
    # use the partial index of pending messages (with a parameter only a per-call plan can).
    pending_sql = sql.select_statement(Message, where=f"target = %s AND status = '{Message.PENDING}'",
                                       order_by="seq", limit=batch_size)
    if connection.vendor != "postgresql":
        # No row locks here (SQLite: the database's one writer orders drains); the same
        # statements without the ORM, whose query building cost more than SQLite's answer.
        sql.send(before)
        process = sql.select_one(Process, where="id = %s", params=[process_id])
        if process is None:
            raise Process.DoesNotExist(process_id)
        with connection.cursor() as cursor:
            cursor.execute(pending_sql, [process_id])
            return process, sql.instances(Message, cursor.fetchall())
    lock_sql = sql.select_statement(Process, where="id = %s", lock="FOR NO KEY UPDATE" + ("" if wait else " SKIP LOCKED"))
    # The state row its handlers will read first (own_state), read after the lock in the same
    # round trip, when this transaction has not read it yet (memo) and the process's kind is known.
    kind = _kinds.get(process_id)
    state_model = get_blueprint(kind).own_state if kind and memo is not None else None
    if state_model is not None and state_model._meta.label in memo:
        state_model = None
    with connection.cursor() as lock_cursor, connection.cursor() as pending_cursor, \
            connection.cursor() as state_cursor:
        with sql.pipeline():
            check = sql.execute_all(before)
            lock_cursor.execute(lock_sql, [process_id])
            pending_cursor.execute(pending_sql, [process_id])
            if state_model is not None:
                state_cursor.execute(sql.select_statement(state_model, where="process_id = %s"), [process_id])
        check()
        found = sql.instances(Process, lock_cursor.fetchall())
        pending = sql.instances(Message, pending_cursor.fetchall())
        state = sql.instances(state_model, state_cursor.fetchall()) if state_model is not None else []
    if not found:
        raise _not_locked(process_id, wait=wait)  # the state read is dropped: it was not under our lock
    _kinds[process_id] = found[0].kind
    if state:  # none: own_state reads again and refuses with the blueprint's own words
        memo[state_model._meta.label] = state[0]
    return found[0], pending


def apply_batch(*, process: Process, pending: list[Message], batch_size: int, savepoints: bool,
                memo: dict | None) -> Drained:
    """Run the handlers of one process's pending messages, in memory: slots,
    statuses, results and outgoing rows (written by `write_statements`)."""
    blueprint = get_blueprint(process.kind)
    outgoing: list[Message] = []
    batch: dict[str, Message] = {}
    for msg in pending:
        now = now_ms()
        status, error, handled, ctx = run_handler(process=process, msg=msg, blueprint=blueprint, batch=batch,
                                                  savepoint=savepoints, memo=memo)
        children = outgoing_rows(process=process, msg=msg, outbox=ctx.outbox, now=now)
        msg.slot = process.next_slot
        process.next_slot += 1
        msg.status, msg.error, msg.handled, msg.applied_at = status, error, handled, now
        msg.result = {"messages": [c.msg_id for c in children], "changes": ctx.changes}
        outgoing.extend(children)
        batch[msg.msg_id] = msg
    _deliver_to_wallets(outgoing, now_ms())
    return Drained(process=process, applied=pending, outgoing=outgoing, full=len(pending) == batch_size)


def _drain(*, process_id: str, batch_size: int, savepoints: bool, wait: bool, follow: int) -> int:
    # Without savepoints the handlers' state saves are queued and sent with the next statement
    # (sql.writing_later); with them, each save is immediate and fails inside its own handler.
    with transaction.atomic(), (nullcontext() if savepoints else sql.writing_later()):
        # Memoized state rows (Context.memo), per process: shared by all its batches in this
        # transaction while no savepoints are used (a handler that raises rolls them back with the rest).
        memos = {process_id: None if savepoints else {}}
        try:
            process, pending = open_mailbox(process_id=process_id, batch_size=batch_size, wait=wait,
                                            memo=memos[process_id])
        except Process.DoesNotExist:
            return 0
        if not pending:
            return 0
        drained = [apply_batch(process=process, pending=pending, batch_size=batch_size, savepoints=savepoints,
                               memo=memos[process_id])]
        wake: set[str] = set()
        drained[0].woken(wake)
        unwritten = sql.take_later() + write_statements(drained[0])
        if follow:
            unwritten = _follow_in_transaction(drained, wake=wake, memos=memos, unwritten=unwritten,
                                               batch_size=batch_size, drains=follow)
        sql.send(unwritten)
        settled = [hop for d in drained for hop in d.settled]
        # Registered first so, after commit, the hop events go out before the `flows_ended`
        # its receivers (track_flows) register: a flow's end follows its last hop.
        transaction.on_commit(partial(_after_commit, settled, wake))
        messages_applied.send(sender=Message, messages=settled)
    return sum(len(d.applied) for d in drained)


def _follow_in_transaction(drained: list[Drained], *, wake: set[str], memos: dict, unwritten: list[sql.Statement],
                           batch_size: int, drains: int) -> list[sql.Statement]:
    """Drain the woken processes inside the current transaction (see drain_mailbox).

    Each followed drain's lock and read go out with the previous drain's writes
    in one round trip. If a handler raises there (or anything but the database's
    own trouble), FollowedDrainFailed rolls the transaction back and drain_mailbox
    runs the cascade again, stopping before that drain, whose process is then rung
    for a drain of its own, where the usual rules apply (redo with savepoints,
    `<Action>-Error`, dead letters). Handlers are deterministic, so the redo does
    what the first run did. No savepoint per followed drain: in a subtransaction
    every foreign-key check on a row the transaction already locked creates a
    MultiXact, which cost Postgres four times the CPU per hop.
    Returns the writes still to send.
    """
    busy: set[str] = set()
    applied = len(drained[0].applied)
    for number in range(1, drains + 1):
        target = next((p for p in sorted(wake) if p not in busy), None)
        if target is None or applied >= batch_size:
            break
        before, unwritten = unwritten, []  # sent with this lock, whatever it answers
        try:
            process, pending = open_mailbox(process_id=target, batch_size=batch_size, wait=False, before=before,
                                            memo=memos.setdefault(target, {}))
        except ProcessBusy:
            busy.add(target)
            continue
        except Process.DoesNotExist:  # never a target of a pending message; be safe
            wake.discard(target)
            continue
        if not pending:
            wake.discard(target)
            continue
        try:
            batch = apply_batch(process=process, pending=pending, batch_size=batch_size, savepoints=False,
                                memo=memos.setdefault(target, {}))
        except (OperationalError, InterfaceError):
            raise
        except Exception as exc:  # HandlerRaised, or a bug: not this transaction's business
            raise FollowedDrainFailed(before=number - 1) from exc
        drained.append(batch)
        batch.woken(wake)
        applied += len(batch.applied)
        unwritten = sql.take_later() + write_statements(batch)
    return unwritten


def record_drain_failure(*, process_id: str, error: str) -> Message | None:
    """Count a failed drain against the head message; dead-letter it after N.

    Called when draining raised outside any handler (a bug or a poisoned
    message). A dead message gets its slot, status `failed`, `dead=True`, and
    its sender an `<Action>-Error`, so the queue behind it moves on.
    """
    with transaction.atomic():
        process = lock_process(process_id)
        head = Message.objects.filter(target=process.id, status=Message.PENDING).order_by("seq").first()
        if head is None:
            return None
        head.attempts += 1
        if head.attempts < settings.TIM3_MAX_ATTEMPTS:
            head.save(update_fields=["attempts"])
            return head
        now = now_ms()
        text = f"Dead-lettered after {head.attempts} failed attempts: {error}"[:2000]
        children = outgoing_rows(process=process, msg=head, outbox=_error_reply(head, text), now=now)
        _deliver_to_wallets(children, now)
        head.slot, process.next_slot = process.next_slot, process.next_slot + 1
        head.status, head.error, head.dead, head.applied_at = Message.FAILED, text, True, now
        head.result = {"messages": [c.msg_id for c in children], "changes": []}
        head.save()
        Message.objects.bulk_create(children)
        process.save(update_fields=["next_slot", "next_reference"])
        wake = {c.target for c in children if c.status == Message.PENDING} | {process.id}
        settled = [head, *[c for c in children if c.status != Message.PENDING]]
        transaction.on_commit(partial(_after_commit, settled, wake))  # before flows_ended (see drain_mailbox)
        messages_applied.send(sender=Message, messages=settled)
        return head


def processes_with_pending(*, older_than_ms: int = 0) -> list[str]:
    qs = Message.objects.filter(status=Message.PENDING)
    if older_than_ms:
        qs = qs.filter(timestamp__lt=now_ms() - older_than_ms)
    return sorted(set(qs.values_list("target", flat=True)))


def sweep_mailboxes(*, older_than_ms: int | None = None) -> list[str]:
    """Re-ring doorbells for messages pending longer than a doorbell should take."""
    older = settings.TIM3_SWEEP_AFTER_MS if older_than_ms is None else older_than_ms
    targets = processes_with_pending(older_than_ms=older)
    ring_doorbells(targets)
    return targets


def run_until_idle(*, max_rounds: int = 10_000) -> int:
    """Drain every mailbox in this thread until nothing is pending; return messages applied.

    The same drain the workers run, driven directly: for tests and the console.
    """
    total = 0
    for _ in range(max_rounds):
        targets = processes_with_pending()
        if not targets:
            return total
        for process_id in targets:
            total += drain_mailbox(process_id=process_id)
    raise RuntimeError("messages still pending after max_rounds drains")
