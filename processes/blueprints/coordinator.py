"""Coordinator: orchestrates the four flows of SPEC §4.

Every request opens an `Operation` whose id (the request's message id) rides
on every hop as `X-Operation-Id`. An operation is a small state machine: its
`step` says which answer it waits for; each success reply moves it forward
(`advance`), each error reply compensates (`fail_step`). Nothing is matched
by amount. The books (custody, collateral, outstanding) keep every mint
backed; a database constraint refuses any state where they are not.

Steps: checking -> minting -> recording -> done (v2 deposit)
       burning -> paying -> recording -> done (v2 redeem)
       locking -> minting -> recording -> done (v1 lock mint)
       burning -> unlocking -> recording -> done (v1 burn)
       compensation: refunding, unlocking, reminting
"""

from dataclasses import dataclass

from django.db.models import Sum

from processes.blueprints.state import CoordinatorPosition, CoordinatorRole, CoordinatorState, Operation
from processes.runtime import sql
from processes.runtime.builtins import message_status
from processes.runtime.handlers import HandlerError, Handlers, own_state
from processes.runtime.ids import is_id
from processes.runtime.models import Message
from processes.runtime.quantities import format_units, parse_quantity
from processes.runtime.registry import Blueprint, register_blueprint

handlers = Handlers()

SUCCESS_ACTION = {
    Operation.DEPOSIT: "Deposit-Complete", Operation.REDEEM: "Redeem-Complete",
    Operation.LOCK_MINT: "MintTIM3-Response", Operation.BURN: "BurnTIM3-Response",
}
REFUNDED_ACTION = {
    Operation.DEPOSIT: "Deposit-Refunded", Operation.REDEEM: "Redeem-Refunded",
    Operation.LOCK_MINT: "MintTIM3-Refunded", Operation.BURN: "BurnTIM3-Refunded",
}
FAILED_ACTION = {
    Operation.DEPOSIT: "Deposit-Failed", Operation.REDEEM: "Redeem-Failed",
    Operation.LOCK_MINT: "MintTIM3-Failed", Operation.BURN: "BurnTIM3-Failed",
}
COLLATERAL_TYPE = {
    Operation.DEPOSIT: "USDA-custody", Operation.REDEEM: "USDA-custody",
    Operation.LOCK_MINT: "USDA-locked", Operation.BURN: "USDA-locked",
}
PROCESS_FIELDS = {
    "usda": "usda_process", "tim3": "tim3_process", "token-manager": "tim3_process",
    "lock-manager": "lock_manager_process", "state-manager": "state_manager_process", "scheduler": "scheduler",
}
SET_PROCESS_ACTIONS = {
    "SetUsdaProcess": "usda", "SetMockUsdaProcess": "usda", "SetTokenManagerProcess": "tim3",
    "SetLockManagerProcess": "lock-manager", "SetStateManagerProcess": "state-manager",
}
# Configure{ConfigType, Value}: limits in base units unless the name says otherwise.
LIMIT_FIELDS = {
    "MinAmount": ("min_amount", 1), "MaxAmount": ("max_amount", 1), "UserDailyLimit": ("user_daily_limit", 1),
    "SystemHourlyLimit": ("system_hourly_limit", 1), "LargeOperationThreshold": ("large_threshold", 1),
    "CooldownSeconds": ("cooldown_ms", 1000), "RateLimitPerMinute": ("rate_limit_per_minute", 1),
    "PendingTimeout": ("pending_timeout_ms", 1000),
}
HOUR_MS, DAY_MS, MINUTE_MS = 3_600_000, 86_400_000, 60_000


# --- helpers ------------------------------------------------------------------------------

def config(ctx) -> CoordinatorState:
    return own_state(ctx, CoordinatorState, missing="The coordinator has not been spawned.")


def has_role(ctx, address: str, *roles: str) -> bool:
    return address == ctx.process.owner or CoordinatorRole.objects.filter(
        process=ctx.process, address=address, role__in=roles).exists()


def require_owner(msg, ctx) -> None:
    if msg.sender != ctx.process.owner:
        raise HandlerError(f"Only the owner may {msg.action}.")


def require_from(msg, expected: str, name: str) -> None:
    if not expected or msg.sender != expected:
        raise HandlerError(f"{msg.action} is accepted only from the configured {name} process.")


def require_wallet(msg, ctx) -> None:
    """Fund-moving requests come from users' wallets, never from processes."""
    c = config(ctx)
    if msg.sender in (c.usda_process, c.tim3_process, c.lock_manager_process, c.state_manager_process):
        raise HandlerError(f"{msg.action} must come from a user's wallet.")


# Mint operations accepted and not released (pending or completed): what the mint limits count.
# The condition and its params, for the statements below to extend.
RESERVED_MINTS = f"process_id = %s AND kind IN ({', '.join(['%s'] * len(Operation.MINT_KINDS))}) AND reserved = %s"


