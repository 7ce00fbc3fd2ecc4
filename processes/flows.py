"""Flows: a user's request and everything it caused, with one status.

A flow's id is the id of the user's first message (every later hop carries it
as Pushed-For). Its status is updated inside the same transaction that applies
the message deciding it, so it is never out of step with the message log.
"""

from django.db import models, transaction
from django.dispatch import Signal
from django.utils import timezone

from processes.blueprints.state import Operation
from processes.runtime import sql
from processes.runtime.delivery import send_message
from processes.runtime.models import Message

# Sent after commit with `flows=[Flow, ...]` that just ended.
flows_ended = Signal()

FINAL_STATUSES = ("completed", "refunded", "failed")


class Flow(models.Model):
    PENDING, COMPLETED, REFUNDED, FAILED = "pending", "completed", "refunded", "failed"
    STATUSES = [(s, s) for s in (PENDING, COMPLETED, REFUNDED, FAILED)]
    KINDS = [(k, k) for k in ("deposit", "redeem", "faucet", "transfer", "other")]

    id = models.CharField(primary_key=True, max_length=43)
    kind = models.CharField(max_length=10, choices=KINDS)
    mode = models.CharField(max_length=8, blank=True)  # deposit (v2) | lock (v1)
    user = models.CharField(max_length=43, db_index=True)
    target = models.CharField(max_length=43)  # the process the first message went to
    quantity = models.BigIntegerField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=STATUSES, default=PENDING)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["user", "-created_at"], name="flow_user_recent")]

    def __str__(self) -> str:
        return f"{self.kind} {self.id[:8]}… {self.status}"


def start_flow(*, user: str, target: str, kind: str, tags: dict, mode: str = "", quantity: int | None = None) -> Flow:
    """Send the user's first message and open its flow, in one transaction."""
    # No savepoint inside a caller's transaction (the API's): two round trips per request.
    # An error in here marks the caller's transaction for rollback instead of rolling back
    # to a savepoint; every caller lets it propagate, and the rollback undoes both rows.
    with transaction.atomic(savepoint=False):
        msg = send_message(sender=user, target=target, tags=tags)
        flow = Flow(id=msg.msg_id, kind=kind, mode=mode, user=user, target=target, quantity=quantity)
        sql.insert_row(flow)  # sets created_at (auto_now_add), as create() does
        return flow


def _decision(msg: Message, flow: Flow) -> tuple[str, str] | None:
    """(status, error) if this message decides the flow."""
    if msg.target == flow.user and msg.status == Message.APPLIED:
        status = msg.get("Flow-Status")
        if status in FINAL_STATUSES:
            return status, msg.get("Error") or msg.get("Reason") or ""
        if flow.kind == "faucet" and msg.action == "Mint-Response":
            return Flow.COMPLETED, ""
        if flow.kind == "transfer" and msg.action == "Debit-Notice":
            return Flow.COMPLETED, ""
        if flow.kind == "other" and msg.action.endswith("-Response") and msg.parent_id == flow.id:
            return Flow.COMPLETED, ""
    if msg.msg_id == flow.id and msg.status == Message.FAILED:
        return Flow.FAILED, msg.error
    return None


def _may_decide(msg: Message) -> bool:
    """Cheap filter before any query: every decision is a message delivered to a
    wallet (slot None) of a deciding kind, or a flow's first message failing."""
    if msg.status == Message.FAILED:
        return msg.msg_id == msg.pushed_for
    return msg.slot is None and msg.status == Message.APPLIED and bool(
        msg.get("Flow-Status") or msg.action.endswith("-Response") or msg.action == "Debit-Notice")


def _flow_ids(messages: list[Message]) -> dict[str, str]:
    """The flow each message belongs to: its cascade's root (Pushed-For), except for
    a coordinator's final word sent from another cascade. A timed-out operation is
    compensated in the cascade of the `CleanupExpired` tick, so its
    `Deposit-Refunded` (etc.) has that tick as Pushed-For; the operation it names
    (`Operation-Id`, looked up in the sending coordinator) knows the user's flow.
    One query for the whole batch."""
    named = {(m.sender, m.get("Operation-Id")) for m in messages if m.get("Flow-Status") and m.get("Operation-Id")}
    owners: dict[tuple[str, str], str] = {}
    if named:
        senders, op_ids = sorted({p for p, _ in named}), sorted({o for _, o in named})
        found = sql.select_rows(Operation, params=[*senders, *op_ids], where=(  # the (process, op_id) index
            f"process_id IN ({', '.join(['%s'] * len(senders))}) AND op_id IN ({', '.join(['%s'] * len(op_ids))})"))
        owners = {(op.process_id, op.op_id): op.flow_id for op in found}
    return {m.msg_id: owners.get((m.sender, m.get("Operation-Id")), m.pushed_for) for m in messages}


def track_flows(sender, messages, **kwargs) -> None:
    """messages_applied receiver: settle the flows these messages decide."""
    deciding = [m for m in messages if _may_decide(m)]
    if not deciding:
        return
    flow_ids = _flow_ids(deciding)
    ids = sorted(set(flow_ids.values()))
    flows = {f.id: f for f in sql.select_rows(Flow, where=f"id IN ({', '.join(['%s'] * len(ids))}) AND status = %s",
                                               params=[*ids, Flow.PENDING])}
    ended = []
    for msg in deciding:
        flow = flows.get(flow_ids[msg.msg_id])
        if flow is None or flow.status != Flow.PENDING:
            continue
        decision = _decision(msg, flow)
        if decision:
            flow.status, flow.error = decision
            flow.ended_at = timezone.now()
            sql.update_columns(flow, "status", "error", "ended_at")  # inside a drain: sent with its writes
            ended.append(flow)
    if ended:
        transaction.on_commit(lambda: flows_ended.send(sender=Flow, flows=ended))
