"""Authorization matrix: every handler with an authority rule, and every page and API
endpoint that needs a login or a role, called by each role.

Two tables, each parametrized over (action, role):

- PROCESS_ROWS: messages to the five processes, sent by a bare wallet (anonymous), a
  user, another user, a guardian and an admin (their wallets registered with the
  coordinator by its owner, `Configure AddGuardian/AddAdmin`), the owner/operator
  wallet, a foreign process (a relay process spawned by the operator, whose handler
  sends whatever it is asked to *as itself*: the legitimate way for a process to send
  anything) and the legitimate process (driven through the real flow that makes it
  send). Denied: the message is recorded failed with the rule's sentence, the sender
  gets `<Action>-Error`, and nothing but the log changes (full snapshot). Allowed: the
  effect is checked.
- WEB_ROWS: pages, forms, the JSON API and the Django admin, for anonymous, user, other
  user, staff, guardian and admin. Denied: a redirect to the login page, a 401 or a
  403, and the full snapshot is unchanged. Allowed: the effect is checked.

The expected answer of every cell is written in the rows (from SPEC §3 and §5 and
CONTRACT); the matrix is printed at the end of the module and written to
test-artifacts/reliability/authz_matrix.{txt,json}.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.conf import settings
from django.db.models import F
from django.middleware.csrf import _get_new_csrf_string
from django.test import Client

from processes.actions import pause_state, request_deposit, request_faucet, request_redemption
from processes.blueprints.state import (
    CoordinatorRole,
    CoordinatorState,
    LockManagerClient,
    LockManagerState,
    Operation,
    StateManagerClient,
    StateManagerState,
    TokenAccount,
    TokenMinter,
    TokenState,
)
from processes.flows import Flow
from processes.runtime.delivery import drain_mailbox, processes_with_pending, run_until_idle, send_message
from processes.runtime.ids import new_id
from processes.runtime.models import Message, Process
from processes.runtime.quantities import UNIT
from processes.services import bootstrap_system, ensure_wallet, operator_address, spawn_coordinator
from tests.hostile_support import (
    FAST_HASHERS,
    assert_unchanged,
    differences,
    make_user,
    module_world,
    relay_send,
    settle,
    snapshot,
    spawn_relay,
)
from tim3web import views
from tim3web.accounts import wallet_of
from tim3web.auth import issue_token
from tim3web.models import ApiToken, AuditEntry

U = UNIT
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "reliability"
CSRF = _get_new_csrf_string()
PROCESS_ROLES = ["anonymous", "user", "other", "guardian", "admin", "owner", "foreign", "legit"]
WEB_ROLES = ["anonymous", "user", "other", "staff", "guardian", "admin"]
SEEN: dict[tuple[str, str, str], str] = {}  # (table, row, role) -> "allowed" | "denied", as verified


# --- the world --------------------------------------------------------------------------------------

def build_world() -> SimpleNamespace:
    procs = bootstrap_system(environment="test")
    owner = operator_address()
    users = {"user": make_user("alice"), "other": make_user("bob"), "staff": make_user("stan", staff=True),
             "guardian": make_user("gina", staff=True, guardian=True), "admin": make_user("root", superuser=True)}
    wallets = {role: wallet_of(user) for role, user in users.items()}
    wallets.update(anonymous=new_id(), owner=owner, scheduler=ensure_wallet(label="scheduler").address)
    coordinator = procs["coordinator"]
    for kind, role in (("AddGuardian", "guardian"), ("AddAdmin", "admin")):
        msg = send_message(sender=owner, target=coordinator.id, tags={
            "Action": "Configure", "ConfigType": kind, "Value": wallets[role]})
        run_until_idle()
        msg.refresh_from_db()
        assert msg.status == Message.APPLIED, msg.error
    for role in users:
        settle(request_faucet(wallet=wallets[role], quantity=str(50 * U)))
        settle(request_deposit(wallet=wallets[role], quantity=str(5 * U)))
    settle(request_deposit(wallet=wallets["user"], quantity=str(10 * U), mode="lock"))
    relay = spawn_relay()
    return SimpleNamespace(
        procs={**procs, "relay": relay}, users=users, wallets=wallets, victim=new_id(),
        tokens={role: issue_token(user)[0] for role, user in users.items()},
        sessions={role: session_of(user) for role, user in users.items()})


def session_of(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


@pytest.fixture(scope="module")
def world(django_db_setup, django_db_blocker, pytestconfig):
    with module_world(django_db_blocker):
        yield build_world()
    report(pytestconfig)


@pytest.fixture
def w(world, db, settings):
    settings.PASSWORD_HASHERS = FAST_HASHERS
    settings.TIM3_RATE_LIMIT_PER_MINUTE = 100_000
    settings.TIM3_READ_RATE_LIMIT_PER_SECOND = 100_000
    return world


# --- small readers --------------------------------------------------------------------------------

def pid(w, name: str) -> str:
    return w.procs[name].id


def coord() -> CoordinatorState:
    return CoordinatorState.objects.get(process__name="coordinator")


def token(name: str) -> TokenState:
    return TokenState.objects.get(process__name=name)


def holding(name: str, who: str) -> tuple[int, int]:
    row = TokenAccount.objects.filter(process__name=name, account=who).first()
    return (row.balance, row.locked) if row else (0, 0)


def drain(w, *names: str) -> None:
    """Deliver only to these processes until none of them has anything pending."""
    ids = {pid(w, n) for n in names}
    while targets := [t for t in processes_with_pending() if t in ids]:
        for target in targets:
            drain_mailbox(process_id=target)


def owner_send(w, name: str, tags: dict) -> Message:
    msg = send_message(sender=operator_address(), target=pid(w, name), tags=tags)
    drain(w, name)
    msg.refresh_from_db()
    assert msg.status == Message.APPLIED, msg.error
    return msg


def final(flow: Flow) -> Flow:
    run_until_idle()
    flow.refresh_from_db()
    return flow


def applied_from(flow_id: str, action: str, sender: str) -> Message:
    msg = Message.objects.get(pushed_for=flow_id, action=action)
    assert (msg.sender, msg.status) == (sender, Message.APPLIED), (msg.sender, msg.status, msg.error)
    return msg


# --- in-flight operations (the `prepare` of reply rows) ---------------------------------------------

def in_flight(w, flow: Flow, step: str, *names: str) -> SimpleNamespace:
    drain(w, *names)
    op = Operation.objects.get(flow_id=flow.id)
    assert (op.step, op.status) == (step, Operation.PENDING), (op.step, op.status, op.error)
    return SimpleNamespace(flow=flow, op=op)


def deposit_minting(w):
    return in_flight(w, request_deposit(wallet=w.wallets["user"], quantity=str(5 * U)), "minting", "usda", "coordinator")


def deposit_recording(w):
    return in_flight(w, request_deposit(wallet=w.wallets["user"], quantity=str(5 * U)), "recording",
                     "usda", "coordinator", "tim3")


def redeem_burning(w):
    return in_flight(w, request_redemption(wallet=w.wallets["user"], quantity=str(5 * U)), "burning", "coordinator")


def redeem_paying(w):
    return in_flight(w, request_redemption(wallet=w.wallets["user"], quantity=str(5 * U)), "paying",
                     "coordinator", "tim3")


def lock_locking(w):
    return in_flight(w, request_deposit(wallet=w.wallets["user"], quantity=str(5 * U), mode="lock"), "locking",
                     "coordinator", "lock-manager")


def burn_unlocking(w):
    return in_flight(w, request_redemption(wallet=w.wallets["user"], quantity=str(5 * U), mode="lock"), "unlocking",
                     "coordinator", "tim3", "lock-manager")


def status_query_pending(w):
    """A deposit whose Mint waits at TIM3, a PendingTimeout of 1 s and a Cron tick scheduled 5 s
    later (its message time moved forward: time passing, in message time): the coordinator has
    asked TIM3 `Message-Status` about the Mint and waits for the answer."""
    owner_send(w, "coordinator", {"Action": "Configure", "ConfigType": "PendingTimeout", "Value": "1"})
    ctx = deposit_minting(w)
    tick = send_message(sender=w.wallets["scheduler"], target=pid(w, "coordinator"), tags={"Action": "CleanupExpired"})
    Message.objects.filter(pk=tick.pk).update(timestamp=F("timestamp") + 5_000)
    drain_mailbox(process_id=pid(w, "coordinator"))
    ctx.op.refresh_from_db()
    assert ctx.op.expiring
    return ctx


def expired_deposit(w):
    owner_send(w, "coordinator", {"Action": "Configure", "ConfigType": "PendingTimeout", "Value": "1"})
    return deposit_minting(w)


def paused_by_owner(w):
    owner_send(w, "coordinator", {"Action": "EmergencyPause", "Scope": "all", "Reason": "matrix setup"})
    assert pause_state()["mint"] and pause_state()["redeem"]


def below_target(w):
    owner_send(w, "state-manager", {"Action": "SetTargetRatio", "Target-Ratio-Bp": "50000"})


def owner_policy(w):
    owner_send(w, "usda", {"Action": "SetMintPolicy", "Mint-Policy": "owner"})


# --- the legitimate process, driven through the real flow ---------------------------------------------

def legit_deliver(expect_step_after: str | None = None, flow_status: str = Flow.COMPLETED):
    """The awaited answer is already on its way: deliver everything; the flow ends as it should."""
    def run(w, ctx):
        assert final(ctx.flow).status == flow_status, (ctx.flow.status, ctx.flow.error)
    return run


def legit_via_flow(make_flow: Callable, action: str, sender: str, *, status: str = Flow.COMPLETED,
                   setup: Callable | None = None, check: Callable | None = None):
    """Start a real flow; the legitimate process sends `action`; it is applied."""
    def run(w, ctx):
        if setup:
            setup(w)
        flow = final(make_flow(w))
        assert flow.status == status, (flow.status, flow.error)
        msg = applied_from(flow.id, action, pid(w, sender) if sender in w.procs else w.wallets[sender])
        if check:
            check(w, flow, msg)
    return run


def remove_coordinator_as_minter(w):
    owner_send(w, "tim3", {"Action": "RemoveMinter", "Minter": pid(w, "coordinator")})


def v2_deposit(q=U):
    return lambda w: request_deposit(wallet=w.wallets["user"], quantity=str(q))


def v2_redeem(q=U):
    return lambda w: request_redemption(wallet=w.wallets["user"], quantity=str(q))


def v1_deposit(q=U):
    return lambda w: request_deposit(wallet=w.wallets["user"], quantity=str(q), mode="lock")


def v1_redeem(q=U):
    return lambda w: request_redemption(wallet=w.wallets["user"], quantity=str(q), mode="lock")


def legit_risk_alert(w, ctx):
    check = send_message(sender=w.wallets["scheduler"], target=pid(w, "state-manager"), tags={"Action": "CheckRiskAlerts"})
    run_until_idle()
    alert = Message.objects.get(pushed_for=check.msg_id, action="Risk-Alert", target=pid(w, "coordinator"))
    assert (alert.sender, alert.status) == (pid(w, "state-manager"), Message.APPLIED), alert.error
    assert coord().risk_halt is True


def legit_cleanup(w, ctx):
    tick = send_message(sender=w.wallets["scheduler"], target=pid(w, "coordinator"), tags={"Action": "CleanupExpired"})
    Message.objects.filter(pk=tick.pk).update(timestamp=F("timestamp") + 5_000)
    drain_mailbox(process_id=pid(w, "coordinator"))
    tick.refresh_from_db()
    assert tick.status == Message.APPLIED, tick.error
    expired_effect(w, ctx, tick)


def legit_status_answer(w, ctx):
    assert final(ctx.flow).status == Flow.COMPLETED
    answer = Message.objects.get(action="Message-Status-Response", target=pid(w, "coordinator"),
                                 sender=pid(w, "tim3"))
    assert answer.status == Message.APPLIED and answer.get("Handled") == "true"


# --- effects of allowed senders --------------------------------------------------------------------

def expired_effect(w, ctx, msg):
    ctx.op.refresh_from_db()
    assert ctx.op.expiring is True
    assert Message.objects.get(parent_id=msg.msg_id, action="Message-Status").target == pid(w, "tim3")


def usda_minted_to_sender(w, ctx, msg):
    assert holding("usda", msg.sender)[0] == ctx.before_usda.get(msg.sender, 0) + U


def remember_usda(w):
    return SimpleNamespace(before_usda={a: holding("usda", a)[0] for a in [*w.wallets.values(), pid(w, "relay")]})


# --- the process table ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PRow:
    name: str
    target: str
    tags: Callable[[Any, Any, str], dict]  # (w, ctx, sender) -> tags
    allowed: frozenset
    error: str
    effect: Callable | None = None  # (w, ctx, msg) for allowed senders other than the legitimate process
    prepare: Callable | None = None  # (w) -> ctx, before the snapshot
    legit: Callable | None = None  # (w, ctx): drive the legitimate process, assert the effect; None: no such process
    legit_prepared: bool = True  # False: the legitimate scenario sets itself up
    bump_ms: int = 0  # move the request's message time forward (time passing, for timeouts)


OWNER = frozenset({"owner"})
ANY_WALLET = frozenset({"anonymous", "user", "other", "guardian", "admin", "owner"})


def owner_only(name, target, tags, effect):
    action = tags["Action"]
    return PRow(name, target, lambda w, ctx, s: {k: v(w) if callable(v) else v for k, v in tags.items()}, OWNER,
                f"Only the owner may {action}.", effect=effect)


PROCESS_ROWS: list[PRow] = [
    # coordinator: owner-only configuration
    owner_only("coordinator Configure MaxAmount", "coordinator",
               {"Action": "Configure", "ConfigType": "MaxAmount", "Value": str(77 * U)},
               lambda w, ctx, m: _eq(coord().max_amount, 77 * U)),
    owner_only("coordinator Configure AddGuardian", "coordinator",
               {"Action": "Configure", "ConfigType": "AddGuardian", "Value": lambda w: w.victim},
               lambda w, ctx, m: _true(CoordinatorRole.objects.filter(address=w.victim, role="guardian").exists())),
    owner_only("coordinator Configure AddAdmin", "coordinator",
               {"Action": "Configure", "ConfigType": "AddAdmin", "Value": lambda w: w.victim},
               lambda w, ctx, m: _true(CoordinatorRole.objects.filter(address=w.victim, role="admin").exists())),
    owner_only("coordinator SetProcessConfig", "coordinator",
               {"Action": "SetProcessConfig", "Process-Type": "usda", "Process-Id": lambda w: w.victim},
               lambda w, ctx, m: _eq(coord().usda_process, w.victim)),
    *[owner_only(f"coordinator {action}", "coordinator", {"Action": action, "Process-Id": lambda w: w.victim},
                 lambda w, ctx, m, f=field: _eq(getattr(coord(), f), w.victim))
      for action, field in (("SetUsdaProcess", "usda_process"), ("SetMockUsdaProcess", "usda_process"),
                            ("SetTokenManagerProcess", "tim3_process"), ("SetLockManagerProcess", "lock_manager_process"),
                            ("SetStateManagerProcess", "state_manager_process"))],
    # coordinator: pause, resume, the Cron tick, risk
    PRow("coordinator EmergencyPause", "coordinator",
         lambda w, ctx, s: {"Action": "EmergencyPause", "Scope": "mint", "Reason": "matrix"},
         frozenset({"guardian", "admin", "owner"}), "Only a guardian or an admin may EmergencyPause.",
         effect=lambda w, ctx, m: _eq((coord().paused_mint, coord().paused_by), (True, m.sender))),
    PRow("coordinator Resume", "coordinator", lambda w, ctx, s: {"Action": "Resume", "Scope": "all"},
         frozenset({"admin", "owner"}), "Only an admin may Resume.", prepare=paused_by_owner,
         effect=lambda w, ctx, m: _eq((coord().paused_mint, coord().paused_redeem), (False, False))),
    PRow("coordinator CleanupExpired", "coordinator", lambda w, ctx, s: {"Action": "CleanupExpired"},
         frozenset({"owner", "legit"}), "Only the owner or the scheduler may CleanupExpired.", prepare=expired_deposit,
         effect=expired_effect, legit=legit_cleanup, bump_ms=5_000),
    PRow("coordinator Risk-Alert", "coordinator",
         lambda w, ctx, s: {"Action": "Risk-Alert", "Health-Score": "0", "Collateral-Ratio": "0.1000"},
         frozenset({"legit"}), "Risk-Alert is accepted only from the configured State Manager process.",
         prepare=below_target, legit=legit_risk_alert),
    # coordinator: a deposit starts only from the configured USDA
    PRow("coordinator Credit-Notice", "coordinator",
         lambda w, ctx, s: {"Action": "Credit-Notice", "Sender": s, "Quantity": str(5 * U)},
         frozenset({"legit"}), "Credit-Notice is accepted only from the configured USDA process.",
         legit=legit_via_flow(v2_deposit(), "Credit-Notice", "usda")),
]

# coordinator: every reply, only from the process that was asked
REPLIES = [
    # action, in-flight scenario, expected sender's name in the error, how the legitimate process sends it
    ("Mint-Response", deposit_minting, "TIM3", legit_deliver(), True),
    ("Mint-Error", deposit_minting, "TIM3",
     legit_via_flow(v2_deposit(), "Mint-Error", "tim3", status=Flow.REFUNDED, setup=remove_coordinator_as_minter), False),
    ("UpdatePosition-Response", deposit_recording, "State Manager", legit_deliver(), True),
    ("UpdatePosition-Error", deposit_recording, "State Manager", None, True),
    ("Burn-Response", redeem_burning, "TIM3", legit_deliver(), True),
    ("Burn-Error", redeem_burning, "TIM3",
     legit_via_flow(v2_redeem(), "Burn-Error", "tim3", status=Flow.FAILED, setup=remove_coordinator_as_minter), False),
    ("Debit-Notice", redeem_paying, "USDA", legit_deliver(), True),
    ("Transfer-Error", redeem_paying, "USDA", None, True),
    ("LockCollateral-Success", lock_locking, "Lock Manager", legit_deliver(), True),
    ("LockCollateral-Error", lock_locking, "Lock Manager",
     legit_via_flow(v1_deposit(40 * U), "LockCollateral-Error", "lock-manager", status=Flow.FAILED), False),
    ("UnlockCollateral-Success", burn_unlocking, "Lock Manager", legit_deliver(), True),
    ("UnlockCollateral-Error", burn_unlocking, "Lock Manager", None, True),
]


def reply_tags(action):
    def tags(w, ctx, s):
        op = ctx.op
        return {"Action": action, "X-Operation-Id": op.op_id, "User": op.user, "Recipient": op.user,
                "Quantity": str(op.quantity), "Error": "forged"}
    return tags


for action, scenario, who, legit, prepared in REPLIES:
    PROCESS_ROWS.append(PRow(f"coordinator {action}", "coordinator", reply_tags(action), frozenset({"legit"}),
                             f"{action} is accepted only from the configured {who} process.", prepare=scenario,
                             legit=legit, legit_prepared=prepared))
PROCESS_ROWS.append(PRow(
    "coordinator Message-Status-Response", "coordinator",
    lambda w, ctx, s: {"Action": "Message-Status-Response", "Message-Id": ctx.op.awaiting, "Status": "unknown",
                       "Handled": "false", "X-Operation-Id": ctx.op.op_id},
    frozenset({"legit"}), "Message-Status-Response is accepted only from the process that was asked.",
    prepare=status_query_pending, legit=legit_status_answer))

# tokens
PROCESS_ROWS += [
    PRow("tim3 Mint (minters policy)", "tim3",
         lambda w, ctx, s: {"Action": "Mint", "Recipient": s, "Quantity": str(U)}, frozenset({"legit"}),
         "Only an authorized minter may Mint.", legit=legit_via_flow(v2_deposit(), "Mint", "coordinator")),
    PRow("usda Mint (faucet policy, test env)", "usda", lambda w, ctx, s: {"Action": "Mint", "Quantity": str(U)},
         ANY_WALLET | {"foreign"}, "", prepare=remember_usda, effect=usda_minted_to_sender),
    PRow("usda Mint for someone else (faucet policy)", "usda",
         lambda w, ctx, s: {"Action": "Mint", "Recipient": w.victim, "Quantity": str(U)}, OWNER,
         "The faucet mints only to the wallet that asks.",
         effect=lambda w, ctx, m: _eq(holding("usda", w.victim)[0], U)),
    PRow("usda Mint (owner policy, production)", "usda",
         lambda w, ctx, s: {"Action": "Mint", "Recipient": w.victim, "Quantity": str(U)}, OWNER,
         "Only the owner may Mint.", prepare=owner_policy, effect=lambda w, ctx, m: _eq(holding("usda", w.victim)[0], U)),
    PRow("tim3 Burn of alice's TIM3 (User=alice)", "tim3",
         lambda w, ctx, s: {"Action": "Burn", "User": w.wallets["user"], "Quantity": str(U)}, frozenset({"user", "legit"}),
         "Only an authorized minter may burn for a user, inside that user's redemption.",
         prepare=lambda w: SimpleNamespace(tim3=holding("tim3", w.wallets["user"])[0]),
         effect=lambda w, ctx, m: _eq(holding("tim3", w.wallets["user"])[0], ctx.tim3 - U),
         legit=legit_via_flow(v2_redeem(), "Burn", "coordinator",
                              check=lambda w, flow, m: _eq(m.get("Redemption-Request"), flow.id))),
    PRow("usda Lock", "usda", lambda w, ctx, s: {"Action": "Lock", "User": w.wallets["user"], "Quantity": str(U)},
         frozenset({"legit"}), "Only the Lock Manager may Lock.",
         legit=legit_via_flow(v1_deposit(), "Lock", "lock-manager")),
    PRow("usda Unlock", "usda", lambda w, ctx, s: {"Action": "Unlock", "User": w.wallets["user"], "Quantity": str(U)},
         frozenset({"legit"}), "Only the Lock Manager may Unlock.",
         legit=legit_via_flow(v1_redeem(), "Unlock", "lock-manager")),
]
for name in ("usda", "tim3"):
    PROCESS_ROWS += [
        owner_only(f"{name} AddMinter", name, {"Action": "AddMinter", "Minter": lambda w: w.victim},
                   lambda w, ctx, m, n=name: _true(TokenMinter.objects.filter(process__name=n, address=w.victim).exists())),
        owner_only(f"{name} RemoveMinter", name, {"Action": "RemoveMinter", "Minter": lambda w: pid(w, "coordinator")},
                   lambda w, ctx, m, n=name: _true(not TokenMinter.objects.filter(
                       process__name=n, address=pid(w, "coordinator")).exists())),
        owner_only(f"{name} SetLocker", name, {"Action": "SetLocker", "Locker": lambda w: w.victim},
                   lambda w, ctx, m, n=name: _eq(token(n).locker, w.victim)),
        owner_only(f"{name} SetMintPolicy", name, {"Action": "SetMintPolicy", "Mint-Policy": "owner"},
                   lambda w, ctx, m, n=name: _eq(token(n).mint_policy, "owner")),
    ]

# Lock Manager and State Manager
PROCESS_ROWS += [
    owner_only("lock-manager SetProcessConfig coordinator", "lock-manager",
               {"Action": "SetProcessConfig", "Process-Type": "coordinator", "Process-Id": lambda w: w.victim},
               lambda w, ctx, m: _true(LockManagerClient.objects.filter(address=w.victim).exists())),
    owner_only("lock-manager SetProcessConfig usda", "lock-manager",
               {"Action": "SetProcessConfig", "Process-Type": "usda", "Process-Id": lambda w: w.victim},
               lambda w, ctx, m: _eq(LockManagerState.objects.get().usda_process, w.victim)),
    *[PRow(f"lock-manager {action}", "lock-manager",
           lambda w, ctx, s, a=action: {"Action": a, "User": w.wallets["user"], "Quantity": str(U),
                                        "X-Operation-Id": new_id()},
           frozenset({"legit"}), f"Only a coordinator may {action}.",
           legit=legit_via_flow(flow, action, "coordinator"))
      for action, flow in (("LockCollateral", v1_deposit()), ("UnlockCollateral", v1_redeem()))],
    *[PRow(f"lock-manager {action}", "lock-manager",
           lambda w, ctx, s, a=action: {"Action": a, "User": ctx.op.user, "Quantity": str(ctx.op.quantity),
                                        "Error": "forged", "X-Operation-Id": ctx.op.op_id},
           frozenset({"legit"}), f"{action} is accepted only from the configured USDA process.", prepare=scenario,
           legit=legit, legit_prepared=prepared)
      for action, scenario, legit, prepared in (
          ("Lock-Response", lock_locking, legit_deliver(), True),
          ("Lock-Error", lock_locking,
           legit_via_flow(v1_deposit(40 * U), "Lock-Error", "usda", status=Flow.FAILED), False),
          ("Unlock-Response", burn_unlocking, legit_deliver(), True),
          ("Unlock-Error", burn_unlocking, None, True))],
    owner_only("state-manager SetProcessConfig", "state-manager",
               {"Action": "SetProcessConfig", "Process-Type": "coordinator", "Process-Id": lambda w: w.victim},
               lambda w, ctx, m: _true(StateManagerClient.objects.filter(address=w.victim).exists())),
    PRow("state-manager UpdatePosition", "state-manager",
         lambda w, ctx, s: {"Action": "UpdatePosition", "Operation": "mint", "User": w.wallets["user"],
                            "Amount": str(100 * U), "CollateralAmount": "1", "CollateralType": "USDA-custody"},
         frozenset({"legit"}), "Only a coordinator may UpdatePosition.",
         legit=legit_via_flow(v2_deposit(), "UpdatePosition", "coordinator")),
    owner_only("state-manager SetTargetRatio", "state-manager", {"Action": "SetTargetRatio", "Target-Ratio-Bp": "12000"},
               lambda w, ctx, m: _eq(StateManagerState.objects.get().target_ratio_bp, 12_000)),
]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9=_./-]+", "-", name).strip("-")


def _eq(actual, expected) -> None:
    assert actual == expected, (actual, expected)


def _true(value) -> None:
    assert value


def process_cells():
    for row in PROCESS_ROWS:
        for role in PROCESS_ROLES:
            if role == "legit" and row.legit is None:
                continue  # no legitimate process sends this here (printed as "n/a")
            yield pytest.param(row, role, id=f"{slug(row.name)}-{role}")


def send_as(w, role: str, row: PRow, tags: dict) -> Message:
    """Send the request from the role's wallet, or have the relay send it as itself; deliver it
    to the target only (so an in-flight flow stays where it is)."""
    target = w.procs[row.target]
    if role == "foreign":
        msg = relay_send(w.procs["relay"], target, tags)
    else:
        msg = send_message(sender=w.wallets[role], target=target.id, tags=tags)
    if row.bump_ms:
        Message.objects.filter(pk=msg.pk).update(timestamp=F("timestamp") + row.bump_ms)
    drain_mailbox(process_id=target.id)
    msg.refresh_from_db()
    return msg


def assert_only_the_log_grew(before: dict, msg: Message) -> None:
    """The refused message and the runtime's `<Action>-Error` to its sender are the only changes
    (a foreign process's relay order too): every process's state and every web table as before."""
    after = snapshot()
    for section in ("state", "flows", "accounts", "idempotency", "users", "permissions", "tokens", "audit"):
        assert after[section] == before[section], differences({section: before[section]}, {section: after[section]})
    new = set(Message.objects.filter(seq__gt=before["messages"]["max_seq"]).values_list("msg_id", flat=True))
    allowed = {msg.msg_id, *Message.objects.filter(parent_id=msg.msg_id).values_list("msg_id", flat=True)}
    if msg.parent_id:
        allowed.add(msg.parent_id)  # the order the relay was given
    assert new <= allowed, new - allowed
    old = {m[0]: m for m in before["messages"]["rows"]}
    for row in Message.objects.filter(msg_id__in=old).values_list("msg_id", "sender", "target", "action", "status",
                                                                  "slot", "error", "handled", "dead"):
        assert row == old[row[0]], (old[row[0]], row)  # nothing already in the log was touched


@pytest.mark.parametrize(("row", "role"), list(process_cells()))
def test_process_authority(w, row, role):
    ctx = row.prepare(w) if row.prepare and (role != "legit" or row.legit_prepared) else None
    if role == "legit":
        row.legit(w, ctx)
        SEEN[("process", row.name, role)] = "allowed"
        return
    sender = pid(w, "relay") if role == "foreign" else w.wallets[role]
    tags = row.tags(w, ctx, sender)
    before = snapshot()
    msg = send_as(w, role, row, tags)
    assert msg.sender == sender
    if role in row.allowed:
        assert msg.status == Message.APPLIED and msg.handled, msg.error
        row.effect(w, ctx, msg)
        SEEN[("process", row.name, role)] = "allowed"
        return
    assert (msg.status, msg.error) == (Message.FAILED, row.error)
    if not msg.action.endswith("-Error"):
        [reply] = Message.objects.filter(parent_id=msg.msg_id)
        assert (reply.action, reply.target, reply.get("Error")) == (f"{msg.action}-Error", sender, row.error)
    assert_only_the_log_grew(before, msg)
    if ctx is not None and hasattr(ctx, "op"):
        op = Operation.objects.get(pk=ctx.op.pk)
        assert (op.step, op.status, op.awaiting) == (ctx.op.step, ctx.op.status, ctx.op.awaiting)
    SEEN[("process", row.name, role)] = "denied"


def test_every_authority_rule_is_in_the_matrix():
    """Every owner-only handler of every blueprint, and every reply the coordinator takes, has a row."""
    names = {row.name.split(" ")[1] for row in PROCESS_ROWS}
    for action in ("Configure", "SetProcessConfig", "SetUsdaProcess", "SetMockUsdaProcess", "SetTokenManagerProcess",
                   "SetLockManagerProcess", "SetStateManagerProcess", "EmergencyPause", "Resume", "CleanupExpired",
                   "Risk-Alert", "Credit-Notice", "Mint", "Burn", "AddMinter", "RemoveMinter", "SetLocker",
                   "SetMintPolicy", "Lock", "Unlock", "LockCollateral", "UnlockCollateral", "Lock-Response",
                   "Unlock-Response", "Lock-Error", "Unlock-Error", "UpdatePosition", "SetTargetRatio",
                   "Message-Status-Response", *[r[0] for r in REPLIES]):
        assert action in names, action
    assert len(PROCESS_ROWS) * len(PROCESS_ROLES) >= 400


# --- the web table ---------------------------------------------------------------------------------------

def client_for(w, role: str) -> Client:
    """A browser for the role (its session made once, at world build), with a CSRF cookie."""
    client = Client(enforce_csrf_checks=True)
    if role != "anonymous":
        client.cookies[settings.SESSION_COOKIE_NAME] = w.sessions[role]
    client.cookies["csrftoken"] = CSRF
    return client


def page_post(path: str, data: dict | None = None):
    return lambda w, role: client_for(w, role).post(path, {**(data or {}), "csrfmiddlewaretoken": CSRF})


def page_get(path: str):
    return lambda w, role: client_for(w, role).get(path)


def api_call(method: str, path: str, body: dict | None = None):
    def call(w, role):
        headers = {"Authorization": f"Bearer {w.tokens[role]}"} if role != "anonymous" else {}
        client = Client(enforce_csrf_checks=True)
        if method == "get":
            return client.get(path, headers=headers)
        return client.post(path, json.dumps(body or {}), content_type="application/json", headers=headers)
    return call


@dataclass(frozen=True)
class WRow:
    name: str
    kind: str  # page | api | admin-site: how a refusal looks
    call: Callable  # (w, role) -> response
    allowed: frozenset
    effect: Callable  # (w, role, response, ctx)
    prepare: Callable | None = None  # (w) -> ctx, before the snapshot


LOGGED_IN = frozenset({"user", "other", "staff", "guardian", "admin"})
STAFF = frozenset({"staff", "guardian", "admin"})
ADMIN = frozenset({"admin"})


def own_flow(kind: str, location: bool = True):
    """The request started a flow of the caller's own wallet, and no other flow."""
    def effect(w, role, response, ctx):
        if location:
            assert response.status_code == 302 and "/flows/" in response["Location"], response.status_code
            flow_id = response["Location"].rstrip("/").split("/")[-1]
        else:
            assert response.status_code == 202, response.content
            flow_id = response.json()["flow_id"]
        flow = Flow.objects.get(id=flow_id)
        assert (flow.user, flow.kind) == (w.wallets[role], kind)
        assert Flow.objects.filter(created_at__gte=flow.created_at).exclude(id=flow.id).count() == 0
        assert final(flow).status == Flow.COMPLETED, flow.error
    return effect


def shows_own_wallet(w, role, response, ctx):
    assert response.status_code == 200
    assert response.context["my_address"] == w.wallets[role]


def api_own_wallet(w, role, response, ctx):
    assert response.status_code == 200 and response.json()["address"] == w.wallets[role]


def api_own_flows(w, role, response, ctx):
    assert response.status_code == 200
    results = response.json()["results"]
    assert results and {f["user"] for f in results} == {w.wallets[role]}


def status_200(w, role, response, ctx):
    assert response.status_code == 200, response.status_code


def paused_by(kind):
    def effect(w, role, response, ctx):
        assert response.status_code == (302 if kind == "page" else 202), response.content[:300]
        run_until_idle()
        state = pause_state()
        assert state["mint"] and state["by"] == w.wallets[role]
        assert AuditEntry.objects.get(action="pause").actor == w.users[role]
    return effect


def resumed(kind):
    def effect(w, role, response, ctx):
        assert response.status_code == (302 if kind == "page" else 202), response.content[:300]
        run_until_idle()
        assert not pause_state()["mint"] and not pause_state()["redeem"]
        assert AuditEntry.objects.get(action="resume").actor == w.users[role]
    return effect


def limits_changed(w, role, response, ctx):
    assert response.status_code == 302
    run_until_idle()
    assert coord().max_amount == 90_000 * U
    assert AuditEntry.objects.get(action="configure").actor == w.users[role]


def limits_form(**changes):
    def call(w, role):
        from tim3web.forms import LimitsForm

        form = LimitsForm(current=views.limit_values(coord()))
        data = {**{name: field.initial for name, field in form.fields.items()}, **changes}
        return page_post("/ops/limits", data)(w, role)
    return call


def spawned(w, role, response, ctx):
    assert response.status_code == 302
    assert Process.objects.filter(kind="coordinator", version=2).exists()


def spawn_v2(w):
    return SimpleNamespace(v2=spawn_coordinator())


def activate_v2(w, role):
    return page_post("/ops/coordinators/activate", {"process": Process.objects.get(kind="coordinator", version=2).id})(
        w, role)


def v2_active(w, role, response, ctx):
    assert response.status_code == 302
    assert Process.objects.get(kind="coordinator", active=True).version == 2


def spawn_and_activate_v2(w):
    from processes.services import activate_coordinator

    return SimpleNamespace(v2=activate_coordinator(process=spawn_coordinator()))


def v1_active(w, role, response, ctx):
    assert response.status_code == 302
    assert Process.objects.get(kind="coordinator", active=True).version == 1


class StartRecorder:
    started: list = []

    def __init__(self, target, args, **kwargs):
        self.target, self.args = target, args

    def start(self):
        StartRecorder.started.append(self.args)


def system_check_started(w, role, response, ctx):
    assert response.status_code == 302
    assert StartRecorder.started == [(w.users[role].pk,)]
    assert AuditEntry.objects.get(action="system_check").actor == w.users[role]


def token_revoked(w, role, response, ctx):
    assert response.status_code == 302
    assert not ApiToken.objects.filter(pk=ctx.pk).exists()


def revoke_alices_token(w, role):
    row = ApiToken.objects.filter(user=w.users["user"]).first()
    return page_post(f"/admin/tim3web/apitoken/{row.pk}/delete/", {"post": "yes"})(w, role)


WEB_ROWS: list[WRow] = [
    WRow("GET /wallet", "page", page_get("/wallet"), LOGGED_IN, shows_own_wallet),
    WRow("POST /wallet/deposit", "page", page_post("/wallet/deposit", {"deposit-amount": "1", "deposit-mode": "deposit"}),
         LOGGED_IN, own_flow("deposit")),
    WRow("POST /wallet/redeem", "page", page_post("/wallet/redeem", {"redeem-amount": "1", "redeem-mode": "deposit"}),
         LOGGED_IN, own_flow("redeem")),
    WRow("POST /wallet/faucet", "page", page_post("/wallet/faucet", {"amount": "1"}), LOGGED_IN, own_flow("faucet")),
    WRow("GET /api/wallet", "api", api_call("get", "/api/wallet"), LOGGED_IN, api_own_wallet),
    WRow("POST /api/deposits", "api", api_call("post", "/api/deposits", {"quantity": str(U)}), LOGGED_IN,
         own_flow("deposit", location=False)),
    WRow("POST /api/redemptions", "api", api_call("post", "/api/redemptions", {"quantity": str(U)}), LOGGED_IN,
         own_flow("redeem", location=False)),
    WRow("POST /api/faucet", "api", api_call("post", "/api/faucet", {"quantity": str(U)}), LOGGED_IN,
         own_flow("faucet", location=False)),
    WRow("GET /api/flows?mine=1", "api", api_call("get", "/api/flows?mine=1"), LOGGED_IN, api_own_flows),
    WRow("GET /ops", "page", page_get("/ops"), STAFF, status_200),
    WRow("POST /ops/pause", "page", page_post("/ops/pause", {"scope": "mint", "reason": "matrix"}),
         frozenset({"guardian", "admin"}), paused_by("page")),
    WRow("POST /ops/resume", "page", page_post("/ops/resume", {"scope": "all"}), ADMIN, resumed("page"),
         prepare=paused_by_owner),
    WRow("POST /ops/limits", "page", limits_form(MaxAmount="90000"), ADMIN, limits_changed),
    WRow("POST /ops/coordinators/spawn", "page", page_post("/ops/coordinators/spawn"), ADMIN, spawned),
    WRow("POST /ops/coordinators/activate", "page", activate_v2, ADMIN, v2_active, prepare=spawn_v2),
    WRow("POST /ops/coordinators/rollback", "page", page_post("/ops/coordinators/rollback"), ADMIN, v1_active,
         prepare=spawn_and_activate_v2),
    WRow("POST /ops/system-check", "page", page_post("/ops/system-check"), ADMIN, system_check_started),
    WRow("POST /api/admin/pause", "api", api_call("post", "/api/admin/pause", {"scope": "mint", "reason": "matrix"}),
         frozenset({"guardian", "admin"}), paused_by("api")),
    WRow("POST /api/admin/resume", "api", api_call("post", "/api/admin/resume", {"scope": "all"}), ADMIN, resumed("api"),
         prepare=paused_by_owner),
    WRow("GET /admin/", "admin-site", page_get("/admin/"), STAFF, status_200),
    WRow("GET /admin/tim3web/auditentry/", "admin-site", page_get("/admin/tim3web/auditentry/"), ADMIN, status_200),
    WRow("GET /admin/auth/user/", "admin-site", page_get("/admin/auth/user/"), ADMIN, status_200),
    WRow("POST /admin/ revoke a token", "admin-site", revoke_alices_token, ADMIN, token_revoked,
         prepare=lambda w: ApiToken.objects.filter(user=w.users["user"]).first()),
]


def refused(kind: str, role: str, response) -> None:
    if kind == "api":
        status, code = (401, "authentication_required") if role == "anonymous" else (403, "forbidden")
        assert response.status_code == status, (response.status_code, response.content[:300])
        assert response.json()["code"] == code
    elif kind == "admin-site" and (role == "anonymous" or role in ("user", "other")):
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/"), response.status_code
    elif role == "anonymous":
        assert response.status_code == 302 and response["Location"].startswith("/login?next="), response.status_code
    else:
        assert response.status_code == 403, (response.status_code, response.content[:300])


@pytest.mark.parametrize(("row", "role"), [pytest.param(r, role, id=f"{slug(r.name)}-{role}")
                                           for r in WEB_ROWS for role in WEB_ROLES])
def test_web_authority(w, row, role, monkeypatch):
    monkeypatch.setattr(views.threading, "Thread", StartRecorder)
    monkeypatch.setitem(views.SYSTEM_CHECK, "running", False)  # the recorder never runs the check, so never ends it
    StartRecorder.started = []
    ctx = row.prepare(w) if row.prepare else None
    before = snapshot()
    response = row.call(w, role)
    if role in row.allowed:
        row.effect(w, role, response, ctx)
        SEEN[("web", row.name, role)] = "allowed"
        return
    refused(row.kind, role, response)
    assert StartRecorder.started == []
    assert_unchanged(before, f"{row.name} as {role}")
    SEEN[("web", row.name, role)] = "denied"


# --- the printed matrix --------------------------------------------------------------------------------

def table(kind: str, rows: list, roles: list[str]) -> list[str]:
    width = max(len(r.name) for r in rows) + 2
    lines = [" " * width + " ".join(f"{role[:9]:>9}" for role in roles)]
    for row in rows:
        cells = []
        for role in roles:
            if kind == "process" and role == "legit" and row.legit is None:
                cells.append("n/a")
                continue
            expected = "allowed" if role in row.allowed else "denied"
            seen = SEEN.get((kind, row.name, role))
            cells.append("?" if seen is None else ("ALLOW" if seen == "allowed" else "deny") +
                         ("" if seen == expected else "!"))
        lines.append(f"{row.name:<{width}}" + " ".join(f"{c:>9}" for c in cells))
    return lines


def report(pytestconfig) -> None:
    """Print the matrix; write it to test-artifacts only when every cell ran (a partial run
    does not overwrite a complete one)."""
    if not SEEN:
        return
    lines = ["Authorization matrix (ALLOW: the effect happened; deny: refused, nothing changed; "
             "n/a: no such sender; ?: not run)", "", "Process handlers:"]
    lines += table("process", PROCESS_ROWS, PROCESS_ROLES)
    lines += ["", "Pages, forms, API, Django admin:"]
    lines += table("web", WEB_ROWS, WEB_ROLES)
    cells = len(list(process_cells())) + len(WEB_ROWS) * len(WEB_ROLES)
    if len(SEEN) == cells:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "authz_matrix.txt").write_text("\n".join(lines) + "\n")
        (ARTIFACTS / "authz_matrix.json").write_text(json.dumps({
            "roles": {"process": PROCESS_ROLES, "web": WEB_ROLES},
            "cells": [{"table": t, "row": r, "role": role, "result": v} for (t, r, role), v in sorted(SEEN.items())],
            "allowed": sum(v == "allowed" for v in SEEN.values()),
            "denied": sum(v == "denied" for v in SEEN.values()),
        }, indent=1) + "\n")
    reporter = pytestconfig.pluginmanager.getplugin("terminalreporter")
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
