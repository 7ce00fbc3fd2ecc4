"""Shared by test_hostile.py and test_authz_matrix.py: the full-state snapshot, a world
built once per module, and a relay process (a foreign process that sends as itself).

The world (bootstrapped processes, users with funds, tokens) is built once per module
inside a transaction that is rolled back when the module ends; every test runs in a
savepoint inside it (pytest-django's `db`), so each test starts from the same world and
leaves nothing behind, at a fraction of the cost of bootstrapping per test.
"""

import json
from contextlib import contextmanager

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import transaction
from django.db.models import Max
from django.test.utils import override_settings

from processes.blueprints.state import CoordinatorState
from processes.flows import Flow
from processes.runtime.delivery import drain_mailbox, run_until_idle, send_message, spawn_process
from processes.runtime.handlers import HandlerError, Handlers
from processes.runtime.models import Message, Process, Wallet
from processes.runtime.registry import BLUEPRINTS, Blueprint, register_blueprint
from processes.runtime.replay import snapshot_state
from processes.services import operator_address
from tim3web.models import Account, ApiToken, AuditEntry, IdempotencyRecord

PASSWORD = "correct horse battery"
FAST_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher", "django.contrib.auth.hashers.PBKDF2PasswordHasher"]
WORLD_SETTINGS = {"PASSWORD_HASHERS": FAST_HASHERS, "TIM3_DOORBELL": "none"}


# --- the snapshot ------------------------------------------------------------------------

def snapshot() -> dict:
    """Everything a refused input must leave exactly as it was.

    Not in it, on purpose: sessions, the rate-limit counters (refused attempts count,
    by design) and ApiToken.last_used_at (bumped, at most once a minute, by any
    authenticated request)."""
    User = get_user_model()
    messages = Message.objects.order_by("seq")
    return {
        "messages": {
            "count": messages.count(),
            "max_seq": messages.aggregate(m=Max("seq"))["m"],
            "rows": list(messages.values_list("msg_id", "sender", "target", "action", "status", "slot", "error",
                                              "handled", "dead")),
        },
        "processes": list(Process.objects.order_by("id").values_list("id", "name", "kind", "owner", "version",
                                                                       "active", "next_slot", "next_reference")),
        "state": {p.name: snapshot_state(p) for p in Process.objects.order_by("name")},
        "flows": list(Flow.objects.order_by("id").values_list("id", "kind", "mode", "user", "target", "quantity",
                                                              "status", "error")),
        "wallets": list(Wallet.objects.order_by("address").values_list("address", "label", "next_reference")),
        "accounts": list(Account.objects.order_by("address").values_list("user_id", "address")),
        "idempotency": list(IdempotencyRecord.objects.order_by("user_id", "key").values_list(
            "user_id", "key", "method", "path", "body_hash", "status_code", "response")),
        "users": list(User.objects.order_by("pk").values_list("pk", "username", "password", "is_active", "is_staff",
                                                               "is_superuser", "last_login")),
        "permissions": sorted(User.user_permissions.through.objects.values_list("user_id", "permission_id")),
        "tokens": list(ApiToken.objects.order_by("token_hash").values_list("user_id", "token_hash", "expires_at")),
        "audit": list(AuditEntry.objects.order_by("pk").values_list("actor_id", "action", "detail")),
    }


def differences(before: dict, after: dict) -> list[str]:
    """What changed, one line per section (empty when nothing did)."""
    out = []
    for section in before:
        if before[section] == after[section]:
            continue
        if section == "state":
            for name in sorted(set(before["state"]) | set(after["state"])):
                if before["state"].get(name) != after["state"].get(name):
                    out.append(f"state of {name} changed: {before['state'].get(name)} -> {after['state'].get(name)}")
        else:
            old, new = before[section], after[section]
            if isinstance(old, list):
                gone = [r for r in old if r not in new][:3]
                added = [r for r in new if r not in old][:3]
                out.append(f"{section} changed: removed {gone}, added {added}")
            else:
                out.append(f"{section} changed: {str(old)[:300]} -> {str(new)[:300]}")
    return out


def assert_unchanged(before: dict, what: str = "") -> None:
    changed = differences(before, snapshot())
    assert not changed, f"{what}: a refused input changed state:\n" + "\n".join(changed)


# --- a world built once per module -------------------------------------------------------

@contextmanager
def module_world(django_db_blocker):
    """Open a transaction for the module, yield, and roll everything back."""
    with django_db_blocker.unblock(), override_settings(**WORLD_SETTINGS):
        atomic = transaction.atomic()
        atomic.__enter__()
        try:
            yield
        finally:
            transaction.set_rollback(True)
            atomic.__exit__(None, None, None)


def make_user(username: str, *, staff: bool = False, superuser: bool = False, guardian: bool = False):
    from tim3web.accounts import create_account

    user = create_account(username=username, password=PASSWORD).user
    if staff or superuser:
        get_user_model().objects.filter(pk=user.pk).update(is_staff=True, is_superuser=superuser)
        user.refresh_from_db()
    if guardian:
        user.user_permissions.add(Permission.objects.get(codename="pause_system", content_type__app_label="processes"))
    return user


def settle(flow: Flow) -> Flow:
    run_until_idle()
    flow.refresh_from_db()
    assert flow.status == Flow.COMPLETED, (flow.kind, flow.status, flow.error)
    return flow


def coordinator_state() -> CoordinatorState:
    return CoordinatorState.objects.get(process__name="coordinator")


# --- a foreign process: forwards whatever it is asked to, as itself ------------------------

RELAY_KIND = "test-relay"
relay_handlers = Handlers()


@relay_handlers.add("Relay")
def relay(msg, ctx):
    """`Relay{Relay-Target}` with Data = the tags to send: the relay sends them, From itself.

    A legitimate way for a process to send any message (AO processes send whatever their
    code says); the processes it talks to must judge it by who it is, not what it says."""
    target = msg.get("Relay-Target")
    if not target:
        raise HandlerError("Relay-Target is required.")
    ctx.send(target=target, tags=json.loads(msg.data))


if RELAY_KIND not in BLUEPRINTS:
    register_blueprint(Blueprint(kind=RELAY_KIND, handlers=relay_handlers, state_models=[]))


def spawn_relay(name: str = "relay") -> Process:
    process = spawn_process(name=name, kind=RELAY_KIND, owner=operator_address())
    run_until_idle()
    return process


def relay_send(relay_process: Process, target: Process, tags: dict) -> Message:
    """Make the relay send `tags` to `target` (the relay's mailbox is drained, the target's is not);
    return the relayed message, pending at the target."""
    order = send_message(sender=operator_address(), target=relay_process.id,
                         tags={"Action": "Relay", "Relay-Target": target.id}, data=tags)
    drain_mailbox(process_id=relay_process.id)
    order.refresh_from_db()
    assert order.status == Message.APPLIED, order.error
    return Message.objects.get(parent_id=order.msg_id, sender=relay_process.id)
