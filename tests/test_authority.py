"""Authority: every handler with an authority rule, attacked by everyone it must refuse.

Each refusal is checked the same way: the request is recorded `failed` with a
clear error, its sender gets `<Action>-Error` carrying that error, and the
state of every process is exactly what it was before (`world()` snapshots the
blueprint state of all processes, as replay does). A positive control shows
the rightful sender succeeds with the very same request.

Attackers are wallets (anyone can send any message from their own wallet) and,
wherever the system offers a real route, processes: a second token, a second
Lock Manager or State Manager, and a coordinator that was never granted any
right, all spawned by the operator and driven only by ordinary messages. No
message row is ever written by hand: where no process can be made to send a
message, the test says so instead of forging one.
"""

import pytest
from django.db.models import F

from processes import actions
from processes.blueprints.state import (
    CollateralLock,
    CoordinatorState,
    LockRequest,
    Operation,
    TokenAccount,
    TokenState,
)
from processes.flows import Flow
from processes.invariants import check_invariants
from processes.runtime.delivery import drain_mailbox, processes_with_pending, run_until_idle, send_message, spawn_process
from processes.runtime.ids import new_id
from processes.runtime.models import Message, Process
from processes.runtime.quantities import UNIT
from processes.runtime.replay import replay_all, snapshot_state
from processes.runtime.tags import TagError
from processes.services import ensure_wallet, operator_address, send_cleanup_expired

U = UNIT


# --- helpers ------------------------------------------------------------------------------------


def world(*names: str) -> dict:
    """The blueprint state of these processes (all when none named), as replay compares it."""
    qs = Process.objects.order_by("name")
    if names:
        qs = qs.filter(name__in=names)
    return {p.name: snapshot_state(p) for p in qs}


def pid(process: Process | str) -> str:
    return process.id if isinstance(process, Process) else Process.objects.get(name=process).id


def send(sender: str, process: Process | str, tags: dict) -> Message:
    """Send from a wallet and deliver everything."""
    msg = send_message(sender=sender, target=pid(process), tags=tags)
    run_until_idle()
    msg.refresh_from_db()
    return msg


def send_only(sender: str, process: Process | str, tags: dict) -> Message:
    """Send from a wallet and deliver only to that process (flows in flight elsewhere stay put)."""
    target = pid(process)
    assert not Message.objects.filter(target=target, status=Message.PENDING).exists()
    msg = send_message(sender=sender, target=target, tags=tags)
    drain_mailbox(process_id=target)
    msg.refresh_from_db()
    return msg


def owner_send(process: Process | str, tags: dict) -> Message:
    msg = send(operator_address(), process, tags)
    assert msg.status == Message.APPLIED, msg.error
    return msg


def drain(*names: str) -> None:
    """Deliver only to these processes until none of them has anything pending."""
    ids = set(Process.objects.filter(name__in=names).values_list("id", flat=True))
    while targets := [t for t in processes_with_pending() if t in ids]:
        for target in targets:
            drain_mailbox(process_id=target)


def assert_refused(msg: Message, error: str) -> None:
    """Failed with this error, and the sender was told so (the runtime's `<Action>-Error`;
    never for an error reply itself, so two processes cannot bounce errors forever)."""
    assert (msg.status, msg.error) == (Message.FAILED, error)
    if msg.action.endswith("-Error"):
        assert not Message.objects.filter(parent_id=msg.msg_id).exists()
        return
    [reply] = Message.objects.filter(parent_id=msg.msg_id)
    assert (reply.action, reply.target, reply.get("Error")) == (f"{msg.action}-Error", msg.sender, error)
    assert reply.get("Message-Id") == msg.msg_id


def attempt(sender: str, process: Process | str, tags: dict, error: str, *, only: bool = False) -> Message:
    """Send a request that must be refused; check it changed nothing anywhere."""
    before = world()
    msg = (send_only if only else send)(sender, process, tags)
    assert_refused(msg, error)
    assert world() == before
    assert check_invariants() == []
    return msg


def assert_consistent() -> None:
    run_until_idle()
    assert check_invariants() == []
    report = replay_all()
    assert report.clean, report.differences


def balance(token: str, who: str) -> tuple[int, int]:
    row = TokenAccount.objects.filter(process__name=token, account=who).first()
    return (row.balance, row.locked) if row else (0, 0)


def supply(token: str = "tim3") -> int:
    return TokenState.objects.get(process__name=token).total_supply


def fund(who: str, quantity: int) -> None:
    while quantity > 0:
        chunk = min(quantity, 1_000 * U)
        flow = actions.request_faucet(wallet=who, quantity=str(chunk))
        run_until_idle()
        flow.refresh_from_db()
        assert flow.status == Flow.COMPLETED, flow.error
        quantity -= chunk


def settle(flow: Flow) -> Flow:
    run_until_idle()
    flow.refresh_from_db()
    return flow


def operation(flow: Flow) -> Operation:
    return Operation.objects.get(flow_id=flow.id)


def spawn(name: str, kind: str, **tags) -> Process:
    process = spawn_process(name=name, kind=kind, owner=operator_address(), tags=tags)
    run_until_idle()
    return process


def fake_token(name: str, ticker: str, policy: str = "owner") -> Process:
    return spawn(name, "token", **{"Token-Name": name, "Ticker": ticker, "Mint-Policy": policy})


def rogue_coordinator(system, **processes: str) -> Process:
    """A coordinator the operator spawned but never granted a right anywhere
    (not a TIM3 minter, not a Lock Manager or State Manager client), pointed at
    `processes` (kind -> id), the real ones by default."""
    rogue = spawn("coordinator-rogue", "coordinator")
    wiring = {"usda": system["usda"].id, "tim3": system["tim3"].id, "lock-manager": system["lock-manager"].id,
              "state-manager": system["state-manager"].id, **processes}
    for kind, process_id in wiring.items():
        owner_send(rogue, {"Action": "SetProcessConfig", "Process-Type": kind, "Process-Id": process_id})
    return rogue


