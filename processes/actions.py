"""What a user or an admin can do, as plain functions (HackSoft "services").

The web layer (views, API) and the console call these; each one only ever
sends messages from the acting user's own wallet (or, for configuration, from
the operator wallet after the caller checked the admin's permission).
"""

import re

from django.db import connection, transaction
from django.utils import timezone

from processes.blueprints.state import CoordinatorPosition, CoordinatorRole, CoordinatorState, Position, StateManagerState
from processes.blueprints.state_manager import format_bp, health_bp, risk_level
from processes.flows import Flow, start_flow
from processes.invariants import check_reserves, reserves_snapshot
from processes.runtime import prepared
from processes.runtime.delivery import send_message
from processes.runtime.models import Process
from processes.runtime.quantities import parse_quantity
from processes.services import active_coordinator, coordinators, operator_address, resolve_process

MODES = ("deposit", "lock")  # deposit = v2 custody, lock = v1 collateral
SCOPES = ("mint", "redeem", "all")
# What a pause reason (shown to every user) must not contain once its whitespace is
# folded: control characters, text-direction overrides and isolates, lone surrogates.
_UNSAFE_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


class ActionError(ValueError):
    """A request refused before anything was sent; `code` is the API's snake_case code."""

    def __init__(self, message: str, *, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


def _quantity(quantity: str) -> int:
    try:
        return parse_quantity(quantity, name="quantity")
    except ValueError as exc:
        raise ActionError(str(exc), code="invalid_quantity") from exc


def _mode(mode: str | None) -> str:
    mode = mode or "deposit"
    if mode not in MODES:
        raise ActionError("mode must be \"deposit\" (v2 custody) or \"lock\" (v1 collateral).", code="invalid_mode")
    return mode


def request_faucet(*, wallet: str, quantity: str) -> Flow:
    """Test environment: USDA from the faucet (the USDA process enforces the caps)."""
    from django.conf import settings

    if settings.TIM3_ENV != "test":
        raise ActionError("The USDA faucet exists only in the test environment.", code="faucet_disabled")
    q = _quantity(quantity)
    usda = resolve_process("usda")
    return start_flow(user=wallet, target=usda.id, kind="faucet", quantity=q, tags={"Action": "Mint", "Quantity": q})


# The lookups every deposit and redemption makes, as fixed SQL: building them through the ORM
# cost more CPU than Postgres takes to answer. Never cached: an admin may activate another
# coordinator at any time, and a redemption depends on the reserves of the moment.
_PROCESS = Process._meta.db_table
_ACTIVE_COORDINATOR_AND_USDA = prepared.register(
    f"SELECT id, name, kind, active FROM {_PROCESS} WHERE (kind = %s AND active = %s) OR name = %s "
    f"ORDER BY version DESC")
# A coordinator's available reserves, or a user's available v1 collateral in it, at least the quantity;
# the active coordinator first, then the newest.
_COORDINATOR_WITH_RESERVES = prepared.register(
    f"SELECT p.id FROM {_PROCESS} p JOIN {CoordinatorState._meta.db_table} c ON c.process_id = p.id "
    f"WHERE p.kind = %s AND c.custody - c.payouts_committed >= %s ORDER BY p.active DESC, p.version DESC LIMIT 1")
_COORDINATOR_WITH_COLLATERAL = prepared.register(
    f"SELECT p.id FROM {_PROCESS} p JOIN {CoordinatorPosition._meta.db_table} r ON r.process_id = p.id "
    f'WHERE p.kind = %s AND r."user" = %s AND r.locked - r.committed >= %s '
    f"ORDER BY p.active DESC, p.version DESC LIMIT 1")


def _fetch_rows(sql: str, params: list) -> list:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _coordinator_and_usda() -> tuple[str, str]:
    """The ids of the active coordinator and the USDA process in one query (a v2 deposit needs
    both); if one is missing, the services' own lookups say so (LookupError)."""
    rows = _fetch_rows(_ACTIVE_COORDINATOR_AND_USDA, ["coordinator", True, "usda"])
    coordinator = next((pid for pid, _, kind, active in rows if kind == "coordinator" and active), None)
    usda = next((pid for pid, name, _, _ in rows if name == "usda"), None)
    return coordinator or active_coordinator().id, usda or resolve_process("usda").id


def request_deposit(*, wallet: str, quantity: str, mode: str | None = None) -> Flow:
    """Deposit USDA for TIM3: v2 transfers USDA to the coordinator, v1 locks it in place."""
    q, mode = _quantity(quantity), _mode(mode)
    if mode == "deposit":
        coordinator, usda = _coordinator_and_usda()
        return start_flow(user=wallet, target=usda, kind="deposit", mode=mode, quantity=q,
                          tags={"Action": "Transfer", "Recipient": coordinator, "Quantity": q})
    coordinator = active_coordinator()
    return start_flow(user=wallet, target=coordinator.id, kind="deposit", mode=mode, quantity=q,
                      tags={"Action": "MintTIM3", "Quantity": q})


def redemption_coordinator(*, wallet: str, quantity: int, mode: str) -> str:
    """The id of the coordinator that can honour this redemption: the active one if it can,
    else an older version that holds the reserves (its TIM3 stays redeemable)."""
    if mode == "deposit":
        rows = _fetch_rows(_COORDINATOR_WITH_RESERVES, ["coordinator", quantity])
    else:
        rows = _fetch_rows(_COORDINATOR_WITH_COLLATERAL, ["coordinator", wallet, quantity])
    return rows[0][0] if rows else active_coordinator().id  # the active one answers with the reason


def request_redemption(*, wallet: str, quantity: str, mode: str | None = None) -> Flow:
    q, mode = _quantity(quantity), _mode(mode)
    coordinator = redemption_coordinator(wallet=wallet, quantity=q, mode=mode)
    action = "RedeemTIM3" if mode == "deposit" else "BurnTIM3"
    return start_flow(user=wallet, target=coordinator, kind="redeem", mode=mode, quantity=q,
                      tags={"Action": action, "Quantity": q})


def _ensure_role(*, wallet: str, role: str) -> None:
    """Register the wallet's role with every coordinator (sent from the operator, ahead of the request)."""
    owner = operator_address()
    for process in coordinators():
        if wallet != owner and not CoordinatorRole.objects.filter(process=process, address=wallet, role=role).exists():
            send_message(sender=owner, target=process.id, tags={
                "Action": "Configure", "ConfigType": "AddAdmin" if role == "admin" else "AddGuardian", "Value": wallet})


def request_pause(*, wallet: str, scope: str, reason: str, role: str) -> list[Flow]:
    """Pause every coordinator. `role` is what the caller checked: "admin" or "guardian"."""
    if scope not in SCOPES:
        raise ActionError("scope must be mint, redeem or all.", code="invalid_scope")
    reason = " ".join((reason or "").split())  # a textarea's line breaks and tabs become spaces
    if not reason:
        raise ActionError("A pause needs a reason.", code="reason_required")
    if _UNSAFE_TEXT.search(reason):
        raise ActionError("The reason must be plain text: no control characters or text-direction overrides.",
                          code="invalid_reason")
    if len(reason) > 500:
        raise ActionError("The reason must be at most 500 characters.", code="reason_too_long")
    with transaction.atomic():
        _ensure_role(wallet=wallet, role=role)
        return [start_flow(user=wallet, target=p.id, kind="other", tags={
            "Action": "EmergencyPause", "Scope": scope, "Reason": reason}) for p in coordinators()]


def request_resume(*, wallet: str, scope: str) -> list[Flow]:
    """Resume every coordinator; the caller checked the admin permission."""
    if scope not in SCOPES:
        raise ActionError("scope must be mint, redeem or all.", code="invalid_scope")
    with transaction.atomic():
        _ensure_role(wallet=wallet, role="admin")
        return [start_flow(user=wallet, target=p.id, kind="other", tags={"Action": "Resume", "Scope": scope})
                for p in coordinators()]


def configure_coordinator(*, config_type: str, value: str, process: Process | None = None):
    """Admin configuration (limits, roles), sent from the operator wallet, the coordinators' owner."""
    targets = [process] if process else coordinators()
    return [send_message(sender=operator_address(), target=p.id, tags={
        "Action": "Configure", "ConfigType": config_type, "Value": value}) for p in targets]


def pause_state() -> dict:
    """The system's pause state, merged over coordinators (the active one's reason first)."""
    states = list(CoordinatorState.objects.select_related("process").order_by("-process__active", "-process__version"))
    paused = {"mint": any(c.paused_mint or c.risk_halt for c in states),
              "redeem": any(c.paused_redeem for c in states), "reason": "", "by": "", "at": None}
    for c in states:
        if c.pause_reason:
            paused.update(reason=c.pause_reason, by=c.paused_by, at=c.paused_at)
            break
    return paused


def system_health() -> dict:
    """The dashboard's figures (CONTRACT /api/health)."""
    r = reserves_snapshot()
    positions = list(Position.objects.all())
    sm = StateManagerState.objects.first()
    levels = {"healthy": 0, "warning": 0, "danger": 0, "critical": 0}
    for row in positions:
        levels[risk_level(health_bp(row.collateral, row.tim3))] += 1
    ratio = health_bp(r["usda_reserves"], r["tim3_supply"])
    below = ratio is not None and sm is not None and ratio < sm.target_ratio_bp
    score = max(0, 100 - 20 * levels["critical"] - 10 * (levels["warning"] + levels["danger"]) - (15 if below else 0))
    return {
        "tim3_supply": str(r["tim3_supply"]),
        "usda_reserves": str(r["usda_reserves"]),
        "usda_held": str(r["usda_held"]),
        "usda_locked": str(r["usda_locked"]),
        "collateral_ratio": format_bp(ratio),
        "reserves_ok": not check_reserves(),
        "health_score": score,
        "risk": levels,
        "paused": pause_state(),
        "pending_operations": r["pending_operations"],
        "checked_at": timezone.now().isoformat(),
    }