def reserved_mints(ctx) -> list:
    """RESERVED_MINTS's params."""
    return [ctx.process.id, *Operation.MINT_KINDS, True]


USER_MINTED = RESERVED_MINTS + ' AND "user" = %s AND created_at > %s'
LEFT_HOUR_WINDOW = RESERVED_MINTS + " AND created_at > %s AND created_at <= %s"
RECENT_REQUESTS = 'process_id = %s AND "user" = %s AND created_at > %s'


@dataclass
class MintUsage:
    """What check_mint_allowed weighs, read in one round trip (three small index ranges)."""

    user_day: int  # TIM3 this user had accepted for minting in the last 24 hours
    left_window: int  # accepted for minting, and now older than the system's rolling hour
    window_since: int  # where that hour starts now
    recent_requests: int  # this user's operations in the last minute


def mint_usage(ctx, c: CoordinatorState, user: str) -> MintUsage:
    since = max(c.hour_window_since, ctx.now - HOUR_MS)  # the window's start never moves back
    day, left, recent = sql.select_values(Operation, aggregates=[
        ("SUM(quantity)", USER_MINTED), ("SUM(quantity)", LEFT_HOUR_WINDOW), ("COUNT(*)", RECENT_REQUESTS)],
        params=[*reserved_mints(ctx), user, ctx.now - DAY_MS, *reserved_mints(ctx), c.hour_window_since, since,
                ctx.process.id, user, ctx.now - MINUTE_MS])
    return MintUsage(user_day=int(day or 0), left_window=int(left or 0), window_since=since,
                     recent_requests=int(recent))


def system_minted_last_hour(c: CoordinatorState, usage: MintUsage) -> int:
    """TIM3 accepted for minting in the rolling hour before this message.

    The window is kept in `c`: slide its start to now - 1 h, taking off only the
    operations that fell out of it since the last message (so this costs the same
    whatever the hour's traffic). Message times are not strictly ordered across
    senders; the start never moves back.
    """
    if usage.window_since > c.hour_window_since:
        c.hour_window_minted -= usage.left_window
        c.hour_window_since = usage.window_since
    return c.hour_window_minted


def reserve(c: CoordinatorState, op: Operation) -> None:
    if op.reserved and op.created_at > c.hour_window_since:
        c.hour_window_minted += op.quantity


def release(c: CoordinatorState, op: Operation) -> None:
    """A failed mint stops counting against the limits."""
    if op.reserved and op.created_at > c.hour_window_since:
        c.hour_window_minted -= op.quantity
    op.reserved = False


def check_rate_limit(ctx, c: CoordinatorState, user: str, *, recent: int | None = None) -> str | None:
    """`recent`: the user's operations in the last minute, when the caller has counted them."""
    if recent is None:
        recent = sql.select_value(Operation, expression="COUNT(*)", where=RECENT_REQUESTS,
                                  params=[ctx.process.id, user, ctx.now - MINUTE_MS])
    if recent >= c.rate_limit_per_minute:
        return f"Too many requests: at most {c.rate_limit_per_minute} per minute per wallet."
    return None


def check_mint_allowed(ctx, c: CoordinatorState, user: str, quantity: int) -> str | None:
    """The circuit breaker for every mint path (SPEC §5); None when allowed."""
    if c.paused_mint or c.risk_halt:
        return f"Minting is paused: {c.pause_reason or 'risk alert'}"
    if quantity < c.min_amount:
        return f"Amount is below the minimum of {format_units(c.min_amount)} TIM3."
    if quantity > c.max_amount:
        return f"Amount is above the maximum of {format_units(c.max_amount)} TIM3 per operation."
    usage = mint_usage(ctx, c, user)
    used = usage.user_day
    if used + quantity > c.user_daily_limit:
        return (f"Daily limit: {format_units(used)} of {format_units(c.user_daily_limit)} TIM3 "
                "already used in the last 24 hours.")
    used = system_minted_last_hour(c, usage)
    if used + quantity > c.system_hourly_limit:
        return f"System limit: the system mints at most {format_units(c.system_hourly_limit)} TIM3 per hour; try later."
    if quantity >= c.large_threshold:
        recent_large = sql.exists(
            Operation, where=RESERVED_MINTS + ' AND "user" = %s AND quantity >= %s AND created_at > %s',
            params=[*reserved_mints(ctx), user, c.large_threshold, ctx.now - c.cooldown_ms])
        if recent_large:
            return f"Cooldown: one large operation per {c.cooldown_ms // 1000} seconds."
    return check_rate_limit(ctx, c, user, recent=usage.recent_requests)


