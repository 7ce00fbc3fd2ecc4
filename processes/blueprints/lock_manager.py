"""Lock Manager: locks and unlocks users' USDA as v1 collateral, for coordinators.

The USDA stays in the user's account, locked (USDA `Lock`/`Unlock`, which only
this process may call). Results and errors are relayed back to the coordinator
that asked, carrying its operation id.
"""

from django.db.models import F

from processes.blueprints.state import CollateralLock, LockManagerClient, LockManagerState, LockRequest
from processes.runtime.builtins import message_status
from processes.runtime.handlers import HandlerError, Handlers
from processes.runtime.ids import is_id
from processes.runtime.quantities import parse_quantity
from processes.runtime.registry import Blueprint, register_blueprint

handlers = Handlers()


def state(ctx) -> LockManagerState:
    try:
        return LockManagerState.objects.get(process=ctx.process)
    except LockManagerState.DoesNotExist:
        raise HandlerError("The Lock Manager has not been spawned.") from None


def require_owner(msg, ctx) -> None:
    if msg.sender != ctx.process.owner:
        raise HandlerError(f"Only the owner may {msg.action}.")


def require_coordinator(msg, ctx) -> tuple[str, int, str]:
    if not LockManagerClient.objects.filter(process=ctx.process, address=msg.sender).exists():
        raise HandlerError(f"Only a coordinator may {msg.action}.")
    user, op_id = msg.get("User"), msg.get("X-Operation-Id")
    if not user or not is_id(user):
        raise HandlerError("User must be a 43-character address.")
    if not op_id:
        raise HandlerError("X-Operation-Id is required.")
    return user, parse_quantity(msg.get("Quantity")), op_id


def require_usda(msg, ctx, lm: LockManagerState) -> LockRequest:
    if msg.sender != lm.usda_process:
        raise HandlerError(f"{msg.action} is accepted only from the configured USDA process.")
    kind = "lock" if msg.action.startswith("Lock") else "unlock"
    request = LockRequest.objects.filter(
        process=ctx.process, op_id=msg.get("X-Operation-Id") or "", kind=kind, status="pending"
    ).first()
    if request is None:
        raise HandlerError(f"No pending {kind} for this operation.")
    return request


@handlers.add("Spawn")
def spawn(msg, ctx):
    require_owner(msg, ctx)
    if LockManagerState.objects.filter(process=ctx.process).exists():
        raise HandlerError("The Lock Manager is already spawned.")
    LockManagerState.objects.create(process=ctx.process)
    ctx.reply({"Action": "Spawned", "Process": ctx.process.id})


@handlers.add("SetProcessConfig")
def set_process_config(msg, ctx):
    """Process-Type usda: the token to lock in; coordinator: add an allowed coordinator."""
    require_owner(msg, ctx)
    kind, process_id = msg.get("Process-Type"), msg.get("Process-Id")
    if not process_id or not is_id(process_id):
        raise HandlerError("Process-Id must be a 43-character process id.")
    if kind == "usda":
        LockManagerState.objects.filter(process=ctx.process).update(usda_process=process_id)
    elif kind == "coordinator":
        LockManagerClient.objects.get_or_create(process=ctx.process, address=process_id)
    else:
        raise HandlerError("Process-Type must be usda or coordinator.")
    ctx.reply({"Action": "SetProcessConfig-Response", "Process-Type": kind, "Process-Id": process_id})


@handlers.add("Info")
def info(msg, ctx):
    lm = state(ctx)
    ctx.reply({"Action": "Info-Response", "Name": ctx.process.name, "Type": "lock-manager", "USDA": lm.usda_process})


@handlers.add("LockCollateral")
def lock_collateral(msg, ctx):
    lm = state(ctx)
    user, quantity, op_id = require_coordinator(msg, ctx)
    if LockRequest.objects.filter(process=ctx.process, op_id=op_id, kind="lock").exists():
        raise HandlerError("This operation already locked collateral.")
    LockRequest.objects.create(process=ctx.process, op_id=op_id, kind="lock", user=user, quantity=quantity,
                               requester=msg.sender)
    ctx.send(target=lm.usda_process, tags={"Action": "Lock", "User": user, "Quantity": quantity, "X-Operation-Id": op_id})


