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
    process = Process.objects.filter(Q(name=name_or_id) | Q(id=name_or_id)).first()
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


def bootstrap_system(*, environment: str | None = None) -> dict[str, Process]:
    """Create and wire the processes; safe to run again (idempotent)."""
    environment = environment or settings.TIM3_ENV
    with transaction.atomic():
        owner = operator_address()
        ensure_wallet(label=SCHEDULER)
        usda = _ensure_process(name="usda", kind="token", owner=owner, tags={
            "Token-Name": "USD Alpha", "Ticker": "USDA", "Mint-Policy": "faucet" if environment == "test" else "owner",
            "Faucet-Per-Request": 1_000 * UNIT, "Faucet-Per-Window": 10_000 * UNIT,
        })
        tim3 = _ensure_process(name="tim3", kind="token", owner=owner, tags={
            "Token-Name": "TIM3", "Ticker": "TIM3", "Mint-Policy": "minters",
        })
        _configure_once(owner=owner, process=usda, tags={
            "Action": "SetMintPolicy", "Mint-Policy": "faucet" if environment == "test" else "owner"})
    run_until_idle()
    return {"usda": usda, "tim3": tim3}


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