@pytest.fixture
def attacker(wallet):
    return wallet()


# --- 1. Credit-Notice: only the configured USDA process makes a deposit ----------------------------


def test_credit_notice_from_a_wallet_mints_nothing(system, attacker):
    for sender in (attacker, operator_address(), ensure_wallet(label="scheduler").address):
        attempt(sender, system["coordinator"], {
            "Action": "Credit-Notice", "Sender": sender, "Quantity": str(1_000 * U)},
            "Credit-Notice is accepted only from the configured USDA process.")
    assert supply() == 0 and not Operation.objects.exists()
    assert_consistent()


def test_credit_notice_from_a_second_token_process_mints_nothing(system, attacker):
    """A real process, not the configured USDA: a token the operator spawned, minted on as its
    owner and transferred from to the coordinator. Its Credit-Notice is refused."""
    fake = fake_token("usda-fake", "USDA")
    owner_send(fake, {"Action": "Mint", "Recipient": attacker, "Quantity": str(5_000 * U)})
    pay = send_message(sender=attacker, target=fake.id, tags={
        "Action": "Transfer", "Recipient": system["coordinator"].id, "Quantity": str(5_000 * U)})
    drain("usda-fake")
    before = world("usda", "tim3", "coordinator", "lock-manager", "state-manager")
    run_until_idle()

    notice = Message.objects.get(pushed_for=pay.msg_id, action="Credit-Notice")
    assert (notice.sender, notice.target) == (fake.id, system["coordinator"].id)
    assert_refused(notice, "Credit-Notice is accepted only from the configured USDA process.")
    assert world("usda", "tim3", "coordinator", "lock-manager", "state-manager") == before
    assert supply() == 0 and balance("tim3", attacker) == (0, 0)
    assert not Operation.objects.exists()
    # The operator's own transfer on the second token is refused the same way.
    owner_send(fake, {"Action": "Mint", "Quantity": str(U)})
    owner_send(fake, {"Action": "Transfer", "Recipient": system["coordinator"].id, "Quantity": str(U)})
    assert supply() == 0 and not Operation.objects.exists()
    assert_consistent()


def test_credit_notice_from_the_configured_usda_mints(system, attacker):
    """Positive control: the real USDA transfer is a deposit."""
    fund(attacker, 100 * U)
    flow = settle(actions.request_deposit(wallet=attacker, quantity=str(100 * U)))
    assert flow.status == Flow.COMPLETED
    notice = Message.objects.get(pushed_for=flow.id, action="Credit-Notice")
    assert (notice.sender, notice.status) == (system["usda"].id, Message.APPLIED)
    assert balance("tim3", attacker) == (100 * U, 0) and supply() == 100 * U
    assert_consistent()


def test_an_operation_id_forwarded_by_usda_is_never_trusted(system, attacker, wallet):
    """USDA forwards every X-* tag, so an attacker can make the real USDA deliver a
    Credit-Notice carrying someone else's X-Operation-Id: it opens a new deposit of
    its own and leaves the victim's pending operation alone."""
    victim = wallet()
    fund(victim, 100 * U)
    fund(attacker, 10 * U)
    flow = actions.request_deposit(wallet=victim, quantity=str(100 * U))
    drain("usda", "coordinator")
    op = operation(flow)
    assert op.step == "minting"
    send_message(sender=attacker, target=system["usda"].id, tags={
        "Action": "Transfer", "Recipient": system["coordinator"].id, "Quantity": str(10 * U),
        "X-Operation-Id": op.op_id})
    drain("usda", "coordinator")
    op.refresh_from_db()
    assert (op.step, op.status, op.quantity) == ("minting", Operation.PENDING, 100 * U)
    assert Operation.objects.filter(user=attacker, quantity=10 * U).exclude(op_id=op.op_id).count() == 1
    assert settle(flow).status == Flow.COMPLETED
    assert balance("tim3", victim) == (100 * U, 0) and balance("tim3", attacker) == (10 * U, 0)
    assert_consistent()


# --- 2. Mint: TIM3 only by its minters, USDA (production) only by its owner --------------------------


def test_tim3_mint_from_a_non_minter_fails(system, attacker):
    for sender in (attacker, operator_address()):  # the TIM3 owner is not a minter either
        attempt(sender, system["tim3"], {"Action": "Mint", "Recipient": sender, "Quantity": str(100 * U)},
                "Only an authorized minter may Mint.")
    assert supply() == 0
    assert_consistent()


def test_tim3_mint_from_a_coordinator_that_is_not_a_minter_fails(system, attacker):
    """A real process: a coordinator never made a minter takes a deposit of a second
    token (configured as its USDA) and asks the real TIM3 to mint: refused."""
    fake = fake_token("usda-fake", "USDA")
    rogue = rogue_coordinator(system, usda=fake.id)
    owner_send(fake, {"Action": "Mint", "Recipient": attacker, "Quantity": str(50 * U)})
    send(attacker, fake, {"Action": "Transfer", "Recipient": rogue.id, "Quantity": str(50 * U)})
    mint = Message.objects.get(sender=rogue.id, target=system["tim3"].id, action="Mint")
    assert_refused(mint, "Only an authorized minter may Mint.")
    assert supply() == 0 and balance("tim3", attacker) == (0, 0)
    assert Operation.objects.get(process=rogue).status == Operation.REFUNDED
    assert balance("usda-fake", attacker) == (50 * U, 0)
    assert_consistent()