def open_operation(ctx, *, kind: str, user: str, quantity: int, reserved: bool = False) -> Operation:
    """`reserved`: the quantity counts against the mint limits until the operation fails.

    Not saved yet: every request goes on to `await_reply`, which inserts it with
    its first step (one statement instead of an insert and an update).
    """
    op = Operation(
        process=ctx.process, op_id=ctx.msg.msg_id, kind=kind, user=user, quantity=quantity, step="checking",
        reserved=reserved,
        flow_id=ctx.msg.pushed_for, request_id=ctx.msg.msg_id, created_at=ctx.now, updated_at=ctx.now,
    )
    reserve(config(ctx), op)  # the caller saves the config with the rest of its change
    return op


def await_reply(ctx, op: Operation, *, step: str, target: str, tags: dict) -> None:
    """Send the operation's next request and remember which answer it waits for."""
    out = ctx.send(target=target, tags={**tags, "X-Operation-Id": op.op_id})
    op.step, op.awaiting, op.expiring, op.updated_at = step, out.msg_id, False, ctx.now
    if remember(ctx, op) is not op:  # a second object for one row: one of them is stale
        raise RuntimeError(f"Operation {op.op_id} is held twice in this drain.")
    save_operation(op)
    ctx.note(operation=op.op_id, step=step)


def finish(ctx, op: Operation, *, status: str, error: str = "") -> None:
    """End the operation and tell the user, with the flow's final status."""
    action = {Operation.COMPLETED: SUCCESS_ACTION, Operation.REFUNDED: REFUNDED_ACTION,
              Operation.FAILED: FAILED_ACTION}[status][op.kind]
    op.status, op.step, op.awaiting, op.updated_at = status, "done", "", ctx.now
    op.error = error or op.error
    if status != Operation.COMPLETED and op.reserved:
        c = config(ctx)
        release(c, op)
        sql.save_row(c)
    save_operation(op)
    tags = {"Action": action, "Operation-Id": op.op_id, "Quantity": op.quantity, "Flow-Status": status}
    if op.error:
        tags["Reason" if status == Operation.REFUNDED else "Error"] = op.error[:1000]
    ctx.send(target=op.user, tags=tags)
    ctx.note(operation=op.op_id, status=status)


def save_operation(op: Operation) -> None:
    """`op.save()`: inserted the first time (open_operation leaves it unsaved), then updated."""
    if op.pk is None:
        sql.insert_row(op)
    else:
        sql.save_row(op)


def operation(ctx, op_id: str) -> Operation | None:
    """This coordinator's operation `op_id`, or None: read once per drain (Context.memo), so
    a reply in the same transaction as its request (a followed cascade) needs no read. Every
    handler that reads or saves an operation goes through here or `remember`, so the object
    in the memo is the row: each save writes it, and no one changes the row behind it."""
    key = ("operation", op_id)
    op = ctx.memo.get(key)
    if op is None:
        op = sql.select_one(Operation, where="process_id = %s AND op_id = %s", params=[ctx.process.id, op_id])
        if op is not None:
            ctx.memo[key] = op
    return op


def remember(ctx, op: Operation) -> Operation:
    """`op` as the memo's object for its id (see `operation`): the memo's when it has one."""
    return ctx.memo.setdefault(("operation", op.op_id), op)


def position(ctx, user: str) -> CoordinatorPosition:
    """The user's position here, created when it has none (only this process's drainer writes it)."""
    row = sql.select_one(CoordinatorPosition, where='process_id = %s AND "user" = %s', params=[ctx.process.id, user])
    if row is None:
        row = CoordinatorPosition(process=ctx.process, user=user)
        sql.insert_row(row)
    return row


# --- the steps ---------------------------------------------------------------------------

def send_mint(ctx, c: CoordinatorState, op: Operation, *, step: str = "minting", remint: bool = False) -> None:
    """Mint TIM3 to the user, only if it stays backed (proof of reserves)."""
    if c.outstanding + op.quantity > c.custody + c.collateral:
        raise HandlerError("Refused: this mint would leave TIM3 not fully backed by USDA reserves.")
    c.outstanding += op.quantity
    sql.save_row(c)
    tags = {"Action": "Mint", "Recipient": op.user, "Quantity": op.quantity}
    if remint:
        tags["X-Mint-Kind"] = "remint"
    await_reply(ctx, op, step=step, target=c.tim3_process, tags=tags)


def send_refund(ctx, c: CoordinatorState, op: Operation, reason: str) -> None:
    """Give a rejected deposit's USDA back (the coordinator holds it in custody)."""
    op.error = reason
    c.payouts_committed += op.quantity
    sql.save_row(c)
    await_reply(ctx, op, step="refunding", target=c.usda_process,
                tags={"Action": "Transfer", "Recipient": op.user, "Quantity": op.quantity})


