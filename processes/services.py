"""Operator-level actions: wallets, bootstrap, process lookup, console sends."""

import time

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from processes.runtime.delivery import run_until_idle, send_message, spawn_process
from processes.runtime.ids import new_id
from processes.runtime.models import Message, Process, Wallet
from processes.runtime.quantities import UNIT

OPERATOR, SCHEDULER = "operator", "scheduler"


def ensure_wallet(*, label: str) -> Wallet:
    """The wallet with this label, created on first use."""
    wallet = Wallet.objects.filter(label=label).order_by("created_at").first()
    return wallet or Wallet.objects.create(address=new_id(), label=label)


def operator_address() -> str:
    return ensure_wallet(label=OPERATOR).address


def resolve_process(name_or_id: str) -> Process:
    """A process by name or id (every command that takes `<process>`)."""
    # No name or id holds a NUL, and Postgres cannot even compare a text column with one.
    process = Process.objects.filter(Q(name=name_or_id) | Q(id=name_or_id)).first() if "\x00" not in name_or_id else None
    if process is None:
        raise LookupError(f"No process named or with id {name_or_id!r}. Run `manage.py bootstrap` first?")
    return process


def _ensure_process(*, name: str, kind: str, owner: str, tags: dict) -> Process:
    return Process.objects.filter(name=name).first() or spawn_process(name=name, kind=kind, owner=owner, tags=tags)


def _configure_once(*, owner: str, process: Process, tags: dict) -> None:
    """Send a configuration message unless an identical one was already applied."""
    tag_list = [[k, str(v)] for k, v in tags.items()]
    done = Message.objects.filter(target=process.id, sender=owner, tags=tag_list, status=Message.APPLIED)
    if not done.exists():
        send_message(sender=owner, target=process.id, tags=tags)


def _wire_coordinator(*, owner: str, coordinator: Process, procs: dict[str, Process], scheduler: str) -> None:
    """Point a coordinator at the other processes and grant it minting, locking and position rights."""
    for kind in ("usda", "tim3", "lock-manager", "state-manager"):
        _configure_once(owner=owner, process=coordinator, tags={
            "Action": "SetProcessConfig", "Process-Type": kind, "Process-Id": procs[kind].id})
    _configure_once(owner=owner, process=coordinator, tags={
        "Action": "SetProcessConfig", "Process-Type": "scheduler", "Process-Id": scheduler})
    _configure_once(owner=owner, process=procs["tim3"], tags={"Action": "AddMinter", "Minter": coordinator.id})
    for name in ("lock-manager", "state-manager"):
        _configure_once(owner=owner, process=procs[name], tags={
            "Action": "SetProcessConfig", "Process-Type": "coordinator", "Process-Id": coordinator.id})


def bootstrap_system(*, environment: str | None = None) -> dict[str, Process]:
    """Create and wire the five processes; safe to run again (idempotent)."""
    environment = environment or settings.TIM3_ENV
    usda_policy = "faucet" if environment == "test" else "owner"
    with transaction.atomic():
        owner = operator_address()
        scheduler = ensure_wallet(label=SCHEDULER).address
        procs = {
            "usda": _ensure_process(name="usda", kind="token", owner=owner, tags={
                "Token-Name": "USD Alpha", "Ticker": "USDA", "Mint-Policy": usda_policy,
                "Faucet-Per-Request": 1_000 * UNIT, "Faucet-Per-Window": 10_000 * UNIT}),
            "tim3": _ensure_process(name="tim3", kind="token", owner=owner, tags={
                "Token-Name": "TIM3", "Ticker": "TIM3", "Mint-Policy": "minters"}),
            "lock-manager": _ensure_process(name="lock-manager", kind="lock-manager", owner=owner, tags={}),
            "state-manager": _ensure_process(name="state-manager", kind="state-manager", owner=owner, tags={}),
            "coordinator": _ensure_process(name="coordinator", kind="coordinator", owner=owner, tags={}),
        }
        _configure_once(owner=owner, process=procs["usda"], tags={"Action": "SetMintPolicy", "Mint-Policy": usda_policy})
        _configure_once(owner=owner, process=procs["usda"], tags={"Action": "SetLocker", "Locker": procs["lock-manager"].id})
        _configure_once(owner=owner, process=procs["lock-manager"], tags={
            "Action": "SetProcessConfig", "Process-Type": "usda", "Process-Id": procs["usda"].id})
        for coordinator in Process.objects.filter(kind="coordinator"):
            _wire_coordinator(owner=owner, coordinator=coordinator, procs=procs, scheduler=scheduler)
    run_until_idle()
    return procs