def test_usda_mint_in_production_policy_only_by_the_owner(system, attacker, wallet):
    owner_send(system["usda"], {"Action": "SetMintPolicy", "Mint-Policy": "owner"})
    for tags in ({"Action": "Mint", "Quantity": str(100 * U)},
                 {"Action": "Mint", "Recipient": attacker, "Quantity": str(100 * U)}):
        attempt(attacker, system["usda"], tags, "Only the owner may Mint.")
    assert supply("usda") == 0
    # Positive control: the owner mints, to anyone.
    user = wallet()
    owner_send(system["usda"], {"Action": "Mint", "Recipient": user, "Quantity": str(100 * U)})
    assert balance("usda", user) == (100 * U, 0) and supply("usda") == 100 * U
    assert_consistent()


def test_the_faucet_mints_only_to_the_wallet_that_asks(system, attacker, wallet):
    attempt(attacker, system["usda"], {"Action": "Mint", "Recipient": wallet(), "Quantity": str(U)},
            "The faucet mints only to the wallet that asks.")
    msg = send(attacker, system["usda"], {"Action": "Mint", "Quantity": str(U)})
    assert msg.status == Message.APPLIED and balance("usda", attacker) == (U, 0)
    assert_consistent()


# --- 3. owner-only configuration -----------------------------------------------------------------

ATTACKER = "<attacker>"  # replaced by the attacking wallet's address
COORDINATOR = "<coordinator>"  # replaced by the coordinator's id

OWNER_ONLY = [
    ("coordinator", {"Action": "Configure", "ConfigType": "MaxAmount", "Value": str(50 * U)}),
    ("coordinator", {"Action": "Configure", "ConfigType": "MinAmount", "Value": "1"}),
    ("coordinator", {"Action": "Configure", "ConfigType": "RateLimitPerMinute", "Value": "1000"}),
    ("coordinator", {"Action": "Configure", "ConfigType": "PendingTimeout", "Value": "1"}),
    ("coordinator", {"Action": "Configure", "ConfigType": "AddGuardian", "Value": ATTACKER}),
    ("coordinator", {"Action": "Configure", "ConfigType": "AddAdmin", "Value": ATTACKER}),
    ("coordinator", {"Action": "Configure", "ConfigType": "RemoveAdmin", "Value": ATTACKER}),
    ("coordinator", {"Action": "SetProcessConfig", "Process-Type": "usda", "Process-Id": ATTACKER}),
    ("coordinator", {"Action": "SetProcessConfig", "Process-Type": "tim3", "Process-Id": ATTACKER}),
    ("coordinator", {"Action": "SetProcessConfig", "Process-Type": "lock-manager", "Process-Id": ATTACKER}),
    ("coordinator", {"Action": "SetProcessConfig", "Process-Type": "state-manager", "Process-Id": ATTACKER}),
    ("coordinator", {"Action": "SetProcessConfig", "Process-Type": "scheduler", "Process-Id": ATTACKER}),
    ("coordinator", {"Action": "SetUsdaProcess", "Process-Id": ATTACKER}),
    ("coordinator", {"Action": "SetMockUsdaProcess", "Value": ATTACKER}),
    ("coordinator", {"Action": "SetTokenManagerProcess", "Process-Id": ATTACKER}),
    ("coordinator", {"Action": "SetLockManagerProcess", "Process-Id": ATTACKER}),
    ("coordinator", {"Action": "SetStateManagerProcess", "Process-Id": ATTACKER}),
    ("lock-manager", {"Action": "SetProcessConfig", "Process-Type": "usda", "Process-Id": ATTACKER}),
    ("lock-manager", {"Action": "SetProcessConfig", "Process-Type": "coordinator", "Process-Id": ATTACKER}),
    ("state-manager", {"Action": "SetProcessConfig", "Process-Type": "coordinator", "Process-Id": ATTACKER}),
    ("state-manager", {"Action": "SetTargetRatio", "Target-Ratio-Bp": "50000"}),
    *[(token, tags) for token in ("usda", "tim3") for tags in (
        {"Action": "AddMinter", "Minter": ATTACKER},
        {"Action": "RemoveMinter", "Minter": COORDINATOR},
        {"Action": "SetLocker", "Locker": ATTACKER},
        {"Action": "SetMintPolicy", "Mint-Policy": "faucet"},
        {"Action": "SetMintPolicy", "Mint-Policy": "owner"},
    )],
]


@pytest.mark.parametrize(("name", "template"), OWNER_ONLY,
                         ids=[f"{n}-{t['Action']}-{t.get('ConfigType') or t.get('Process-Type') or ''}"
                              f"{t.get('Mint-Policy', '')}" for n, t in OWNER_ONLY])
def test_configuration_only_by_the_owner(system, attacker, wallet, name, template):
    coordinator = system["coordinator"]
    tags = {k: {ATTACKER: attacker, COORDINATOR: coordinator.id}.get(v, v) for k, v in template.items()}
    guardian, admin = wallet(), wallet()
    owner_send(coordinator, {"Action": "Configure", "ConfigType": "AddGuardian", "Value": guardian})
    owner_send(coordinator, {"Action": "Configure", "ConfigType": "AddAdmin", "Value": admin})
    scheduler = ensure_wallet(label="scheduler").address
    # Neither a stranger nor a guardian, an admin or the scheduler owns a process.
    for sender in (attacker, guardian, admin, scheduler):
        attempt(sender, system[name], tags, f"Only the owner may {tags['Action']}.")
    # Positive control: the owner may.
    before = world(name)
    owner_send(system[name], tags)
    sets_what_was = (tags.get("ConfigType") == "RemoveAdmin" or (name, tags.get("Mint-Policy")) == ("usda", "faucet")
                     or (name, tags["Action"]) == ("usda", "RemoveMinter"))
    assert (world(name) == before) is sets_what_was
    assert check_invariants() == []


@pytest.mark.parametrize("name", ["usda", "tim3", "coordinator", "lock-manager", "state-manager"])
def test_spawn_again_changes_nothing(system, attacker, name):
    error = {"usda": "This token is already spawned.", "tim3": "This token is already spawned.",
             "coordinator": "Only the owner may Spawn.", "lock-manager": "Only the owner may Spawn.",
             "state-manager": "Only the owner may Spawn."}[name]
    attempt(attacker, system[name], {"Action": "Spawn", "Name": name, "Mint-Policy": "faucet"}, error)