def send_unlock(ctx, c: CoordinatorState, op: Operation) -> None:
    await_reply(ctx, op, step="unlocking", target=c.lock_manager_process,
                tags={"Action": "UnlockCollateral", "User": op.user, "Quantity": op.quantity})


def send_position_update(ctx, c: CoordinatorState, op: Operation, operation: str) -> None:
    await_reply(ctx, op, step="recording", target=c.state_manager_process, tags={
        "Action": "UpdatePosition", "Operation": operation, "User": op.user, "Amount": op.quantity,
        "CollateralAmount": op.quantity, "CollateralType": COLLATERAL_TYPE[op.kind]})


def advance(ctx, c: CoordinatorState, op: Operation) -> None:
    """The awaited request succeeded: take the operation's next step."""
    q = op.quantity
    match (op.kind, op.step):
        case (Operation.DEPOSIT, "minting"):
            send_position_update(ctx, c, op, "mint")
        case (Operation.DEPOSIT, "refunding"):
            c.custody -= q
            c.payouts_committed -= q
            sql.save_row(c)
            finish(ctx, op, status=Operation.REFUNDED)
        case (Operation.LOCK_MINT, "locking"):
            c.collateral += q
            sql.save_row(c)
            send_mint(ctx, c, op)
        case (Operation.LOCK_MINT, "minting"):
            row = position(ctx, op.user)
            row.locked += q
            sql.save_row(row)
            send_position_update(ctx, c, op, "mint")
        case (Operation.LOCK_MINT, "unlocking"):
            c.collateral -= q
            sql.save_row(c)
            finish(ctx, op, status=Operation.REFUNDED)
        case (Operation.REDEEM, "burning"):
            c.outstanding -= q
            sql.save_row(c)
            await_reply(ctx, op, step="paying", target=c.usda_process,
                        tags={"Action": "Transfer", "Recipient": op.user, "Quantity": q})
        case (Operation.REDEEM, "paying"):
            c.custody -= q
            c.payouts_committed -= q
            sql.save_row(c)
            send_position_update(ctx, c, op, "burn")
        case (Operation.BURN, "burning"):
            c.outstanding -= q
            sql.save_row(c)
            send_unlock(ctx, c, op)
        case (Operation.BURN, "unlocking"):
            c.collateral -= q
            sql.save_row(c)
            row = position(ctx, op.user)
            row.locked -= q
            row.committed -= q
            sql.save_row(row)
            send_position_update(ctx, c, op, "burn")
        case (Operation.REDEEM | Operation.BURN, "reminting"):
            release_redemption(ctx, c, op)
            finish(ctx, op, status=Operation.REFUNDED)
        case (_, "recording"):
            finish(ctx, op, status=Operation.COMPLETED)
        case _:
            raise HandlerError(f"Operation {op.op_id} is not waiting for {ctx.msg.action} (step {op.step}).")


def release_redemption(ctx, c: CoordinatorState, op: Operation) -> None:
    """A redemption that ends without paying out frees what it had promised."""
    if op.kind == Operation.REDEEM:
        c.payouts_committed -= op.quantity
        sql.save_row(c)
    else:
        row = position(ctx, op.user)
        row.committed -= op.quantity
        sql.save_row(row)


def fail_step(ctx, c: CoordinatorState, op: Operation, error: str) -> None:
    """The awaited request failed (or timed out unanswered): compensate."""
    q = op.quantity
    op.error = error
    # Released: a failed mint does not count against the limits. A failed position
    # record is not a failed mint (the TIM3 was minted), so that one keeps counting.
    if op.step != "recording" and op.reserved:
        release(c, op)
        sql.save_row(c)
    match (op.kind, op.step):
        case (Operation.DEPOSIT, "minting"):
            c.outstanding -= q
            send_refund(ctx, c, op, f"Mint failed: {error}")
        case (Operation.LOCK_MINT, "locking"):
            finish(ctx, op, status=Operation.FAILED, error=error)
        case (Operation.LOCK_MINT, "minting"):
            c.outstanding -= q
            sql.save_row(c)
            send_unlock(ctx, c, op)
        case (Operation.REDEEM | Operation.BURN, "burning"):
            release_redemption(ctx, c, op)
            finish(ctx, op, status=Operation.FAILED, error=error)
        case (Operation.REDEEM, "paying") | (Operation.BURN, "unlocking"):
            # The user's TIM3 is burned but the USDA did not move: mint it back.
            send_mint(ctx, c, op, step="reminting", remint=True)
        case (_, "recording"):
            # The money moved; only the position record failed. Finish, and say so.
            finish(ctx, op, status=Operation.COMPLETED, error=f"Position not recorded: {error}")
        case _:
            # refunding, unlocking a failed mint, reminting: funds are safe in custody
            # or locked, but the operation needs an operator (ops page, dead letters).
            op.step = f"stuck-{op.step}"[:16]
            op.updated_at = ctx.now
            save_operation(op)
            ctx.note(operation=op.op_id, stuck=error)