def system_processes() -> dict[str, Process]:
    return {p.name: p for p in Process.objects.filter(name__in=["usda", "tim3", "lock-manager", "state-manager"])}


def coordinators() -> list[Process]:
    return list(Process.objects.filter(kind="coordinator").order_by("version"))


def active_coordinator() -> Process:
    """The coordinator the web sends new requests to."""
    process = Process.objects.filter(kind="coordinator", active=True).order_by("-version").first()
    if process is None:
        raise LookupError("No active coordinator. Run `manage.py bootstrap`.")
    return process


def spawn_coordinator() -> Process:
    """A new coordinator version beside the old ones, wired but not yet active."""
    with transaction.atomic():
        owner = operator_address()
        version = (Process.objects.filter(kind="coordinator").order_by("-version").values_list("version", flat=True)
                   .first() or 0) + 1
        coordinator = spawn_process(name=f"coordinator-v{version}", kind="coordinator", owner=owner,
                                    version=version, active=False)
        _wire_coordinator(owner=owner, coordinator=coordinator, procs=system_processes(),
                          scheduler=ensure_wallet(label=SCHEDULER).address)
    run_until_idle()
    return coordinator


def activate_coordinator(*, process: Process) -> Process:
    """Make `process` the one the web uses; the others keep answering (and redeeming)."""
    if process.kind != "coordinator":
        raise ValueError(f"{process.name} is not a coordinator.")
    with transaction.atomic():
        Process.objects.filter(kind="coordinator").exclude(pk=process.pk).update(active=False)
        Process.objects.filter(pk=process.pk).update(active=True)
    process.refresh_from_db()
    return process


def rollback_coordinator() -> Process:
    """Activate the version before the active one."""
    current = active_coordinator()
    previous = Process.objects.filter(kind="coordinator", version__lt=current.version).order_by("-version").first()
    if previous is None:
        raise LookupError("There is no earlier coordinator version to roll back to.")
    return activate_coordinator(process=previous)


def send_cleanup_expired() -> list[Message]:
    """The Cron tick: ask every coordinator to look at expired operations."""
    scheduler = ensure_wallet(label=SCHEDULER).address
    return [send_message(sender=scheduler, target=p.id, tags={"Action": "CleanupExpired"}) for p in coordinators()]


def send_check_risk_alerts() -> list[Message]:
    scheduler = ensure_wallet(label=SCHEDULER).address
    return [send_message(sender=scheduler, target=p.id, tags={"Action": "CheckRiskAlerts"})
            for p in Process.objects.filter(kind="state-manager")]


def send_from_operator(*, process: Process, action: str, tags: dict, data: str = "") -> Message:
    return send_message(sender=operator_address(), target=process.id, tags={"Action": action, **tags}, data=data)


def wait_for_cascade(*, root: Message, timeout: float = 10.0) -> list[Message]:
    """Block until nothing in the cascade is pending; return it in arrival order."""
    deadline = time.monotonic() + timeout
    while True:
        cascade = list(Message.objects.filter(pushed_for=root.msg_id).order_by("seq"))
        if cascade and all(m.status != Message.PENDING for m in cascade):
            return cascade
        if time.monotonic() > deadline:
            raise TimeoutError(f"cascade of {root.msg_id} still pending after {timeout}s")
        time.sleep(0.02)


def vacuum_busy_tables(*, analyze: bool = False) -> list[str]:
    """VACUUM the tables every hop rewrites (and with `analyze`, refresh their planner
    statistics); the tables done (none off Postgres).

    Each message is written pending and rewritten once applied, so the pending-
    message index (what every drain reads) fills with entries of rows that are
    no longer pending; until a vacuum removes them each drain steps over them
    (1 ms a drain after 100,000 hops). Autovacuum's defaults come too rarely
    for a queue table, and a server may run with autovacuum off.
    ANALYZE is a separate, rarer job: it reads ~30,000 rows with their JSON, 1.5 s on
    a 270 MB message table, and the tables' statistics hardly move in a minute.
    """
    from django.db import connection

    from processes.blueprints.state import Operation
    from processes.flows import Flow

    if connection.vendor != "postgresql" or connection.in_atomic_block:  # VACUUM cannot run in a transaction
        return []
    tables = [Message._meta.db_table, Operation._meta.db_table, Flow._meta.db_table]
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"VACUUM{' (ANALYZE)' if analyze else ''} {connection.ops.quote_name(table)}")
    return tables