# --- 4. USDA Lock/Unlock: only the Lock Manager -----------------------------------------------------


def locked_user(wallet, quantity: int = 100 * U) -> str:
    """A user with `quantity` USDA locked through a completed v1 lock mint."""
    user = wallet()
    fund(user, 2 * quantity)
    assert settle(actions.request_deposit(wallet=user, quantity=str(quantity), mode="lock")).status == Flow.COMPLETED
    assert balance("usda", user) == (2 * quantity, quantity)
    return user


def test_usda_lock_and_unlock_only_by_the_lock_manager(system, attacker, wallet):
    victim = locked_user(wallet)
    fund(attacker, 10 * U)
    # The coordinator cannot be made to send Lock or Unlock to USDA (it only ever
    # sends USDA a Transfer), so a wallet and the owner stand in for "anyone else".
    for sender in (attacker, victim, operator_address()):
        for user in (victim, attacker):
            attempt(sender, system["usda"], {"Action": "Lock", "User": user, "Quantity": str(10 * U)},
                    "Only the Lock Manager may Lock.")
            attempt(sender, system["usda"], {"Action": "Unlock", "User": user, "Quantity": str(10 * U)},
                    "Only the Lock Manager may Unlock.")
    assert balance("usda", victim) == (200 * U, 100 * U)
    assert_consistent()


def test_usda_lock_from_a_second_lock_manager_fails(system, wallet):
    """A real process: a second Lock Manager, pointed at the real USDA and told by its owner
    to lock a victim's USDA, sends USDA a Lock that is refused."""
    victim = wallet()
    fund(victim, 100 * U)
    rogue = spawn("lock-manager-rogue", "lock-manager")
    owner_send(rogue, {"Action": "SetProcessConfig", "Process-Type": "usda", "Process-Id": system["usda"].id})
    owner_send(rogue, {"Action": "SetProcessConfig", "Process-Type": "coordinator", "Process-Id": operator_address()})
    before = world("usda")
    request = owner_send(rogue, {"Action": "LockCollateral", "User": victim, "Quantity": str(100 * U),
                                 "X-Operation-Id": new_id()})
    lock = Message.objects.get(pushed_for=request.msg_id, action="Lock")
    assert (lock.sender, lock.target) == (rogue.id, system["usda"].id)
    assert_refused(lock, "Only the Lock Manager may Lock.")
    assert world("usda") == before and balance("usda", victim) == (100 * U, 0)
    relayed = Message.objects.get(pushed_for=request.msg_id, action="LockCollateral-Error")
    assert relayed.get("Error") == "Only the Lock Manager may Lock."
    assert_consistent()


# --- 5. LockCollateral/UnlockCollateral: only an authorized coordinator --------------------------------


def test_lock_and_unlock_collateral_only_from_a_coordinator(system, attacker, wallet):
    victim = locked_user(wallet)
    guardian = wallet()
    owner_send(system["coordinator"], {"Action": "Configure", "ConfigType": "AddGuardian", "Value": guardian})
    for sender in (attacker, victim, guardian, operator_address()):
        for action in ("LockCollateral", "UnlockCollateral"):
            attempt(sender, system["lock-manager"], {
                "Action": action, "User": victim, "Quantity": str(10 * U), "X-Operation-Id": new_id()},
                f"Only a coordinator may {action}.")
    assert balance("usda", victim) == (200 * U, 100 * U)
    assert_consistent()


def test_lock_collateral_from_an_unauthorized_coordinator_fails(system, attacker):
    """A real process: a coordinator the Lock Manager does not know asks it to lock."""
    fund(attacker, 100 * U)
    rogue = rogue_coordinator(system)
    before = world("usda", "lock-manager")
    flow = settle(actions.start_flow(user=attacker, target=rogue.id, kind="deposit", mode="lock",
                                     tags={"Action": "MintTIM3", "Quantity": str(50 * U)}))
    request = Message.objects.get(pushed_for=flow.id, action="LockCollateral")
    assert (request.sender, request.target) == (rogue.id, system["lock-manager"].id)
    assert_refused(request, "Only a coordinator may LockCollateral.")
    assert world("usda", "lock-manager") == before
    assert (flow.status, flow.error) == (Flow.FAILED, "Only a coordinator may LockCollateral.")
    assert balance("usda", attacker) == (100 * U, 0) and supply() == 0
    assert_consistent()


def test_unlock_collateral_from_an_unauthorized_coordinator_fails(system, attacker, wallet):
    """A real process asks to unlock collateral the attacker locked through the real
    coordinator (which would leave the attacker's TIM3 unbacked): refused.

    The unauthorized coordinator is driven there by messages only: its Lock Manager is
    first an accomplice's wallet (which answers LockCollateral-Success), then, while its
    Mint (refused: not a minter) is in flight, the real Lock Manager; the compensation
    for the failed mint is an UnlockCollateral to the real Lock Manager."""
    fund(attacker, 200 * U)
    flow = settle(actions.request_deposit(wallet=attacker, quantity=str(100 * U), mode="lock"))
    assert flow.status == Flow.COMPLETED
    accomplice = wallet()
    rogue = rogue_coordinator(system, **{"lock-manager": accomplice})

    mint = send(attacker, rogue, {"Action": "MintTIM3", "Quantity": str(100 * U)})
    op = Operation.objects.get(process=rogue)
    assert (mint.status, op.step) == (Message.APPLIED, "locking")
    send_only(accomplice, rogue, {"Action": "LockCollateral-Success", "X-Operation-Id": op.op_id})
    op.refresh_from_db()
    assert op.step == "minting"  # its Mint waits in TIM3's mailbox
    send_only(operator_address(), rogue, {
        "Action": "SetProcessConfig", "Process-Type": "lock-manager", "Process-Id": system["lock-manager"].id})
    before = world("usda", "lock-manager", "tim3")
    run_until_idle()

    unlock = Message.objects.get(sender=rogue.id, target=system["lock-manager"].id, action="UnlockCollateral")
    assert unlock.get("User") == attacker
    assert_refused(unlock, "Only a coordinator may UnlockCollateral.")
    assert world("usda", "lock-manager", "tim3") == before
    assert balance("usda", attacker) == (200 * U, 100 * U) and balance("tim3", attacker) == (100 * U, 0)
    assert CollateralLock.objects.get(process=system["lock-manager"], user=attacker).locked == 100 * U
    # The rogue's own books are its problem; the real system's reserves are intact.
    assert check_invariants() == []