def awaited_target(msg, op: Operation) -> str | None:
    """The process `op`'s awaited request went to, if that request arrived before `msg`.

    Handlers must see the message log as replay will: a request sent by an earlier
    message of the same drain batch is not written yet when `msg` is handled live,
    but it is on replay. Such a request always arrived after `msg` (its batch was
    already queued), so looking only at older messages gives both the same answer.
    A genuine answer is always younger than the request it answers.
    """
    if not op.awaiting:
        return None
    return sql.select_value(Message, expression="target", where="msg_id = %s AND seq < %s", params=[op.awaiting, msg.seq])


def reply_operation(msg, ctx, *, expected_from: str, name: str) -> tuple[CoordinatorState, Operation | None]:
    """The pending operation this reply answers (by X-Operation-Id), checking who sent it.

    The process the awaited request went to may answer it even if the owner has
    re-pointed the coordinator since (else the operation would wait forever:
    CleanupExpired hears the request was handled); anyone else must be the
    configured process.
    """
    c = config(ctx)
    op_id = msg.get("X-Operation-Id")
    op = operation(ctx, op_id or "")
    if msg.sender != getattr(c, expected_from):  # the usual sender needs no look at the log
        asked = awaited_target(msg, op) if op is not None and op.status == Operation.PENDING else None
        if not asked or msg.sender != asked:
            require_from(msg, getattr(c, expected_from), name)
    if op is None:
        raise HandlerError(f"No operation {op_id!r} here.")
    if op.status != Operation.PENDING:
        # Only a reply to an operation already settled: never apply it twice.
        ctx.note(operation=op.op_id, late_reply=msg.action)
        return c, None
    return c, op


# --- spawn, info and configuration ---------------------------------------------------------

@handlers.add("Spawn")
def spawn(msg, ctx):
    require_owner(msg, ctx)
    if CoordinatorState.objects.filter(process=ctx.process).exists():
        raise HandlerError("The coordinator is already spawned.")
    CoordinatorState.objects.create(process=ctx.process)
    ctx.reply({"Action": "Spawned", "Process": ctx.process.id})


@handlers.add("Info")
def info(msg, ctx):
    c = config(ctx)
    ctx.reply({"Action": "Info-Response", "Name": ctx.process.name, "Type": "coordinator",
               "Version": ctx.process.version, "Paused-Mint": str(c.paused_mint).lower(),
               "Paused-Redeem": str(c.paused_redeem).lower()})


