"""State Manager: users' positions, their health, and the system's.

Health factor = collateral / TIM3 (no TIM3: healthy). Risk: >= 1.00 healthy,
>= 0.95 warning, >= 0.90 danger, else critical. Ratios are kept in basis
points with integer arithmetic, so they are exact.
"""

from django.db.models import Sum

from processes.blueprints.state import Position, StateManagerClient, StateManagerState
from processes.runtime import sql
from processes.runtime.builtins import message_status
from processes.runtime.handlers import HandlerError, Handlers
from processes.runtime.ids import is_id
from processes.runtime.quantities import parse_quantity
from processes.runtime.registry import Blueprint, register_blueprint

handlers = Handlers()
COLLATERAL_TYPES = ("USDA-custody", "USDA-locked")


def state(ctx) -> StateManagerState:
    row = sql.select_one(StateManagerState, where="process_id = %s", params=[ctx.process.id])
    if row is None:
        raise HandlerError("The State Manager has not been spawned.")
    return row


def require_owner(msg, ctx) -> None:
    if msg.sender != ctx.process.owner:
        raise HandlerError(f"Only the owner may {msg.action}.")


def health_bp(collateral: int, tim3: int) -> int | None:
    """Health factor in basis points; None when there is no TIM3 (healthy)."""
    return None if tim3 == 0 else collateral * 10_000 // tim3


def risk_level(factor_bp: int | None) -> str:
    if factor_bp is None or factor_bp >= 10_000:
        return "healthy"
    if factor_bp >= 9_500:
        return "warning"
    if factor_bp >= 9_000:
        return "danger"
    return "critical"


def format_bp(factor_bp: int | None) -> str:
    return "inf" if factor_bp is None else f"{factor_bp // 10_000}.{factor_bp % 10_000:04d}"


def system_health(ctx) -> dict:
    sm = state(ctx)
    rows = list(Position.objects.filter(process=ctx.process))
    totals = Position.objects.filter(process=ctx.process).aggregate(t=Sum("tim3"), c=Sum("collateral"))
    tim3, collateral = totals["t"] or 0, totals["c"] or 0
    levels = {"healthy": 0, "warning": 0, "danger": 0, "critical": 0}
    for row in rows:
        levels[risk_level(health_bp(row.collateral, row.tim3))] += 1
    ratio = health_bp(collateral, tim3)
    below_target = ratio is not None and ratio < sm.target_ratio_bp
    score = max(0, 100 - 20 * levels["critical"] - 10 * (levels["warning"] + levels["danger"]) - (15 if below_target else 0))
    return {
        "total_tim3": str(tim3), "total_collateral": str(collateral), "collateral_ratio": format_bp(ratio),
        "positions": len(rows), "risk": levels, "health_score": score, "below_target": below_target,
    }


@handlers.add("Spawn")
def spawn(msg, ctx):
    require_owner(msg, ctx)
    if StateManagerState.objects.filter(process=ctx.process).exists():
        raise HandlerError("The State Manager is already spawned.")
    StateManagerState.objects.create(process=ctx.process)
    ctx.reply({"Action": "Spawned", "Process": ctx.process.id})


@handlers.add("SetProcessConfig")
def set_process_config(msg, ctx):
    """Process-Type coordinator: allow a coordinator to update positions."""
    require_owner(msg, ctx)
    process_id = msg.get("Process-Id")
    if msg.get("Process-Type") != "coordinator":
        raise HandlerError("Process-Type must be coordinator.")
    if not process_id or not is_id(process_id):
        raise HandlerError("Process-Id must be a 43-character process id.")
    StateManagerClient.objects.get_or_create(process=ctx.process, address=process_id)
    ctx.reply({"Action": "SetProcessConfig-Response", "Process-Type": "coordinator", "Process-Id": process_id})


@handlers.add("Info")
def info(msg, ctx):
    state(ctx)
    ctx.reply({"Action": "Info-Response", "Name": ctx.process.name, "Type": "state-manager"})