# --- 6. Lock-Response / Unlock-Response / Lock-Error: only from USDA --------------------------------------


def lock_in_flight(wallet) -> tuple[Flow, str]:
    """A v1 lock mint whose Lock waits in USDA's mailbox."""
    user = wallet()
    fund(user, 200 * U)
    flow = actions.request_deposit(wallet=user, quantity=str(100 * U), mode="lock")
    drain("coordinator", "lock-manager")
    assert operation(flow).step == "locking"
    assert Message.objects.get(pushed_for=flow.id, action="Lock").status == Message.PENDING
    return flow, user


def unlock_in_flight(wallet) -> tuple[Flow, str]:
    """A v1 burn whose Unlock waits in USDA's mailbox."""
    user = locked_user(wallet)
    flow = actions.request_redemption(wallet=user, quantity=str(40 * U), mode="lock")
    drain("coordinator", "tim3", "lock-manager")
    assert operation(flow).step == "unlocking"
    assert Message.objects.get(pushed_for=flow.id, action="Unlock").status == Message.PENDING
    return flow, user


@pytest.mark.parametrize("action", ["Lock-Response", "Lock-Error", "Unlock-Response", "Unlock-Error"])
def test_lock_manager_takes_lock_results_only_from_usda(system, attacker, wallet, action):
    flow, user = (lock_in_flight if action.startswith("Lock") else unlock_in_flight)(wallet)
    op = operation(flow)
    for sender in (attacker, user, operator_address()):
        attempt(sender, system["lock-manager"], {
            "Action": action, "User": user, "Quantity": str(op.quantity), "Error": "spoofed",
            "X-Operation-Id": op.op_id}, f"{action} is accepted only from the configured USDA process.", only=True)
    assert LockRequest.objects.filter(op_id=op.op_id, status="pending").count() == 1
    # The real answer still completes the flow, once.
    assert settle(flow).status == Flow.COMPLETED
    if action.startswith("Lock"):
        assert balance("usda", user) == (200 * U, 100 * U) and balance("tim3", user) == (100 * U, 0)
    else:
        assert balance("usda", user) == (200 * U, 60 * U) and balance("tim3", user) == (60 * U, 0)
    assert_consistent()


# --- 7. UpdatePosition: only a coordinator ----------------------------------------------------------------


def test_update_position_only_from_a_coordinator(system, attacker, wallet):
    victim = wallet()
    for sender in (attacker, operator_address()):
        for operation_ in ("mint", "burn"):
            attempt(sender, system["state-manager"], {
                "Action": "UpdatePosition", "Operation": operation_, "User": victim, "Amount": str(100 * U),
                "CollateralAmount": "1", "CollateralType": "USDA-custody"},
                "Only a coordinator may UpdatePosition.")
    # Positive control: the coordinator records a deposit.
    fund(victim, 100 * U)
    flow = settle(actions.request_deposit(wallet=victim, quantity=str(100 * U)))
    update = Message.objects.get(pushed_for=flow.id, action="UpdatePosition")
    assert (update.sender, update.status) == (system["coordinator"].id, Message.APPLIED)
    assert_consistent()


def test_update_position_from_an_unauthorized_coordinator_fails(system, attacker):
    """A real process: a coordinator the State Manager does not know, running a whole
    deposit on tokens of its own, reports the position: refused."""
    fake_usda = fake_token("usda-fake", "USDA")
    fake_tim3 = fake_token("tim3-fake", "TIM3", policy="minters")
    rogue = rogue_coordinator(system, usda=fake_usda.id, tim3=fake_tim3.id)
    owner_send(fake_tim3, {"Action": "AddMinter", "Minter": rogue.id})
    owner_send(fake_usda, {"Action": "Mint", "Recipient": attacker, "Quantity": str(100 * U)})
    before = world("state-manager")
    pay = send(attacker, fake_usda, {"Action": "Transfer", "Recipient": rogue.id, "Quantity": str(100 * U)})
    update = Message.objects.get(pushed_for=pay.msg_id, action="UpdatePosition")
    assert (update.sender, update.target) == (rogue.id, system["state-manager"].id)
    assert_refused(update, "Only a coordinator may UpdatePosition.")
    assert world("state-manager") == before
    assert supply() == 0 and balance("tim3-fake", attacker) == (100 * U, 0)
    # (check_invariants sums every coordinator's books, and this one's are in tokens of
    # its own, so only the replay is checked here.)
    report = replay_all()
    assert report.clean, report.differences


# --- 8. coordinator replies only from the process that was asked ---------------------------------------


def deposit_in_flight(wallet, step: str) -> Flow:
    user = wallet()
    fund(user, 200 * U)
    flow = actions.request_deposit(wallet=user, quantity=str(100 * U))
    drain("usda", "coordinator") if step == "minting" else drain("usda", "coordinator", "tim3")
    assert operation(flow).step == step
    return flow