def config_data(c: CoordinatorState) -> dict:
    return {
        "processes": {k: getattr(c, f) for k, f in PROCESS_FIELDS.items() if k != "token-manager"},
        "limits": {name: str(getattr(c, f) // scale) for name, (f, scale) in LIMIT_FIELDS.items()},
        "paused": {"mint": c.paused_mint or c.risk_halt, "redeem": c.paused_redeem, "risk_halt": c.risk_halt,
                   "reason": c.pause_reason, "by": c.paused_by, "at": c.paused_at},
        "books": {"custody": str(c.custody), "collateral": str(c.collateral), "outstanding": str(c.outstanding),
                  "payouts_committed": str(c.payouts_committed)},
    }


@handlers.add("GetConfig")
def get_config(msg, ctx):
    c = config(ctx)
    data = config_data(c)
    data["guardians"] = sorted(CoordinatorRole.objects.filter(process=ctx.process, role="guardian")
                               .values_list("address", flat=True))
    data["admins"] = sorted(CoordinatorRole.objects.filter(process=ctx.process, role="admin")
                            .values_list("address", flat=True))
    ctx.reply({"Action": "GetConfig-Response"}, data=data)


def set_process(ctx, kind: str | None, process_id: str | None) -> None:
    if kind not in PROCESS_FIELDS:
        raise HandlerError(f"Process-Type must be one of {', '.join(PROCESS_FIELDS)}.")
    if not process_id or not is_id(process_id):
        raise HandlerError("Process-Id must be a 43-character id.")
    c = config(ctx)  # written through the object every handler of this drain shares (Context.memo)
    setattr(c, PROCESS_FIELDS[kind], process_id)
    c.save(update_fields=[PROCESS_FIELDS[kind]])
    ctx.reply({"Action": "SetProcessConfig-Response", "Process-Type": kind, "Process-Id": process_id})


@handlers.add("SetProcessConfig")
def set_process_config(msg, ctx):
    require_owner(msg, ctx)
    config(ctx)
    set_process(ctx, msg.get("Process-Type"), msg.get("Process-Id"))


@handlers.add("SetXProcess", lambda m: m.action in SET_PROCESS_ACTIONS)
def set_x_process(msg, ctx):
    require_owner(msg, ctx)
    config(ctx)
    set_process(ctx, SET_PROCESS_ACTIONS[msg.action], msg.get("Process-Id") or msg.get("Value"))


@handlers.add("Configure")
def configure(msg, ctx):
    require_owner(msg, ctx)
    c = config(ctx)
    kind, value = msg.get("ConfigType") or "", msg.get("Value") or ""
    if kind in ("AddGuardian", "RemoveGuardian", "AddAdmin", "RemoveAdmin"):
        if not is_id(value):
            raise HandlerError("Value must be a 43-character wallet address.")
        role = "guardian" if "Guardian" in kind else "admin"
        if kind.startswith("Add"):
            CoordinatorRole.objects.get_or_create(process=ctx.process, address=value, role=role)
        else:
            CoordinatorRole.objects.filter(process=ctx.process, address=value, role=role).delete()
    elif kind in LIMIT_FIELDS:
        if not value.isdigit() or value != str(int(value)) or not 1 <= int(value) <= 10**18:
            raise HandlerError(f"{kind} must be a whole number from 1 up.")
        field, scale = LIMIT_FIELDS[kind]
        setattr(c, field, int(value) * scale)
        if c.min_amount > c.max_amount:
            raise HandlerError("MinAmount cannot be above MaxAmount.")
        c.save()
    else:
        known = [*LIMIT_FIELDS, "AddGuardian", "RemoveGuardian", "AddAdmin", "RemoveAdmin"]
        raise HandlerError(f"Unknown ConfigType {kind[:40]!r}. Known: {', '.join(known)}.")
    ctx.reply({"Action": "Configure-Response", "ConfigType": kind, "Value": value})


# --- reads --------------------------------------------------------------------------------

@handlers.add("GetPosition")
def get_position(msg, ctx):
    user = msg.get("User") or msg.sender
    ops = Operation.objects.filter(process=ctx.process, user=user, status=Operation.COMPLETED)
    deposited = ops.filter(kind=Operation.DEPOSIT).aggregate(s=Sum("quantity"))["s"] or 0
    redeemed = ops.filter(kind=Operation.REDEEM).aggregate(s=Sum("quantity"))["s"] or 0
    locked = CoordinatorPosition.objects.filter(process=ctx.process, user=user).values_list("locked", flat=True).first()
    ctx.reply({"Action": "GetPosition-Response", "User": user, "Deposited": deposited, "Redeemed": redeemed,
               "Locked": locked or 0})


@handlers.add("SystemHealth")
def system_health(msg, ctx):
    c = config(ctx)
    pending = Operation.objects.filter(process=ctx.process, status=Operation.PENDING).count()
    data = config_data(c)
    data.update({"pending_operations": pending, "reserves_ok": c.outstanding <= c.custody + c.collateral})
    ctx.reply({"Action": "SystemHealth-Response", "Reserves-Ok": str(data["reserves_ok"]).lower(),
               "Pending-Operations": pending}, data=data)


# --- v2 deposit: USDA Transfer -> Credit-Notice -> Mint -> UpdatePosition -> Deposit-Complete ----

@handlers.add("Credit-Notice")
def on_credit_notice(msg, ctx):
    c = config(ctx)
    sender, quantity = msg.get("Sender") or "", parse_quantity(msg.get("Quantity"))
    if c.tim3_process and msg.sender == c.tim3_process:
        # TIM3 sent to the coordinator is not a redemption request: give it back.
        ctx.send(target=c.tim3_process, tags={"Action": "Transfer", "Recipient": sender, "Quantity": quantity})
        return
    require_from(msg, c.usda_process, "USDA")
    if not is_id(sender):
        raise HandlerError("Credit-Notice needs the Sender's address.")
    # The USDA is in custody now; book it before anything can fail, so a refund is covered
    # (send_mint and send_refund save it).
    c.custody += quantity
    reason = check_mint_allowed(ctx, c, sender, quantity)
    if reason is None and c.outstanding + quantity > c.custody + c.collateral:
        reason = "Refused: minting this would leave TIM3 not fully backed."
    op = open_operation(ctx, kind=Operation.DEPOSIT, user=sender, quantity=quantity, reserved=reason is None)
    if reason:
        send_refund(ctx, c, op, reason)
    else:
        send_mint(ctx, c, op)


# --- v2 redeem: RedeemTIM3 -> Burn -> USDA Transfer -> UpdatePosition -> Redeem-Complete --------

@handlers.add("RedeemTIM3")
def on_redeem(msg, ctx):
    c = config(ctx)
    require_wallet(msg, ctx)
    quantity = parse_quantity(msg.get("Quantity"))
    if c.paused_redeem:
        raise HandlerError(f"Redemption is paused: {c.pause_reason}")
    if reason := check_rate_limit(ctx, c, msg.sender):
        raise HandlerError(reason)
    available = c.custody - c.payouts_committed
    if quantity > available:
        raise HandlerError(f"This coordinator can pay out at most {format_units(available)} USDA right now.")
    op = open_operation(ctx, kind=Operation.REDEEM, user=msg.sender, quantity=quantity)
    c.payouts_committed += quantity
    sql.save_row(c)
    await_reply(ctx, op, step="burning", target=c.tim3_process, tags={
        "Action": "Burn", "User": msg.sender, "Quantity": quantity, "Redemption-Request": msg.msg_id})


# --- v1 lock mint: MintTIM3 -> LockCollateral -> Lock -> Mint -> UpdatePosition ----------------

@handlers.add("MintTIM3")
def on_mint_tim3(msg, ctx):
    c = config(ctx)
    require_wallet(msg, ctx)
    quantity = parse_quantity(msg.get("Quantity"))
    if reason := check_mint_allowed(ctx, c, msg.sender, quantity):
        raise HandlerError(reason)
    op = open_operation(ctx, kind=Operation.LOCK_MINT, user=msg.sender, quantity=quantity, reserved=True)
    sql.save_row(c)
    await_reply(ctx, op, step="locking", target=c.lock_manager_process,
                tags={"Action": "LockCollateral", "User": msg.sender, "Quantity": quantity})


# --- v1 burn: BurnTIM3 -> Burn -> UnlockCollateral -> Unlock -> UpdatePosition -----------------

@handlers.add("BurnTIM3")
def on_burn_tim3(msg, ctx):
    c = config(ctx)
    require_wallet(msg, ctx)
    quantity = parse_quantity(msg.get("Quantity"))
    if c.paused_redeem:
        raise HandlerError(f"Redemption is paused: {c.pause_reason}")
    if reason := check_rate_limit(ctx, c, msg.sender):
        raise HandlerError(reason)
    row = position(ctx, msg.sender)
    if quantity > row.locked - row.committed:
        raise HandlerError(f"Only {format_units(row.locked - row.committed)} TIM3 of yours is backed by "
                           "collateral locked through this coordinator.")
    row.committed += quantity
    sql.save_row(row)
    op = open_operation(ctx, kind=Operation.BURN, user=msg.sender, quantity=quantity)
    await_reply(ctx, op, step="burning", target=c.tim3_process, tags={
        "Action": "Burn", "User": msg.sender, "Quantity": quantity, "Redemption-Request": msg.msg_id})


# --- replies: one handler per success and per error it can receive ------------------------------

def on_success(expected_from: str, name: str):
    def handle(msg, ctx):
        c, op = reply_operation(msg, ctx, expected_from=expected_from, name=name)
        if op is not None:
            advance(ctx, c, op)
    return handle


def on_error(expected_from: str, name: str):
    def handle(msg, ctx):
        c, op = reply_operation(msg, ctx, expected_from=expected_from, name=name)
        if op is not None:
            fail_step(ctx, c, op, msg.get("Error") or f"{msg.action} without an error text")
    return handle


handlers.add("Mint-Response", handle=on_success("tim3_process", "TIM3"))
handlers.add("Mint-Error", handle=on_error("tim3_process", "TIM3"))
handlers.add("Burn-Response", handle=on_success("tim3_process", "TIM3"))
handlers.add("Burn-Error", handle=on_error("tim3_process", "TIM3"))
handlers.add("LockCollateral-Success", handle=on_success("lock_manager_process", "Lock Manager"))
handlers.add("LockCollateral-Error", handle=on_error("lock_manager_process", "Lock Manager"))
handlers.add("UnlockCollateral-Success", handle=on_success("lock_manager_process", "Lock Manager"))
handlers.add("UnlockCollateral-Error", handle=on_error("lock_manager_process", "Lock Manager"))
handlers.add("UpdatePosition-Response", handle=on_success("state_manager_process", "State Manager"))
handlers.add("UpdatePosition-Error", handle=on_error("state_manager_process", "State Manager"))
handlers.add("Transfer-Error", handle=on_error("usda_process", "USDA"))


@handlers.add("Debit-Notice")
def on_debit_notice(msg, ctx):
    """USDA confirms a payout or refund it made from custody."""
    c = config(ctx)
    if c.tim3_process and msg.sender == c.tim3_process:
        return  # a returned TIM3 transfer: nothing to book
    on_success("usda_process", "USDA")(msg, ctx)


# --- timeouts (AO Cron) ------------------------------------------------------------------

@handlers.add("CleanupExpired")
def cleanup_expired(msg, ctx):
    """Ask about operations waiting longer than PendingTimeout.

    A process applies one sender's messages in order, so its answer to
    `Message-Status` is final: the operation is compensated only if the
    awaited request was never handled. A late success reply can therefore
    never meet an operation already compensated.
    """
    c = config(ctx)
    if msg.sender not in (ctx.process.owner, c.scheduler):
        raise HandlerError("Only the owner or the scheduler may CleanupExpired.")
    # A stuck operation already had its answer (an error during compensation) and
    # waits for an operator: asking again would only overwrite its error and step.
    expired = Operation.objects.filter(process=ctx.process, status=Operation.PENDING, expiring=False,
                                       updated_at__lt=ctx.now - c.pending_timeout_ms).exclude(awaiting="").exclude(
        step__startswith="stuck-")
    count = 0
    for found in expired.order_by("updated_at", "op_id")[:100]:
        op = remember(ctx, found)  # the same row: the memo's object when it has one
        awaited = awaited_target(msg, op)
        if not awaited:
            continue  # sent after this tick was scheduled: the next tick looks at it
        op.expiring = True
        save_operation(op)
        ctx.send(target=awaited, tags={"Action": "Message-Status", "Message-Id": op.awaiting,
                                       "X-Operation-Id": op.op_id})
        count += 1
    ctx.reply({"Action": "CleanupExpired-Response", "Checked": count})


@handlers.add("Message-Status-Response")
def on_message_status(msg, ctx):
    c = config(ctx)
    op = operation(ctx, msg.get("X-Operation-Id") or "")
    if op is None or op.status != Operation.PENDING or not op.expiring or op.awaiting != msg.get("Message-Id"):
        return  # answered in the meantime
    awaited = awaited_target(msg, op)
    if msg.sender != awaited:
        raise HandlerError("Message-Status-Response is accepted only from the process that was asked.")
    if msg.get("Status") == "applied" and msg.get("Handled") == "true":
        # Handled, and its answer is on its way through another process: keep waiting.
        op.expiring, op.updated_at = False, ctx.now
        save_operation(op)
        return
    why = {"applied": "no handler took it", "failed": "it failed", "unknown": "the process has no record of it"}
    status = msg.get("Status") or "unknown"
    fail_step(ctx, c, op, f"Timed out after {c.pending_timeout_ms // 1000} s: the request was not handled "
                          f"({why.get(status, status)}).")


# --- emergency pause -----------------------------------------------------------------------

SCOPES = ("mint", "redeem", "all")


@handlers.add("EmergencyPause")
def emergency_pause(msg, ctx):
    c = config(ctx)
    if not has_role(ctx, msg.sender, CoordinatorRole.ADMIN, CoordinatorRole.GUARDIAN):
        raise HandlerError("Only a guardian or an admin may EmergencyPause.")
    scope, reason = msg.get("Scope") or "all", (msg.get("Reason") or "").strip()
    if scope not in SCOPES:
        raise HandlerError("Scope must be mint, redeem or all.")
    if not reason:
        raise HandlerError("A pause needs a Reason.")
    if scope in ("mint", "all"):
        c.paused_mint = True
    if scope in ("redeem", "all"):
        c.paused_redeem = True
    c.pause_reason, c.paused_by, c.paused_at = reason[:500], msg.sender, ctx.now
    c.save()
    ctx.note(paused=scope, reason=reason[:100])
    ctx.reply({"Action": "EmergencyPause-Response", "Scope": scope, "Reason": reason[:500]})


@handlers.add("Resume")
def resume(msg, ctx):
    c = config(ctx)
    if not has_role(ctx, msg.sender, CoordinatorRole.ADMIN):
        raise HandlerError("Only an admin may Resume.")
    scope = msg.get("Scope") or "all"
    if scope not in SCOPES:
        raise HandlerError("Scope must be mint, redeem or all.")
    if scope in ("mint", "all"):
        c.paused_mint = c.risk_halt = False
    if scope in ("redeem", "all"):
        c.paused_redeem = False
    if not (c.paused_mint or c.paused_redeem or c.risk_halt):
        c.pause_reason, c.paused_by, c.paused_at = "", "", None
    c.save()
    ctx.note(resumed=scope)
    ctx.reply({"Action": "Resume-Response", "Scope": scope})


@handlers.add("Risk-Alert")
def risk_alert(msg, ctx):
    """The State Manager sees critical risk: halt minting until an admin resumes."""
    c = config(ctx)
    require_from(msg, c.state_manager_process, "State Manager")
    c.risk_halt = True
    c.pause_reason = f"Risk alert: health score {msg.get('Health-Score')}, collateral ratio {msg.get('Collateral-Ratio')}"
    c.paused_by, c.paused_at = msg.sender, ctx.now
    c.save()
    ctx.note(risk_halt=True)


handlers.add("Message-Status", handle=message_status)

blueprint = register_blueprint(Blueprint(
    kind="coordinator", handlers=handlers,
    state_models=[CoordinatorState, CoordinatorRole, Operation, CoordinatorPosition], own_state=CoordinatorState,
))