@handlers.add("UnlockCollateral")
def unlock_collateral(msg, ctx):
    lm = state(ctx)
    user, quantity, op_id = require_coordinator(msg, ctx)
    held = CollateralLock.objects.filter(process=ctx.process, user=user).values_list("locked", flat=True).first() or 0
    if held < quantity:
        raise HandlerError("Cannot unlock more collateral than is locked for this user.")
    if LockRequest.objects.filter(process=ctx.process, op_id=op_id, kind="unlock").exists():
        raise HandlerError("This operation already unlocked collateral.")
    LockRequest.objects.create(process=ctx.process, op_id=op_id, kind="unlock", user=user, quantity=quantity,
                               requester=msg.sender)
    ctx.send(target=lm.usda_process, tags={"Action": "Unlock", "User": user, "Quantity": quantity, "X-Operation-Id": op_id})


@handlers.add("Lock-Response")
def lock_response(msg, ctx):
    lm = state(ctx)
    request = require_usda(msg, ctx, lm)
    row, _ = CollateralLock.objects.get_or_create(process=ctx.process, user=request.user)
    CollateralLock.objects.filter(pk=row.pk).update(locked=F("locked") + request.quantity)
    LockManagerState.objects.filter(pk=lm.pk).update(total_locked=F("total_locked") + request.quantity,
                                                     locks_count=F("locks_count") + 1)
    LockRequest.objects.filter(pk=request.pk).update(status="done")
    ctx.note(user=request.user, collateral=f"+{request.quantity}")
    ctx.send(target=request.requester, tags={
        "Action": "LockCollateral-Success", "User": request.user, "Quantity": request.quantity,
        "X-Operation-Id": request.op_id})


@handlers.add("Unlock-Response")
def unlock_response(msg, ctx):
    lm = state(ctx)
    request = require_usda(msg, ctx, lm)
    CollateralLock.objects.filter(process=ctx.process, user=request.user).update(locked=F("locked") - request.quantity)
    LockManagerState.objects.filter(pk=lm.pk).update(total_locked=F("total_locked") - request.quantity,
                                                     unlocks_count=F("unlocks_count") + 1)
    LockRequest.objects.filter(pk=request.pk).update(status="done")
    ctx.note(user=request.user, collateral=f"-{request.quantity}")
    ctx.send(target=request.requester, tags={
        "Action": "UnlockCollateral-Success", "User": request.user, "Quantity": request.quantity,
        "X-Operation-Id": request.op_id})


@handlers.add("Lock-Error", {"Action": lambda v: v in ("Lock-Error", "Unlock-Error")})
def lock_error(msg, ctx):
    lm = state(ctx)
    request = require_usda(msg, ctx, lm)
    LockRequest.objects.filter(pk=request.pk).update(status="failed")
    action = "LockCollateral-Error" if request.kind == "lock" else "UnlockCollateral-Error"
    ctx.send(target=request.requester, tags={
        "Action": action, "User": request.user, "Quantity": request.quantity, "Error": msg.get("Error", ""),
        "X-Operation-Id": request.op_id})


@handlers.add("LockStats")
def lock_stats(msg, ctx):
    lm = state(ctx)
    users = CollateralLock.objects.filter(process=ctx.process, locked__gt=0).count()
    ctx.reply({"Action": "LockStats-Response"}, data={
        "total_locked": str(lm.total_locked), "locks": lm.locks_count, "unlocks": lm.unlocks_count, "users": users})


@handlers.add("GetLockInfo")
def get_lock_info(msg, ctx):
    user = msg.get("User") or msg.sender
    locked = CollateralLock.objects.filter(process=ctx.process, user=user).values_list("locked", flat=True).first() or 0
    ctx.reply({"Action": "GetLockInfo-Response", "User": user, "Locked": locked})


handlers.add("Message-Status", handle=message_status)

blueprint = register_blueprint(Blueprint(
    kind="lock-manager", handlers=handlers,
    state_models=[LockManagerState, LockManagerClient, CollateralLock, LockRequest],
))