def redeem_in_flight(wallet, step: str) -> Flow:
    user = wallet()
    fund(user, 200 * U)
    assert settle(actions.request_deposit(wallet=user, quantity=str(100 * U))).status == Flow.COMPLETED
    flow = actions.request_redemption(wallet=user, quantity=str(40 * U))
    drain("coordinator") if step == "burning" else drain("coordinator", "tim3")
    assert operation(flow).step == step
    return flow


IN_FLIGHT = {
    "deposit-minting": lambda w: deposit_in_flight(w, "minting"),
    "deposit-recording": lambda w: deposit_in_flight(w, "recording"),
    "redeem-burning": lambda w: redeem_in_flight(w, "burning"),
    "redeem-paying": lambda w: redeem_in_flight(w, "paying"),
    "lock-locking": lambda w: lock_in_flight(w)[0],
    "burn-unlocking": lambda w: unlock_in_flight(w)[0],
}
REPLIES = [
    ("deposit-minting", "Mint-Response", "TIM3"),
    ("deposit-minting", "Mint-Error", "TIM3"),
    ("deposit-recording", "UpdatePosition-Response", "State Manager"),
    ("deposit-recording", "UpdatePosition-Error", "State Manager"),
    ("redeem-burning", "Burn-Response", "TIM3"),
    ("redeem-burning", "Burn-Error", "TIM3"),
    ("redeem-paying", "Debit-Notice", "USDA"),
    ("redeem-paying", "Transfer-Error", "USDA"),
    ("lock-locking", "LockCollateral-Success", "Lock Manager"),
    ("lock-locking", "LockCollateral-Error", "Lock Manager"),
    ("burn-unlocking", "UnlockCollateral-Success", "Lock Manager"),
    ("burn-unlocking", "UnlockCollateral-Error", "Lock Manager"),
]


@pytest.mark.parametrize(("scenario", "action", "expected"), REPLIES, ids=[f"{s}-{a}" for s, a, _ in REPLIES])
def test_a_reply_from_the_wrong_sender_changes_nothing(system, attacker, wallet, scenario, action, expected):
    """While an operation waits for exactly this answer, the same answer from anyone
    else is refused and changes nothing; the real one then completes the flow once.

    The senders are wallets: no process other than the one asked can be made to send
    these actions to the coordinator (every process answers only the sender of the
    request, and the coordinator sends each request only to its configured process)."""
    flow = IN_FLIGHT[scenario](wallet)
    op = operation(flow)
    for sender in (attacker, flow.user, operator_address()):
        attempt(sender, system["coordinator"], {
            "Action": action, "X-Operation-Id": op.op_id, "User": flow.user, "Quantity": str(op.quantity),
            "Recipient": flow.user, "Error": "spoofed"},
            f"{action} is accepted only from the configured {expected} process.", only=True)
    op.refresh_from_db()
    assert (op.status, op.expiring) == (Operation.PENDING, False)
    assert settle(flow).status == Flow.COMPLETED
    finals = [m for m in Message.objects.filter(target=flow.user, pushed_for=flow.id) if m.get("Flow-Status")]
    assert [m.get("Flow-Status") for m in finals] == ["completed"]
    assert_consistent()


def test_the_process_asked_still_answers_after_the_coordinator_is_repointed(system, attacker, wallet):
    """The owner points the coordinator at a new State Manager while an UpdatePosition
    waits at the old one: the old one's answer is the answer (it was asked), so the
    deposit completes instead of waiting forever; a wallet is still refused."""
    coordinator = system["coordinator"]
    new = spawn("state-manager-b", "state-manager")
    owner_send(new, {"Action": "SetProcessConfig", "Process-Type": "coordinator", "Process-Id": coordinator.id})
    flow = deposit_in_flight(wallet, "recording")
    op = operation(flow)
    send_only(operator_address(), coordinator, {
        "Action": "SetProcessConfig", "Process-Type": "state-manager", "Process-Id": new.id})
    attempt(attacker, coordinator, {"Action": "UpdatePosition-Response", "X-Operation-Id": op.op_id},
            "UpdatePosition-Response is accepted only from the configured State Manager process.", only=True)
    assert settle(flow).status == Flow.COMPLETED
    answer = Message.objects.get(pushed_for=flow.id, action="UpdatePosition-Response")
    assert (answer.sender, answer.status) == (system["state-manager"].id, Message.APPLIED)
    assert_consistent()
    # The next deposit is recorded by the new State Manager.
    fund(flow.user, 10 * U)
    later = settle(actions.request_deposit(wallet=flow.user, quantity=str(10 * U)))
    assert later.status == Flow.COMPLETED
    assert Message.objects.get(pushed_for=later.id, action="UpdatePosition").target == new.id
    assert_consistent()


def test_message_status_response_only_from_the_process_asked(system, attacker, wallet):
    """A forged "never handled" answer to the timeout query would refund a deposit whose
    mint is already on its way: refused. Time: the Cron tick's message timestamp is moved
    forward (it simulates the tick being scheduled later in message time; the log stays
    self-consistent, so replay agrees)."""
    owner_send(system["coordinator"], {"Action": "Configure", "ConfigType": "PendingTimeout", "Value": "1"})
    flow = deposit_in_flight(wallet, "minting")
    op = operation(flow)
    [tick] = send_cleanup_expired()
    Message.objects.filter(pk=tick.pk).update(timestamp=F("timestamp") + 5_000)
    drain_mailbox(process_id=system["coordinator"].id)
    op.refresh_from_db()
    assert op.expiring is True
    query = Message.objects.get(pushed_for=tick.msg_id, action="Message-Status")
    assert query.target == system["tim3"].id and query.status == Message.PENDING
    for sender in (attacker, flow.user, operator_address()):
        attempt(sender, system["coordinator"], {
            "Action": "Message-Status-Response", "Message-Id": op.awaiting, "Status": "unknown",
            "Handled": "false", "X-Operation-Id": op.op_id},
            "Message-Status-Response is accepted only from the process that was asked.", only=True)
    assert settle(flow).status == Flow.COMPLETED
    answer = Message.objects.get(pushed_for=tick.msg_id, action="Message-Status-Response")
    assert (answer.sender, answer.status, answer.get("Handled")) == (system["tim3"].id, Message.APPLIED, "true")
    assert balance("tim3", flow.user) == (100 * U, 0)
    assert_consistent()