@handlers.add("UpdatePosition")
def update_position(msg, ctx):
    # Counting the update doubles as the "spawned?" check (one statement, not two).
    if not sql.update_rows(StateManagerState, set="updates_count = updates_count + 1", where="process_id = %s",
                           params=[ctx.process.id]):
        raise HandlerError("The State Manager has not been spawned.")
    if not sql.exists(StateManagerClient, where="process_id = %s AND address = %s", params=[ctx.process.id, msg.sender]):
        raise HandlerError("Only a coordinator may UpdatePosition.")
    operation, user, kind = msg.get("Operation"), msg.get("User"), msg.get("CollateralType")
    if operation not in ("mint", "burn"):
        raise HandlerError("Operation must be mint or burn.")
    if not user or not is_id(user):
        raise HandlerError("User must be a 43-character address.")
    if kind not in COLLATERAL_TYPES:
        raise HandlerError(f"CollateralType must be one of {', '.join(COLLATERAL_TYPES)}.")
    amount = parse_quantity(msg.get("Amount"), name="Amount")
    collateral = parse_quantity(msg.get("CollateralAmount"), name="CollateralAmount")
    # Only this process's drainer (holding its lock) writes its positions: `row` is current.
    # A new position is inserted with its first change (one statement, not an insert and an update).
    row = sql.select_one(Position, where='process_id = %s AND "user" = %s AND collateral_type = %s',
                         params=[ctx.process.id, user, kind])
    new = row is None
    if new:
        row = Position(process=ctx.process, user=user, collateral_type=kind)
    if operation == "mint":
        row.tim3, row.collateral = row.tim3 + amount, row.collateral + collateral
    else:
        # TIM3 is transferable: a holder may redeem more than it minted; the position never goes below zero.
        row.tim3, row.collateral = max(0, row.tim3 - amount), max(0, row.collateral - collateral)
    row.updated_at = ctx.now
    if new:
        sql.insert_row(row)
    else:
        sql.update_columns(row, "tim3", "collateral", "updated_at")
    ctx.note(user=user, position=f"{'+' if operation == 'mint' else '-'}{amount}", collateral_type=kind)
    ctx.reply({"Action": "UpdatePosition-Response", "User": user, "TIM3": row.tim3, "Collateral": row.collateral,
               "Health-Factor": format_bp(health_bp(row.collateral, row.tim3))})


@handlers.add("GetPosition")
def get_position(msg, ctx):
    user = msg.get("User") or msg.sender
    rows = Position.objects.filter(process=ctx.process, user=user)
    tim3 = sum(r.tim3 for r in rows)
    collateral = sum(r.collateral for r in rows)
    factor = health_bp(collateral, tim3)
    ctx.reply({"Action": "GetPosition-Response", "User": user, "TIM3": tim3, "Collateral": collateral,
               "Health-Factor": format_bp(factor), "Risk": risk_level(factor)},
              data={r.collateral_type: {"tim3": str(r.tim3), "collateral": str(r.collateral)} for r in rows})


@handlers.add("SystemHealth")
def system_health_handler(msg, ctx):
    health = system_health(ctx)
    ctx.reply({"Action": "SystemHealth-Response", "Health-Score": health["health_score"]}, data=health)


@handlers.add("CheckRiskAlerts")
def check_risk_alerts(msg, ctx):
    """Tell every coordinator of critical positions or a system ratio below target."""
    health = system_health(ctx)
    alert = health["risk"]["critical"] > 0 or health["below_target"]
    if alert:
        for client in StateManagerClient.objects.filter(process=ctx.process).order_by("address"):
            ctx.send(target=client.address, tags={
                "Action": "Risk-Alert", "Health-Score": health["health_score"],
                "Critical": health["risk"]["critical"], "Collateral-Ratio": health["collateral_ratio"]})
    ctx.reply({"Action": "CheckRiskAlerts-Response", "Alert": "true" if alert else "false"}, data=health)


@handlers.add("SetTargetRatio")
def set_target_ratio(msg, ctx):
    require_owner(msg, ctx)
    value = msg.get("Target-Ratio-Bp") or ""
    if not value.isdigit() or not 5_000 <= int(value) <= 50_000:
        raise HandlerError("Target-Ratio-Bp must be a whole number of basis points between 5000 and 50000.")
    StateManagerState.objects.filter(process=ctx.process).update(target_ratio_bp=int(value))
    ctx.reply({"Action": "SetTargetRatio-Response", "Target-Ratio-Bp": value})


handlers.add("Message-Status", handle=message_status)

blueprint = register_blueprint(Blueprint(
    kind="state-manager", handlers=handlers, state_models=[StateManagerState, StateManagerClient, Position],
))