def test_risk_alert_only_from_the_configured_state_manager(system, attacker, wallet):
    coordinator = system["coordinator"]
    attempt(attacker, coordinator, {"Action": "Risk-Alert", "Health-Score": "0", "Collateral-Ratio": "0.1"},
            "Risk-Alert is accepted only from the configured State Manager process.")

    # A real process: a second State Manager that knows the coordinator as a client
    # and sees a critical position (reported by its owner's wallet, also a client).
    rogue = spawn("state-manager-rogue", "state-manager")
    for client in (operator_address(), coordinator.id):
        owner_send(rogue, {"Action": "SetProcessConfig", "Process-Type": "coordinator", "Process-Id": client})
    owner_send(rogue, {"Action": "UpdatePosition", "Operation": "mint", "User": wallet(), "Amount": str(100 * U),
                       "CollateralAmount": str(U), "CollateralType": "USDA-custody"})
    before = world("coordinator")
    check = owner_send(rogue, {"Action": "CheckRiskAlerts"})
    alert = Message.objects.get(pushed_for=check.msg_id, action="Risk-Alert", target=coordinator.id)
    assert alert.sender == rogue.id
    assert_refused(alert, "Risk-Alert is accepted only from the configured State Manager process.")
    assert world("coordinator") == before
    assert CoordinatorState.objects.get(process=coordinator).risk_halt is False

    # Positive control: the configured State Manager's alert halts minting.
    user = wallet()
    fund(user, 100 * U)
    assert settle(actions.request_deposit(wallet=user, quantity=str(50 * U))).status == Flow.COMPLETED
    owner_send(system["state-manager"], {"Action": "SetTargetRatio", "Target-Ratio-Bp": "50000"})
    check = owner_send(system["state-manager"], {"Action": "CheckRiskAlerts"})
    alert = Message.objects.get(pushed_for=check.msg_id, action="Risk-Alert")
    assert (alert.sender, alert.status) == (system["state-manager"].id, Message.APPLIED)
    assert CoordinatorState.objects.get(process=coordinator).risk_halt is True
    assert settle(actions.request_deposit(wallet=user, quantity=str(50 * U))).status == Flow.REFUNDED
    assert_consistent()


def test_tim3_sent_to_the_coordinator_with_an_operation_id_touches_no_operation(system, attacker, wallet):
    """The real TIM3 process forwards X-* tags: an attacker's TIM3 transfer to the
    coordinator carrying a pending redemption's id reaches it as a Credit-Notice from
    TIM3 (returned to the attacker) and a Debit-Notice from TIM3 (a process that is
    not USDA): neither moves the operation."""
    fund(attacker, 10 * U)
    assert settle(actions.request_deposit(wallet=attacker, quantity=str(10 * U))).status == Flow.COMPLETED
    flow = redeem_in_flight(wallet, "paying")
    op = operation(flow)
    before = world("coordinator")
    pay = send_message(sender=attacker, target=system["tim3"].id, tags={
        "Action": "Transfer", "Recipient": system["coordinator"].id, "Quantity": str(10 * U),
        "X-Operation-Id": op.op_id})
    drain("tim3", "coordinator")
    assert world("coordinator") == before
    notices = Message.objects.filter(pushed_for=pay.msg_id, target=system["coordinator"].id)
    assert sorted((m.action, m.status) for m in notices) == [
        ("Credit-Notice", Message.APPLIED), ("Debit-Notice", Message.APPLIED)]
    assert balance("tim3", attacker) == (10 * U, 0)
    assert settle(flow).status == Flow.COMPLETED
    assert_consistent()


# --- 9. EmergencyPause / Resume ------------------------------------------------------------------------------


def paused() -> tuple[bool, bool]:
    c = CoordinatorState.objects.get(process__name="coordinator")
    return c.paused_mint, c.paused_redeem


def test_pause_and_resume_roles(system, attacker, wallet):
    coordinator = system["coordinator"]
    guardian, admin = wallet(), wallet()
    pause = {"Action": "EmergencyPause", "Scope": "mint", "Reason": "incident"}

    attempt(attacker, coordinator, pause, "Only a guardian or an admin may EmergencyPause.")
    attempt(ensure_wallet(label="scheduler").address, coordinator, pause,
            "Only a guardian or an admin may EmergencyPause.")
    owner_send(coordinator, {"Action": "Configure", "ConfigType": "AddGuardian", "Value": guardian})
    owner_send(coordinator, {"Action": "Configure", "ConfigType": "AddAdmin", "Value": admin})

    # A guardian pauses, but may not resume.
    msg = send(guardian, coordinator, pause)
    assert msg.status == Message.APPLIED and paused() == (True, False)
    c = CoordinatorState.objects.get(process=coordinator)
    assert (c.pause_reason, c.paused_by, c.paused_at) == ("incident", guardian, msg.timestamp)
    for sender in (guardian, attacker):
        attempt(sender, coordinator, {"Action": "Resume", "Scope": "mint"}, "Only an admin may Resume.")
    # An admin resumes, and may pause too.
    assert send(admin, coordinator, {"Action": "Resume", "Scope": "mint"}).status == Message.APPLIED
    assert paused() == (False, False)
    assert send(admin, coordinator, {**pause, "Scope": "redeem"}).status == Message.APPLIED
    assert paused() == (False, True)
    # The owner does both.
    owner_send(coordinator, {**pause, "Scope": "all"})
    assert paused() == (True, True)
    owner_send(coordinator, {"Action": "Resume", "Scope": "all"})
    assert paused() == (False, False)
    # A removed guardian is a stranger again.
    owner_send(coordinator, {"Action": "Configure", "ConfigType": "RemoveGuardian", "Value": guardian})
    attempt(guardian, coordinator, pause, "Only a guardian or an admin may EmergencyPause.")
    assert_consistent()


def test_pause_needs_a_reason_and_a_valid_scope(system, wallet):
    coordinator = system["coordinator"]
    guardian = wallet()
    owner_send(coordinator, {"Action": "Configure", "ConfigType": "AddGuardian", "Value": guardian})
    for sender in (guardian, operator_address()):
        attempt(sender, coordinator, {"Action": "EmergencyPause", "Scope": "mint"}, "A pause needs a Reason.")
        attempt(sender, coordinator, {"Action": "EmergencyPause", "Scope": "mint", "Reason": "   "},
                "A pause needs a Reason.")
        attempt(sender, coordinator, {"Action": "EmergencyPause", "Scope": "everything", "Reason": "x"},
                "Scope must be mint, redeem or all.")
    attempt(operator_address(), coordinator, {"Action": "Resume", "Scope": "mints"}, "Scope must be mint, redeem or all.")
    assert paused() == (False, False)


# --- 10. CleanupExpired: only the scheduler or the owner --------------------------------------------------------


def test_cleanup_expired_only_by_the_scheduler_or_the_owner(system, attacker, wallet):
    coordinator = system["coordinator"]
    guardian, admin = wallet(), wallet()
    owner_send(coordinator, {"Action": "Configure", "ConfigType": "AddGuardian", "Value": guardian})
    owner_send(coordinator, {"Action": "Configure", "ConfigType": "AddAdmin", "Value": admin})
    for sender in (attacker, guardian, admin):
        attempt(sender, coordinator, {"Action": "CleanupExpired"}, "Only the owner or the scheduler may CleanupExpired.")
    for sender in (ensure_wallet(label="scheduler").address, operator_address()):
        assert send(sender, coordinator, {"Action": "CleanupExpired"}).status == Message.APPLIED


# --- 11. fund-moving requests come from wallets -------------------------------------------------------------------

# RedeemTIM3 / MintTIM3 / BurnTIM3 sent by a process (the coordinator's `require_wallet`):
# not tested, because no process can be made to send them. Every process sends only
# fixed actions (Transfer, Credit-/Debit-Notice, Mint, Burn, Lock, Unlock, *Collateral,
# UpdatePosition, Risk-Alert, Message-Status, replies and `<Action>-Error`), none of them
# these three; and the runtime refuses a wallet message that claims a process as its
# sender (next test). Writing such a row by hand would test nothing reachable.


def test_send_message_refuses_a_process_as_the_sender(system, attacker):
    coordinator = system["coordinator"]
    count = Message.objects.count()
    for process in system.values():
        for action in ("RedeemTIM3", "MintTIM3", "BurnTIM3", "Mint-Response", "Credit-Notice"):
            with pytest.raises(TagError, match="^A wallet message cannot claim to come from a process.$"):
                send_message(sender=process.id, target=coordinator.id, tags={
                    "Action": action, "Quantity": str(U), "Sender": attacker})
    for sender in ("alice", attacker + "\n", ""):
        with pytest.raises(TagError, match="^From must be a 43-character wallet address.$"):
            send_message(sender=sender, target=coordinator.id, tags={"Action": "RedeemTIM3", "Quantity": str(U)})
    # A message cannot smuggle its own From either.
    with pytest.raises(TagError, match="'From' is set by the system"):
        send_message(sender=attacker, target=coordinator.id, tags={"Action": "Info", "From": system["usda"].id})
    assert Message.objects.count() == count


def test_a_burn_for_a_user_needs_that_users_own_redemption(system, attacker, wallet):
    victim, other = wallet(), wallet()
    tim3, coordinator = system["tim3"], system["coordinator"]
    for who in (victim, other):
        fund(who, 100 * U)
        assert settle(actions.request_deposit(wallet=who, quantity=str(100 * U))).status == Flow.COMPLETED
    burn = {"Action": "Burn", "User": victim, "Quantity": str(10 * U)}

    # Neither a stranger nor the TIM3 owner is a minter.
    for sender in (attacker, operator_address(), other):
        attempt(sender, tim3, burn, "Only an authorized minter may burn for a user, inside that user's redemption.")

    # A minter (here a wallet the owner made one) still needs the user's own redemption request to it.
    owner_send(tim3, {"Action": "AddMinter", "Minter": attacker})
    attempt(attacker, tim3, burn, "Burning for another account needs the Redemption-Request it belongs to.")
    victims = settle(actions.request_redemption(wallet=victim, quantity=str(10 * U)))
    others = settle(actions.request_redemption(wallet=other, quantity=str(10 * U)))
    assert victims.status == others.status == Flow.COMPLETED
    for request in (others.id, victims.id, new_id()):  # someone else's; the victim's, sent to the coordinator; none
        attempt(attacker, tim3, {**burn, "Redemption-Request": request},
                "Redemption-Request is not this user's redemption sent to this minter.")
    # Burning one's own needs nothing: the attacker burns its own (none) and fails on balance, not authority.
    attempt(attacker, tim3, {"Action": "Burn", "Quantity": str(U)}, "Insufficient balance: 0 available, 1 needed.")

    # Positive control: the victim's own redemption, through the coordinator, burned exactly once.
    burned = Message.objects.get(pushed_for=victims.id, action="Burn")
    assert (burned.sender, burned.get("User"), burned.get("Redemption-Request")) == (coordinator.id, victim, victims.id)
    assert balance("tim3", victim) == (90 * U, 0) and balance("tim3", other) == (90 * U, 0)
    assert supply() == 180 * U
    assert_consistent()
