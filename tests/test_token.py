"""The token blueprint (processes/blueprints/token.py) against the AO token spec
(aos `blueprints/token.lua`) and SPEC §2-3: every handler, every refusal, the
notices and their `X-*` tags, the quantity matrix, the mint authorization hook
(faucet / owner / minters), burns inside a redemption, and Lock/Unlock.

Delivery is driven in-process (`send` = send_message + run_until_idle). A
handler's replies are Message rows whose parent is the message answered. After
every test the invariants hold and the message log replays to the live state
(`_consistent_after_each_test`).

Tests that need a process to *send* to a token (a minter burning for a user, a
`Balance` with a `Target` tag, which wallets may not send) use a tiny relay
blueprint: its owner asks it to `Relay` a tag set (JSON in Data) to a process;
the token's answer lands in the relay's inbox. A `RedeemTIM3` sent to the relay
lands in its inbox too (applied, unhandled), which is what a redemption request
looks like to the token; with `Refuse=yes` the relay refuses it (failed).
"""

import json
from types import SimpleNamespace

import pytest

from processes.blueprints.state import FaucetGrant, TokenMinter, TokenState
from processes.invariants import check_invariants
from processes.runtime.delivery import run_until_idle, send_message, spawn_process
from processes.runtime.handlers import HandlerError, Handlers
from processes.runtime.ids import new_id, now_ms
from processes.runtime.models import Message, Process
from processes.runtime.quantities import MAX_QUANTITY, MAX_SUPPLY, UNIT
from processes.runtime.registry import BLUEPRINTS, Blueprint, register_blueprint
from processes.runtime.replay import replay_all, snapshot_state
from processes.services import bootstrap_system, operator_address
from tests.conftest import send

RELAY_KIND = "test-token-relay"
HOUR = 3_600_000
DAY = 24 * HOUR
FAUCET_PER_REQUEST = 1_000 * UNIT  # SPEC §5: at most 1,000 USDA per request
FAUCET_PER_WINDOW = 10_000 * UNIT  # and 10,000 USDA per wallet per rolling 24 h


# --- the relay blueprint ------------------------------------------------------------------

def _relay_handlers() -> Handlers:
    handlers = Handlers()

    @handlers.add("Refuse-Redemption", {"Action": "RedeemTIM3", "Refuse": "yes"})
    def refuse_redemption(msg, ctx):
        raise HandlerError("redemption refused by the test minter")

    @handlers.add("Relay")
    def relay(msg, ctx):
        if msg.sender != ctx.process.owner:
            raise HandlerError("Only the owner may Relay.")
        ctx.send(target=msg.get("To"), tags=json.loads(msg.data))

    return handlers


@pytest.fixture(scope="module", autouse=True)
def _relay_blueprint():
    register_blueprint(Blueprint(kind=RELAY_KIND, handlers=_relay_handlers(), state_models=[]))
    yield
    BLUEPRINTS.pop(RELAY_KIND, None)


def assert_consistent() -> None:
    """Every invariant holds and the log replays to exactly the live state."""
    assert check_invariants() == []
    report = replay_all()
    assert report.clean, report.differences


@pytest.fixture(autouse=True)
def _consistent_after_each_test(db, _relay_blueprint):
    yield
    assert_consistent()


# --- helpers ----------------------------------------------------------------------------------

def spawn_token(owner: str, name: str, *, policy: str = "owner", **tags) -> Process:
    process = spawn_process(name=name, kind="token", owner=owner, tags={
        "Token-Name": name, "Ticker": name.upper(), "Mint-Policy": policy, **tags})
    run_until_idle()
    return process


def spawn_relay(owner: str, name: str) -> Process:
    process = spawn_process(name=name, kind=RELAY_KIND, owner=owner)
    run_until_idle()
    return process


def relay(owner: str, relay_process: Process, target: Process, tags: dict) -> Message:
    """Have `relay_process` send `tags` to `target`; return the relayed message (delivered)."""
    root = send(owner, relay_process, {"Action": "Relay", "To": target.id}, data=tags)
    assert root.status == Message.APPLIED, root.error
    (out,) = children(root)
    assert (out.sender, out.target) == (relay_process.id, target.id)
    assert out.status != Message.PENDING
    return out


def children(msg: Message) -> list[Message]:
    return list(Message.objects.filter(parent_id=msg.msg_id).order_by("seq"))


def reply_of(msg: Message, action: str) -> Message:
    """The one `action` answer to `msg`: to its sender, delivered, in its cascade, X-Reference = its Reference."""
    rows = [m for m in children(msg) if m.action == action]
    assert len(rows) == 1, f"expected one {action} answer, got {[m.action for m in children(msg)]}"
    row = rows[0]
    assert row.target == msg.sender
    assert row.status == Message.APPLIED
    assert row.pushed_for == msg.pushed_for
    assert row.x_reference == str(msg.reference)
    return row


def ok(msg: Message, action: str) -> Message:
    """`msg` was applied by a handler; return its one `action` answer."""
    msg.refresh_from_db()
    assert msg.status == Message.APPLIED, f"{msg.action} failed: {msg.error}"
    assert msg.handled and msg.error == ""
    return reply_of(msg, action)


def refused(msg: Message, *fragments: str) -> str:
    """`msg` failed, its sender got exactly `<Action>-Error` with Error and Message-Id; return the error."""
    msg.refresh_from_db()
    assert msg.status == Message.FAILED, f"{msg.action} was {msg.status}, expected a refusal"
    assert msg.handled
    error_reply = reply_of(msg, f"{msg.action}-Error")
    assert [m.action for m in children(msg)] == [f"{msg.action}-Error"]  # nothing else was sent
    assert error_reply.get("Error") == msg.error
    assert error_reply.get("Message-Id") == msg.msg_id
    for fragment in fragments:
        assert fragment in msg.error, f"{fragment!r} not in {msg.error!r}"
    return msg.error


def state_of(process: Process) -> TokenState:
    return TokenState.objects.get(process=process)


def balance(process: Process, account: str) -> int:
    row = process.token_accounts.filter(account=account).first()
    return row.balance if row else 0


def locked(process: Process, account: str) -> int:
    row = process.token_accounts.filter(account=account).first()
    return row.locked if row else 0


def supply(process: Process) -> int:
    return state_of(process).total_supply


def tokens_state() -> dict:
    """Every token's whole state (accounts, supply, minters, faucet grants, operations)."""
    return {p.name: snapshot_state(p) for p in Process.objects.filter(kind="token").order_by("name")}


def mint(owner: str, process: Process, recipient: str, quantity: int) -> Message:
    root = send(owner, process, {"Action": "Mint", "Recipient": recipient, "Quantity": str(quantity)})
    ok(root, "Mint-Response")
    return root


def send_at(sender: str, process: Process, tags: dict, *, timestamp: int) -> Message:
    """Send with a chosen message timestamp (handler time is the message's timestamp, SPEC §1)."""
    msg = send_message(sender=sender, target=process.id, tags=tags)
    Message.objects.filter(pk=msg.pk).update(timestamp=timestamp)
    run_until_idle()
    msg.refresh_from_db()
    return msg


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
def owned(db):
    """A token with mint policy `owner`, 100 whole tokens minted to `holder`, a wallet `locker` as its locker."""
    ns = SimpleNamespace(owner=new_id(), holder=new_id(), other=new_id(), locker=new_id())
    ns.token = spawn_token(ns.owner, "tok")
    mint(ns.owner, ns.token, ns.holder, 100 * UNIT)
    ok(send(ns.owner, ns.token, {"Action": "SetLocker", "Locker": ns.locker}), "SetLocker-Response")
    return ns


@pytest.fixture
def minters(db):
    """A token with TIM3's policy (`minters`) whose one minter is a relay process the test drives."""
    ns = SimpleNamespace(owner=new_id(), user=new_id(), other_user=new_id())
    ns.token = spawn_token(ns.owner, "tim3x", policy="minters")
    ns.minter = spawn_relay(ns.owner, "minter")
    ok(send(ns.owner, ns.token, {"Action": "AddMinter", "Minter": ns.minter.id}), "AddMinter-Response")
    ns.via = lambda tags, relay_process=None: relay(ns.owner, relay_process or ns.minter, ns.token, tags)
    return ns


# --- Spawn ------------------------------------------------------------------------------------------

def test_spawn_sets_up_the_token_from_its_tags_and_answers_spawned(db, wallet):
    owner = wallet()
    token = spawn_process(name="gold", kind="token", owner=owner, tags={
        "Token-Name": "Gold", "Ticker": "GLD", "Logo": "logo-tx", "Denomination": "6", "Mint-Policy": "faucet",
        "Faucet-Per-Request": "5", "Faucet-Per-Window": "7", "Faucet-Window-Ms": "1000"})
    run_until_idle()
    spawned = ok(Message.objects.get(target=token.id, action="Spawn"), "Spawned")
    assert spawned.get("Process") == token.id
    token_state = state_of(token)
    assert (token_state.name, token_state.ticker, token_state.logo, token_state.denomination) == ("Gold", "GLD", "logo-tx", 6)
    assert (token_state.mint_policy, token_state.faucet_per_request, token_state.faucet_per_window,
            token_state.faucet_window_ms) == ("faucet", 5, 7, 1000)
    assert (token_state.total_supply, token_state.locker) == (0, "")
    info = ok(send(wallet(), token, {"Action": "Info"}), "Info-Response")
    assert {k: info.get(k) for k in ("Name", "Ticker", "Logo", "Denomination", "Mint-Policy")} == {
        "Name": "Gold", "Ticker": "GLD", "Logo": "logo-tx", "Denomination": "6", "Mint-Policy": "faucet"}


def test_spawn_defaults_to_owner_policy_and_the_process_name(db, wallet):
    token = spawn_process(name="plain", kind="token", owner=wallet())
    run_until_idle()
    token_state = state_of(token)
    assert (token_state.name, token_state.ticker, token_state.mint_policy, token_state.denomination) == (
        "plain", "TKN", "owner", 6)


def test_spawn_happens_only_once_even_from_the_owner(owned, wallet):
    before = tokens_state()
    again = send(owned.owner, owned.token, {"Action": "Spawn", "Ticker": "NEW", "Mint-Policy": "faucet"})
    refused(again, "This token is already spawned.")
    refused(send(wallet(), owned.token, {"Action": "Spawn", "Ticker": "EVIL"}), "already spawned")
    assert tokens_state() == before
    assert (state_of(owned.token).ticker, state_of(owned.token).mint_policy) == ("TOK", "owner")
    assert balance(owned.token, owned.holder) == 100 * UNIT


def test_spawn_only_by_the_owner_and_nothing_works_before_it(db, wallet):
    owner, stranger = wallet(), wallet()
    token = Process.objects.create(id=new_id(), name="raw", kind="token", owner=owner)
    refused(send(stranger, token, {"Action": "Spawn", "Ticker": "MINE"}), "Only the owner may Spawn.")
    assert not TokenState.objects.filter(process=token).exists()
    for tags in ({"Action": "Info"}, {"Action": "Balance"}, {"Action": "Total-Supply"}, {"Action": "TokenStats"},
                 {"Action": "Transfer", "Recipient": owner, "Quantity": "1"},
                 {"Action": "Mint", "Recipient": owner, "Quantity": "1"}, {"Action": "Burn", "Quantity": "1"},
                 {"Action": "Lock", "User": owner, "Quantity": "1"}, {"Action": "Unlock", "User": owner, "Quantity": "1"}):
        refused(send(owner, token, tags), "This token has not been spawned.")
    ok(send(owner, token, {"Action": "Spawn", "Ticker": "RAW"}), "Spawned")
    assert (state_of(token).ticker, state_of(token).name) == ("RAW", "raw")  # no Name tag: the process's name


def test_spawn_refuses_an_unknown_mint_policy(db, wallet):
    owner = wallet()
    token = spawn_process(name="odd", kind="token", owner=owner, tags={"Mint-Policy": "anyone"})
    run_until_idle()
    refused(Message.objects.get(target=token.id, action="Spawn"), "Mint-Policy must be faucet, owner or minters.")
    assert not TokenState.objects.filter(process=token).exists()
    ok(send(owner, token, {"Action": "Spawn", "Mint-Policy": "minters"}), "Spawned")
    assert state_of(token).mint_policy == "minters"


# --- reads ------------------------------------------------------------------------------------------

def test_info_of_usda_and_tim3_carries_x_tags_back(system, wallet):
    asker = wallet()
    usda = ok(send(asker, system["usda"], {"Action": "Info", "X-Request": "r-1"}), "Info-Response")
    assert {k: usda.get(k) for k in ("Name", "Ticker", "Denomination", "Mint-Policy", "X-Request")} == {
        "Name": "USD Alpha", "Ticker": "USDA", "Denomination": "6", "Mint-Policy": "faucet", "X-Request": "r-1"}
    assert usda.get("Logo") == ""
    tim3 = ok(send(asker, system["tim3"], {"Action": "Info"}), "Info-Response")
    assert {k: tim3.get(k) for k in ("Name", "Ticker", "Denomination", "Mint-Policy")} == {
        "Name": "TIM3", "Ticker": "TIM3", "Denomination": "6", "Mint-Policy": "minters"}


def test_balance_of_the_sender_a_recipient_or_a_target(owned, wallet):
    token, holder, stranger = owned.token, owned.holder, wallet()
    ok(send(owned.locker, token, {"Action": "Lock", "User": holder, "Quantity": str(30 * UNIT)}), "Lock-Response")
    before = tokens_state()

    own = ok(send(holder, token, {"Action": "Balance", "X-Ask": "1"}), "Balance-Response")
    assert own.tag_dict == {"X-Ask": "1", "Action": "Balance-Response", "Balance": str(100 * UNIT), "Ticker": "TOK",
                            "Account": holder, "Locked": str(30 * UNIT)}
    assert own.data == str(100 * UNIT)

    theirs = ok(send(stranger, token, {"Action": "Balance", "Recipient": holder}), "Balance-Response")
    assert (theirs.get("Balance"), theirs.get("Account"), theirs.data) == (str(100 * UNIT), holder, str(100 * UNIT))

    empty = ok(send(stranger, token, {"Action": "Balance"}), "Balance-Response")
    assert (empty.get("Balance"), empty.get("Account"), empty.get("Locked"), empty.data) == ("0", stranger, "0", "0")
    unknown = wallet()
    nobody = ok(send(stranger, token, {"Action": "Balance", "Recipient": unknown}), "Balance-Response")
    assert (nobody.get("Balance"), nobody.get("Account")) == ("0", unknown)

    # `Target` is a message field wallets may not send as a tag; a process may (AO: msg.Tags.Target).
    asker = spawn_relay(owned.owner, "asker")
    by_target = ok(relay(owned.owner, asker, token, {"Action": "Balance", "Target": holder}), "Balance-Response")
    assert (by_target.get("Balance"), by_target.get("Account")) == (str(100 * UNIT), holder)
    recipient_first = ok(relay(owned.owner, asker, token, {"Action": "Balance", "Target": holder, "Recipient": stranger}),
                         "Balance-Response")
    assert (recipient_first.get("Balance"), recipient_first.get("Account")) == ("0", stranger)
    assert tokens_state() == before  # reads change nothing


def test_balances_is_json_of_every_positive_balance(owned, wallet):
    token, holder, other, third = owned.token, owned.holder, owned.other, wallet()
    send(holder, token, {"Action": "Transfer", "Recipient": other, "Quantity": str(25 * UNIT)})
    send(other, token, {"Action": "Transfer", "Recipient": third, "Quantity": str(25 * UNIT)})  # other back to 0
    answer = ok(send(wallet(), token, {"Action": "Balances"}), "Balances-Response")
    assert json.loads(answer.data) == {holder: str(75 * UNIT), third: str(25 * UNIT)}


def test_total_supply_answers_with_the_supply_as_data(owned, wallet):
    answer = ok(send(wallet(), owned.token, {"Action": "Total-Supply"}), "Total-Supply")
    assert (answer.get("Ticker"), answer.data) == ("TOK", str(100 * UNIT))
    send(owned.holder, owned.token, {"Action": "Burn", "Quantity": str(UNIT)})
    answer = ok(send(wallet(), owned.token, {"Action": "Total-Supply"}), "Total-Supply")
    assert answer.data == str(99 * UNIT)


def test_token_stats_counts_supply_mints_burns_holders_locked_and_minters(minters, wallet):
    user, other = minters.user, minters.other_user
    ok(minters.via({"Action": "Mint", "Recipient": user, "Quantity": str(10 * UNIT)}), "Mint-Response")
    ok(minters.via({"Action": "Mint", "Recipient": other, "Quantity": str(5 * UNIT)}), "Mint-Response")
    ok(send(user, minters.token, {"Action": "Burn", "Quantity": str(3 * UNIT)}), "Burn-Response")
    stats = ok(send(wallet(), minters.token, {"Action": "TokenStats"}), "TokenStats-Response")
    assert stats.get("Ticker") == "TIM3X"
    assert json.loads(stats.data) == {
        "total_supply": str(12 * UNIT), "minted_total": str(15 * UNIT), "burned_total": str(3 * UNIT),
        "holders": 2, "locked": "0", "minters": [minters.minter.id]}


def test_token_stats_of_the_bootstrapped_tim3_lists_the_coordinator_as_minter(system, wallet):
    stats = ok(send(wallet(), system["tim3"], {"Action": "TokenStats"}), "TokenStats-Response")
    assert json.loads(stats.data)["minters"] == [system["coordinator"].id]


def test_token_stats_counts_locked_funds(owned, wallet):
    ok(send(owned.locker, owned.token, {"Action": "Lock", "User": owned.holder, "Quantity": str(40 * UNIT)}), "Lock-Response")
    stats = json.loads(ok(send(wallet(), owned.token, {"Action": "TokenStats"}), "TokenStats-Response").data)
    assert (stats["locked"], stats["holders"], stats["minters"]) == (str(40 * UNIT), 1, [])


def test_get_operation_finds_mints_by_operation_id(minters, wallet):
    asker = wallet()
    refused(send(asker, minters.token, {"Action": "GetOperation"}), "Operation-Id is required.")
    missing = ok(send(asker, minters.token, {"Action": "GetOperation", "Operation-Id": "op-1"}), "GetOperation-Response")
    assert (missing.get("Found"), missing.get("Operation-Id"), json.loads(missing.data)) == ("false", "op-1", [])

    first = minters.via({"Action": "Mint", "Recipient": minters.user, "Quantity": "7", "X-Operation-Id": "op-1"})
    ok(first, "Mint-Response")
    remint = minters.via({"Action": "Mint", "Recipient": minters.user, "Quantity": "7", "X-Operation-Id": "op-1",
                          "X-Mint-Kind": "remint"})
    ok(remint, "Mint-Response")
    ok(minters.via({"Action": "Mint", "Recipient": minters.user, "Quantity": "9", "X-Operation-Id": "op-10"}), "Mint-Response")

    found = ok(send(asker, minters.token, {"Action": "GetOperation", "Operation-Id": "op-1"}), "GetOperation-Response")
    assert found.get("Found") == "true"
    rows = json.loads(found.data)
    assert [(r["key"], r["kind"], r["account"], r["quantity"]) for r in rows] == [
        ("op-1", "mint", minters.user, "7"), ("op-1:remint", "mint", minters.user, "7")]
    assert rows[0]["timestamp"] == first.timestamp  # handler time: the Mint message's timestamp
    only_ten = json.loads(ok(send(asker, minters.token, {"Action": "GetOperation", "Operation-Id": "op-10"}),
                             "GetOperation-Response").data)
    assert [r["key"] for r in only_ten] == ["op-10"]


def test_message_status_tells_a_sender_what_became_of_its_message(owned, wallet):
    transfer = send(owned.holder, owned.token, {"Action": "Transfer", "Recipient": owned.other, "Quantity": "1"})
    failed = send(owned.holder, owned.token, {"Action": "Transfer", "Recipient": owned.other, "Quantity": str(10**15)})
    mine = ok(send(owned.holder, owned.token, {"Action": "Message-Status", "Message-Id": transfer.msg_id}),
              "Message-Status-Response")
    assert (mine.get("Status"), mine.get("Handled")) == ("applied", "true")
    bad = ok(send(owned.holder, owned.token, {"Action": "Message-Status", "Message-Id": failed.msg_id}),
             "Message-Status-Response")
    assert bad.get("Status") == "failed"
    others = ok(send(wallet(), owned.token, {"Action": "Message-Status", "Message-Id": transfer.msg_id}),
                "Message-Status-Response")
    assert (others.get("Status"), others.get("Handled")) == ("unknown", "false")


def test_unknown_actions_land_in_the_inbox_with_no_effect(owned):
    before = tokens_state()
    msg = send(owned.holder, owned.token, {"Action": "Approve", "Spender": owned.other, "Quantity": "5"})
    assert (msg.status, msg.handled, children(msg)) == (Message.APPLIED, False, [])
    assert tokens_state() == before


# --- Transfer ------------------------------------------------------------------------------------------

def test_transfer_moves_funds_and_sends_both_notices_with_every_x_tag(owned):
    token, holder, other = owned.token, owned.holder, owned.other
    root = send(holder, token, {"Action": "Transfer", "Recipient": other, "Quantity": str(25 * UNIT),
                                "X-Order-Id": "o-42", "X-Note": "rent", "Memo": "not forwarded"})
    assert (root.status, root.error) == (Message.APPLIED, "")
    assert (balance(token, holder), balance(token, other), supply(token)) == (75 * UNIT, 25 * UNIT, 100 * UNIT)

    debit, credit = children(root)
    assert (debit.action, debit.target, debit.sender, debit.status) == ("Debit-Notice", holder, token.id, Message.APPLIED)
    assert debit.tag_dict == {"Action": "Debit-Notice", "Recipient": other, "Quantity": str(25 * UNIT),
                              "X-Order-Id": "o-42", "X-Note": "rent"}
    assert debit.data == f"You transferred 25 to {other}"
    assert (credit.action, credit.target, credit.sender, credit.status) == ("Credit-Notice", other, token.id, Message.APPLIED)
    assert credit.tag_dict == {"Action": "Credit-Notice", "Sender": holder, "Quantity": str(25 * UNIT),
                               "X-Order-Id": "o-42", "X-Note": "rent"}
    assert credit.data == f"You received 25 from {holder}"
    cascade = list(Message.objects.filter(pushed_for=root.msg_id).order_by("seq"))
    assert cascade == [root, debit, credit]


def test_cast_suppresses_only_the_debit_notice(owned):
    root = send(owned.holder, owned.token, {"Action": "Transfer", "Recipient": owned.other, "Quantity": "5",
                                            "Cast": "true", "X-Tag": "t"})
    assert root.status == Message.APPLIED
    (credit,) = children(root)
    assert (credit.action, credit.target, credit.get("Sender"), credit.get("Quantity"), credit.get("X-Tag")) == (
        "Credit-Notice", owned.other, owned.holder, "5", "t")
    assert balance(owned.token, owned.other) == 5


def test_transfer_of_more_than_the_balance_is_refused_and_changes_nothing(owned):
    before = tokens_state()
    root = send(owned.holder, owned.token, {"Action": "Transfer", "Recipient": owned.other,
                                            "Quantity": str(100 * UNIT + 1), "X-Order-Id": "o-1", "X-Flow": "f"})
    error = refused(root, "Insufficient balance: 100 available, 100.000001 needed.")
    transfer_error = reply_of(root, "Transfer-Error")
    assert transfer_error.tag_dict == {"X-Order-Id": "o-1", "X-Flow": "f", "Action": "Transfer-Error",
                                       "Error": error, "Message-Id": root.msg_id}
    assert transfer_error.x_reference == str(root.reference) != ""
    assert tokens_state() == before
    assert not Message.objects.filter(target=owned.other).exists()
    # The whole balance is spendable, one base unit more is not.
    whole = send(owned.holder, owned.token, {"Action": "Transfer", "Recipient": owned.other, "Quantity": str(100 * UNIT)})
    assert whole.status == Message.APPLIED
    refused(send(owned.holder, owned.token, {"Action": "Transfer", "Recipient": owned.other, "Quantity": "1"}),
            "Insufficient balance: 0 available, 0.000001 needed.")


def test_transfer_from_a_wallet_that_never_held_the_token_is_refused(owned, wallet):
    before = tokens_state()
    refused(send(wallet(), owned.token, {"Action": "Transfer", "Recipient": owned.holder, "Quantity": "1"}),
            "Insufficient balance: 0 available")
    assert tokens_state() == before


@pytest.mark.parametrize("recipient, error", [
    pytest.param(None, "Recipient is required.", id="missing"),
    pytest.param("", "Recipient is required.", id="empty"),
    pytest.param("bob", "Recipient must be a 43-character address.", id="short"),
    pytest.param("A" * 44, "Recipient must be a 43-character address.", id="44-chars"),
    pytest.param("A" * 42 + "+", "Recipient must be a 43-character address.", id="not-base64url"),
    pytest.param(" " + "A" * 42, "Recipient must be a 43-character address.", id="leading-space"),
])
def test_transfer_needs_a_valid_recipient(owned, recipient, error):
    before = tokens_state()
    refused(send(owned.holder, owned.token, {"Action": "Transfer", "Recipient": recipient, "Quantity": "1"}), error)
    assert tokens_state() == before


def test_transfer_to_oneself_keeps_the_balance_and_notifies(owned):
    root = send(owned.holder, owned.token, {"Action": "Transfer", "Recipient": owned.holder, "Quantity": str(100 * UNIT)})
    assert [m.action for m in children(root)] == ["Debit-Notice", "Credit-Notice"]
    assert (balance(owned.token, owned.holder), supply(owned.token)) == (100 * UNIT, 100 * UNIT)


# --- the quantity matrix (SPEC §2) ---------------------------------------------------------------------

CANONICAL = "canonical form"
BAD_QUANTITIES = [
    pytest.param("0", CANONICAL, id="zero"),
    pytest.param("-1", CANONICAL, id="negative"),
    pytest.param("1.5", CANONICAL, id="decimal"),
    pytest.param("1e3", CANONICAL, id="exponent"),
    pytest.param("05", CANONICAL, id="leading-zero"),
    pytest.param("+5", CANONICAL, id="plus-sign"),
    pytest.param(" 5", CANONICAL, id="leading-space"),
    pytest.param("5 ", CANONICAL, id="trailing-space"),
    pytest.param("1_000", CANONICAL, id="underscore"),  # int() would accept it
    pytest.param("0x10", CANONICAL, id="hex"),
    pytest.param("\u0661\u0662", CANONICAL, id="arabic-indic-digits"),  # int() would accept it
    pytest.param("", "Quantity is required", id="empty"),
    pytest.param(None, "Quantity is required", id="missing"),
    pytest.param(str(2**63 + 1), "above the maximum", id="2**63+1"),
    pytest.param(str(MAX_QUANTITY + 1), "above the maximum", id="MAX_QUANTITY+1"),
]


def _matrix_message(action: str, ns, quantity):
    """(sender, tags) of an otherwise valid `action` with this Quantity (None: no Quantity tag)."""
    return {
        "Transfer": (ns.holder, {"Action": "Transfer", "Recipient": ns.other, "Quantity": quantity}),
        "Mint": (ns.owner, {"Action": "Mint", "Recipient": ns.holder, "Quantity": quantity}),
        "Burn": (ns.holder, {"Action": "Burn", "Quantity": quantity}),
        "Lock": (ns.locker, {"Action": "Lock", "User": ns.holder, "Quantity": quantity}),
        "Unlock": (ns.locker, {"Action": "Unlock", "User": ns.holder, "Quantity": quantity}),
    }[action]


@pytest.mark.parametrize("action", ["Transfer", "Mint", "Burn", "Lock", "Unlock"])
@pytest.mark.parametrize("quantity, error", BAD_QUANTITIES)
def test_non_canonical_quantities_are_refused_and_change_nothing(owned, action, quantity, error):
    ok(send(owned.locker, owned.token, {"Action": "Lock", "User": owned.holder, "Quantity": str(10 * UNIT)}), "Lock-Response")
    before = tokens_state()
    sender, tags = _matrix_message(action, owned, quantity)
    text = refused(send(sender, owned.token, tags), error)
    assert text.startswith("Quantity "), text
    assert tokens_state() == before
    assert (balance(owned.token, owned.holder), locked(owned.token, owned.holder), supply(owned.token)) == (
        100 * UNIT, 10 * UNIT, 100 * UNIT)
    # The same message with a good quantity goes through: the refusal was the quantity's.
    sender, tags = _matrix_message(action, owned, "1")
    assert send(sender, owned.token, tags).status == Message.APPLIED


def test_quantities_at_the_maximum_are_exact_through_every_handler(db, wallet):
    owner, alice, bob, locker = wallet(), wallet(), wallet(), wallet()
    token = spawn_token(owner, "big")
    top = str(MAX_QUANTITY)
    assert ok(send(owner, token, {"Action": "Mint", "Recipient": alice, "Quantity": top}), "Mint-Response").get("Quantity") == top
    assert (balance(token, alice), supply(token)) == (MAX_QUANTITY, MAX_QUANTITY)
    assert ok(send(alice, token, {"Action": "Balance"}), "Balance-Response").get("Balance") == top

    root = send(alice, token, {"Action": "Transfer", "Recipient": bob, "Quantity": top})
    assert [(m.action, m.get("Quantity")) for m in children(root)] == [("Debit-Notice", top), ("Credit-Notice", top)]
    assert (balance(token, alice), balance(token, bob)) == (0, MAX_QUANTITY)

    ok(send(owner, token, {"Action": "SetLocker", "Locker": locker}), "SetLocker-Response")
    assert ok(send(locker, token, {"Action": "Lock", "User": bob, "Quantity": top}), "Lock-Response").get("Locked") == top
    refused(send(bob, token, {"Action": "Transfer", "Recipient": alice, "Quantity": "1"}), "Insufficient balance: 0 available")
    assert ok(send(locker, token, {"Action": "Unlock", "User": bob, "Quantity": top}), "Unlock-Response").get("Locked") == "0"
    assert ok(send(bob, token, {"Action": "Burn", "Quantity": top}), "Burn-Response").get("Quantity") == top
    assert (balance(token, bob), supply(token)) == (0, 0)
    stats = json.loads(ok(send(bob, token, {"Action": "TokenStats"}), "TokenStats-Response").data)
    assert (stats["minted_total"], stats["burned_total"], stats["total_supply"]) == (top, top, "0")


def test_total_supply_stops_exactly_at_the_bigint_maximum(db, wallet):
    owner, alice = wallet(), wallet()
    token = spawn_token(owner, "huge")
    for _ in range(9):
        mint(owner, token, alice, MAX_QUANTITY)
    assert supply(token) == 9 * 10**18
    before = tokens_state()
    refused(send(owner, token, {"Action": "Mint", "Recipient": alice, "Quantity": str(MAX_QUANTITY)}),
            "Mint would take the total supply above its maximum.")
    assert tokens_state() == before
    mint(owner, token, alice, MAX_SUPPLY - 9 * 10**18)
    assert (supply(token), balance(token, alice)) == (MAX_SUPPLY, MAX_SUPPLY)
    refused(send(owner, token, {"Action": "Mint", "Recipient": alice, "Quantity": "1"}), "above its maximum")
    assert ok(send(alice, token, {"Action": "Total-Supply"}), "Total-Supply").data == str(MAX_SUPPLY)
    assert json.loads(ok(send(alice, token, {"Action": "Balances"}), "Balances-Response").data) == {alice: str(MAX_SUPPLY)}


def test_lifetime_mint_counter_never_leaves_the_bigint_range(db, wallet):
    """Burning and minting again keeps the supply in range but grows minted_total: the token
    refuses a mint that would overflow it (SQLite would silently store a float, Postgres fail)."""
    owner, alice = wallet(), wallet()
    token = spawn_token(owner, "churn")
    for _ in range(9):
        mint(owner, token, alice, MAX_QUANTITY)
    mint(owner, token, alice, MAX_SUPPLY - 9 * 10**18)
    ok(send(alice, token, {"Action": "Burn", "Quantity": str(MAX_QUANTITY)}), "Burn-Response")
    before = tokens_state()
    refused(send(owner, token, {"Action": "Mint", "Recipient": alice, "Quantity": str(MAX_QUANTITY)}),
            "Mint would take the lifetime minted total above its maximum.")
    assert tokens_state() == before
    token_state = state_of(token)
    assert (token_state.total_supply, token_state.minted_total, token_state.burned_total) == (
        MAX_SUPPLY - MAX_QUANTITY, MAX_SUPPLY, MAX_QUANTITY)
    assert all(type(v) is int for v in (token_state.total_supply, token_state.minted_total, token_state.burned_total))


# --- Mint: the authorization hook -----------------------------------------------------------------------

def test_faucet_mints_to_any_wallet_that_asks(system, wallet):
    usda, alice, bob = system["usda"], wallet(), wallet()
    start = supply(usda)
    answer = ok(send(alice, usda, {"Action": "Mint", "Quantity": str(FAUCET_PER_REQUEST), "X-Faucet": "1"}), "Mint-Response")
    assert answer.tag_dict == {"X-Faucet": "1", "Action": "Mint-Response", "Recipient": alice,
                               "Quantity": str(FAUCET_PER_REQUEST)}
    assert answer.data == f"Minted 1,000 USDA to {alice}"
    ok(send(bob, usda, {"Action": "Mint", "Recipient": bob, "Quantity": "1"}), "Mint-Response")  # naming oneself is fine
    assert (balance(usda, alice), balance(usda, bob), supply(usda)) == (FAUCET_PER_REQUEST, 1, start + FAUCET_PER_REQUEST + 1)


def test_faucet_gives_at_most_1000_usda_per_request(system, wallet):
    usda, alice = system["usda"], wallet()
    before = tokens_state()
    refused(send(alice, usda, {"Action": "Mint", "Quantity": str(FAUCET_PER_REQUEST + 1)}),
            "The faucet gives at most 1,000 per request.")
    assert tokens_state() == before  # no grant recorded for a refused request
    ok(send(alice, usda, {"Action": "Mint", "Quantity": str(FAUCET_PER_REQUEST)}), "Mint-Response")


def test_faucet_mints_only_to_the_wallet_that_asks(system, wallet):
    usda, alice, bob = system["usda"], wallet(), wallet()
    before = tokens_state()
    for recipient in (bob, "", system["coordinator"].id):
        refused(send(alice, usda, {"Action": "Mint", "Recipient": recipient, "Quantity": "5"}),
                "The faucet mints only to the wallet that asks.")
    assert tokens_state() == before


def test_faucet_gives_at_most_10000_usda_per_wallet_per_24_hours(system, wallet):
    usda, alice, bob = system["usda"], wallet(), wallet()
    for _ in range(10):
        ok(send(alice, usda, {"Action": "Mint", "Quantity": str(FAUCET_PER_REQUEST)}), "Mint-Response")
    before = tokens_state()
    refused(send(alice, usda, {"Action": "Mint", "Quantity": "1"}),
            "Faucet limit reached: 10,000 of 10,000 used in the last 24 hours.")
    assert tokens_state() == before
    assert balance(usda, alice) == FAUCET_PER_WINDOW
    ok(send(bob, usda, {"Action": "Mint", "Quantity": str(FAUCET_PER_REQUEST)}), "Mint-Response")  # per wallet


def test_faucet_window_rolls_with_message_time(system, wallet):
    usda, alice = system["usda"], wallet()
    t0 = now_ms() - 3 * DAY

    def ask(quantity: int, at: int) -> Message:
        return send_at(alice, usda, {"Action": "Mint", "Quantity": str(quantity)}, timestamp=at)

    for _ in range(5):
        ok(ask(FAUCET_PER_REQUEST, t0), "Mint-Response")
    for _ in range(5):
        ok(ask(FAUCET_PER_REQUEST, t0 + 12 * HOUR), "Mint-Response")
    refused(ask(1, t0 + 12 * HOUR + 1), "Faucet limit reached: 10,000 of 10,000")
    refused(ask(1, t0 + DAY - 1), "Faucet limit reached: 10,000 of 10,000")  # t0's grants are still inside
    # At t0 + 24 h the first five grants leave the window: 5,000 is free again, not more.
    for _ in range(5):
        ok(ask(FAUCET_PER_REQUEST, t0 + DAY), "Mint-Response")
    refused(ask(1, t0 + DAY), "Faucet limit reached: 10,000 of 10,000")
    # At t0 + 36 h the grants of t0 + 12 h leave too.
    refused(ask(FAUCET_PER_REQUEST + 1, t0 + 36 * HOUR), "at most 1,000 per request")
    ok(ask(FAUCET_PER_REQUEST, t0 + 36 * HOUR), "Mint-Response")
    refused(ask(4 * FAUCET_PER_REQUEST + 1, t0 + 36 * HOUR), "per request")
    for _ in range(4):
        ok(ask(FAUCET_PER_REQUEST, t0 + 36 * HOUR), "Mint-Response")
    refused(ask(1, t0 + 36 * HOUR), "Faucet limit reached: 10,000 of 10,000")
    assert balance(usda, alice) == 20 * FAUCET_PER_REQUEST
    assert FaucetGrant.objects.filter(process=usda, account=alice).count() == 20


def test_faucet_window_counts_grants_by_their_recorded_time(system, wallet):
    """The window reads FaucetGrant rows by timestamp: grants a day old no longer count."""
    usda, alice = system["usda"], wallet()
    day_ago = now_ms() - DAY - 1
    for _ in range(10):
        ok(send_at(alice, usda, {"Action": "Mint", "Quantity": str(FAUCET_PER_REQUEST)}, timestamp=day_ago), "Mint-Response")
    assert set(FaucetGrant.objects.filter(process=usda, account=alice).values_list("timestamp", flat=True)) == {day_ago}
    ok(send(alice, usda, {"Action": "Mint", "Quantity": str(FAUCET_PER_REQUEST)}), "Mint-Response")


def test_usda_owner_mints_beyond_the_faucet_limits(system, operator, wallet):
    usda, alice = system["usda"], wallet()
    ok(send(operator, usda, {"Action": "Mint", "Recipient": alice, "Quantity": str(2 * FAUCET_PER_WINDOW)}), "Mint-Response")
    assert balance(usda, alice) == 2 * FAUCET_PER_WINDOW
    assert not FaucetGrant.objects.filter(process=usda).exists()


def test_production_usda_only_the_owner_mints(db, wallet):
    procs = bootstrap_system(environment="production")
    usda, owner, alice = procs["usda"], operator_address(), wallet()
    assert ok(send(alice, usda, {"Action": "Info"}), "Info-Response").get("Mint-Policy") == "owner"
    before = tokens_state()
    refused(send(alice, usda, {"Action": "Mint", "Quantity": "1"}), "Only the owner may Mint.")
    refused(send(alice, usda, {"Action": "Mint", "Recipient": alice, "Quantity": "1"}), "Only the owner may Mint.")
    assert tokens_state() == before
    answer = ok(send(owner, usda, {"Action": "Mint", "Recipient": alice, "Quantity": str(5 * FAUCET_PER_REQUEST)}),
                "Mint-Response")
    assert (answer.get("Recipient"), balance(usda, alice)) == (alice, 5 * FAUCET_PER_REQUEST)
    ok(send(owner, usda, {"Action": "Mint", "Quantity": "3"}), "Mint-Response")  # no Recipient: to the owner
    assert balance(usda, owner) == 3
    refused(send(owner, usda, {"Action": "Mint", "Recipient": "alice", "Quantity": "1"}),
            "Recipient must be a 43-character address.")


def test_set_mint_policy_switches_usda_between_faucet_and_owner(system, operator, wallet):
    usda, alice = system["usda"], wallet()
    answer = ok(send(operator, usda, {"Action": "SetMintPolicy", "Mint-Policy": "owner"}), "SetMintPolicy-Response")
    assert answer.get("Mint-Policy") == "owner"
    refused(send(alice, usda, {"Action": "Mint", "Quantity": "1"}), "Only the owner may Mint.")
    refused(send(operator, usda, {"Action": "SetMintPolicy", "Mint-Policy": "everyone"}),
            "Mint-Policy must be faucet, owner or minters.")
    refused(send(operator, usda, {"Action": "SetMintPolicy"}), "Mint-Policy must be faucet, owner or minters.")
    ok(send(operator, usda, {"Action": "SetMintPolicy", "Mint-Policy": "faucet"}), "SetMintPolicy-Response")
    ok(send(alice, usda, {"Action": "Mint", "Quantity": "1"}), "Mint-Response")


def test_only_authorized_minters_mint_tim3(system, operator, wallet):
    tim3, alice = system["tim3"], wallet()
    before = tokens_state()
    for sender, recipient in ((alice, None), (alice, alice), (operator, alice)):  # the owner is not a minter either
        refused(send(sender, tim3, {"Action": "Mint", "Recipient": recipient, "Quantity": str(UNIT)}),
                "Only an authorized minter may Mint.")
    assert tokens_state() == before
    assert supply(tim3) == 0


def test_a_minter_mints_to_a_recipient_until_it_is_removed(minters, wallet):
    token, user = minters.token, minters.user
    answer = ok(minters.via({"Action": "Mint", "Recipient": user, "Quantity": str(3 * UNIT), "X-Operation-Id": "op-a"}),
                "Mint-Response")
    assert answer.tag_dict == {"X-Operation-Id": "op-a", "Action": "Mint-Response", "Recipient": user,
                               "Quantity": str(3 * UNIT)}
    assert answer.data == f"Minted 3 TIM3X to {user}"
    assert (balance(token, user), supply(token)) == (3 * UNIT, 3 * UNIT)
    refused(minters.via({"Action": "Mint", "Quantity": "1"}), "Recipient is required.")
    refused(minters.via({"Action": "Mint", "Recipient": "x", "Quantity": "1"}), "Recipient must be a 43-character address.")
    # A minter is not the owner: it cannot hand minting to others.
    refused(minters.via({"Action": "AddMinter", "Minter": wallet()}), "Only the owner may AddMinter.")

    removed = ok(send(minters.owner, token, {"Action": "RemoveMinter", "Minter": minters.minter.id}), "RemoveMinter-Response")
    assert removed.get("Minter") == minters.minter.id
    before = tokens_state()
    refused(minters.via({"Action": "Mint", "Recipient": user, "Quantity": "1"}), "Only an authorized minter may Mint.")
    assert tokens_state() == before


def test_a_wallet_minter_added_by_the_owner_may_mint(minters, wallet):
    minter, user = wallet(), wallet()
    refused(send(minter, minters.token, {"Action": "Mint", "Recipient": user, "Quantity": "5"}), "authorized minter")
    added = ok(send(minters.owner, minters.token, {"Action": "AddMinter", "Minter": minter}), "AddMinter-Response")
    assert added.get("Minter") == minter
    ok(send(minters.owner, minters.token, {"Action": "AddMinter", "Minter": minter}), "AddMinter-Response")  # idempotent
    assert TokenMinter.objects.filter(process=minters.token, address=minter).count() == 1
    ok(send(minter, minters.token, {"Action": "Mint", "Recipient": user, "Quantity": "5"}), "Mint-Response")
    assert balance(minters.token, user) == 5


def test_the_same_operation_id_never_mints_twice(minters):
    token, user = minters.token, minters.user
    mint_tags = {"Action": "Mint", "Recipient": user, "Quantity": str(4 * UNIT), "X-Operation-Id": "op-7"}
    ok(minters.via(mint_tags), "Mint-Response")
    before = tokens_state()
    for tags in (mint_tags, {**mint_tags, "Quantity": "1"}, {**mint_tags, "Recipient": minters.other_user}):
        refused(minters.via(tags), "Operation op-7 was already applied; it is never applied twice.")
    assert tokens_state() == before
    # A compensation re-mint (X-Mint-Kind) is its own operation, and also happens at most once.
    ok(minters.via({**mint_tags, "X-Mint-Kind": "remint"}), "Mint-Response")
    refused(minters.via({**mint_tags, "X-Mint-Kind": "remint"}), "Operation op-7:remint was already applied")
    assert (balance(token, user), supply(token)) == (8 * UNIT, 8 * UNIT)


def test_a_reused_operation_id_on_the_faucet_consumes_no_allowance(system, wallet):
    usda, alice = system["usda"], wallet()
    ok(send(alice, usda, {"Action": "Mint", "Quantity": str(FAUCET_PER_REQUEST), "X-Operation-Id": "mine"}), "Mint-Response")
    before = tokens_state()
    refused(send(alice, usda, {"Action": "Mint", "Quantity": str(FAUCET_PER_REQUEST), "X-Operation-Id": "mine"}),
            "already applied")
    assert tokens_state() == before
    assert FaucetGrant.objects.filter(process=usda, account=alice).count() == 1


def test_an_operation_id_too_long_to_record_is_refused_clearly(minters):
    before = tokens_state()
    error = refused(minters.via({"Action": "Mint", "Recipient": minters.user, "Quantity": "1", "X-Operation-Id": "x" * 121}),
                    "longer than 120 characters")
    assert "Internal error" not in error
    assert tokens_state() == before
    ok(minters.via({"Action": "Mint", "Recipient": minters.user, "Quantity": "1", "X-Operation-Id": "x" * 120}),
       "Mint-Response")


# --- configuration is the owner's ------------------------------------------------------------------------

@pytest.mark.parametrize("token_name, action, tags", [
    ("tim3", "AddMinter", lambda s, w: {"Minter": w}),
    ("tim3", "RemoveMinter", lambda s, w: {"Minter": s["coordinator"].id}),
    ("tim3", "SetLocker", lambda s, w: {"Locker": w}),
    ("tim3", "SetMintPolicy", lambda s, w: {"Mint-Policy": "faucet"}),
    ("usda", "AddMinter", lambda s, w: {"Minter": w}),
    ("usda", "SetLocker", lambda s, w: {"Locker": w}),
    ("usda", "SetMintPolicy", lambda s, w: {"Mint-Policy": "owner"}),
])
def test_configuration_handlers_are_owner_only(system, wallet, token_name, action, tags):
    stranger = wallet()
    before = tokens_state()
    refused(send(stranger, system[token_name], {"Action": action, **tags(system, stranger)}), f"Only the owner may {action}.")
    assert tokens_state() == before
    tim3, usda = state_of(system["tim3"]), state_of(system["usda"])
    assert (tim3.mint_policy, usda.mint_policy, usda.locker) == ("minters", "faucet", system["lock-manager"].id)
    assert list(TokenMinter.objects.filter(process=system["tim3"]).values_list("address", flat=True)) == [
        system["coordinator"].id]


@pytest.mark.parametrize("action, tags, error", [
    ("AddMinter", {}, "Minter is required."),
    ("AddMinter", {"Minter": "coordinator"}, "Minter must be a 43-character address."),
    ("RemoveMinter", {"Minter": ""}, "Minter is required."),
    ("SetLocker", {}, "Locker is required."),
    ("SetLocker", {"Locker": "lock-manager"}, "Locker must be a 43-character address."),
])
def test_configuration_needs_valid_addresses(system, operator, action, tags, error):
    before = tokens_state()
    refused(send(operator, system["usda"], {"Action": action, **tags}), error)
    assert tokens_state() == before


# --- Burn --------------------------------------------------------------------------------------------------

def test_a_holder_burns_its_own_tokens(owned):
    token, holder = owned.token, owned.holder
    answer = ok(send(holder, token, {"Action": "Burn", "Quantity": str(40 * UNIT), "X-Why": "exit"}), "Burn-Response")
    assert answer.tag_dict == {"X-Why": "exit", "Action": "Burn-Response", "User": holder, "Quantity": str(40 * UNIT)}
    assert answer.data == f"Burned 40 TOK of {holder}"
    assert (balance(token, holder), supply(token), state_of(token).burned_total) == (60 * UNIT, 60 * UNIT, 40 * UNIT)
    ok(send(holder, token, {"Action": "Burn", "User": holder, "Quantity": str(UNIT)}), "Burn-Response")  # naming oneself
    before = tokens_state()
    refused(send(holder, token, {"Action": "Burn", "Quantity": str(59 * UNIT + 1)}),
            "Insufficient balance: 59 available, 59.000001 needed.")
    refused(send(owned.other, token, {"Action": "Burn", "Quantity": "1"}), "Insufficient balance: 0 available")
    assert tokens_state() == before


@pytest.mark.parametrize("request_action", ["RedeemTIM3", "BurnTIM3"])
def test_a_minter_burns_for_a_user_inside_that_users_redemption(minters, request_action):
    token, user = minters.token, minters.user
    ok(minters.via({"Action": "Mint", "Recipient": user, "Quantity": str(10 * UNIT)}), "Mint-Response")
    request = send(user, minters.minter, {"Action": request_action, "Quantity": str(4 * UNIT)})
    assert (request.status, request.handled) == (Message.APPLIED, False)  # in the minter's inbox

    burn = minters.via({"Action": "Burn", "User": user, "Quantity": str(4 * UNIT), "Redemption-Request": request.msg_id,
                        "X-Operation-Id": "op-r"})
    answer = ok(burn, "Burn-Response")
    assert answer.tag_dict == {"X-Operation-Id": "op-r", "Action": "Burn-Response", "User": user, "Quantity": str(4 * UNIT)}
    assert (balance(token, user), supply(token), state_of(token).burned_total) == (6 * UNIT, 6 * UNIT, 4 * UNIT)

    # One request, one burn: repeating it (a retry, a replayed message) burns nothing more.
    before = tokens_state()
    refused(minters.via({"Action": "Burn", "User": user, "Quantity": str(4 * UNIT), "Redemption-Request": request.msg_id}),
            f"Operation burn:{request.msg_id} was already applied")
    assert tokens_state() == before


def _other_users_request(ns, quantity):
    return send(ns.other_user, ns.minter, {"Action": "RedeemTIM3", "Quantity": quantity}).msg_id


def _request_to_another_minter(ns, quantity):
    other = spawn_relay(ns.owner, "minter-2")
    ok(send(ns.owner, ns.token, {"Action": "AddMinter", "Minter": other.id}), "AddMinter-Response")
    return send(ns.user, other, {"Action": "RedeemTIM3", "Quantity": quantity}).msg_id


def _request_to_the_token(ns, quantity):
    return send(ns.user, ns.token, {"Action": "RedeemTIM3", "Quantity": quantity}).msg_id


NOT_THIS_REDEMPTION = "Redemption-Request is not this user's redemption sent to this minter."


@pytest.mark.parametrize("make_request, error", [
    pytest.param(lambda ns, q: None, "Burning for another account needs the Redemption-Request it belongs to.", id="none"),
    pytest.param(lambda ns, q: "", "needs the Redemption-Request", id="empty"),
    pytest.param(lambda ns, q: new_id(), NOT_THIS_REDEMPTION, id="unknown-id"),
    pytest.param(_other_users_request, NOT_THIS_REDEMPTION, id="another-users-request"),
    pytest.param(_request_to_another_minter, NOT_THIS_REDEMPTION, id="sent-to-another-minter"),
    pytest.param(_request_to_the_token, NOT_THIS_REDEMPTION, id="sent-to-the-token"),
    pytest.param(lambda ns, q: send(ns.user, ns.minter, {"Action": "Redeem", "Quantity": q}).msg_id,
                 NOT_THIS_REDEMPTION, id="not-a-redemption-action"),
    pytest.param(lambda ns, q: send(ns.user, ns.minter, {"Action": "RedeemTIM3", "Quantity": q, "Refuse": "yes"}).msg_id,
                 NOT_THIS_REDEMPTION, id="request-that-failed"),
    pytest.param(lambda ns, q: send(ns.user, ns.minter, {"Action": "RedeemTIM3", "Quantity": str(int(q) + 1)}).msg_id,
                 "Burn quantity does not match the redemption request.", id="different-quantity"),
    pytest.param(lambda ns, q: send(ns.user, ns.minter, {"Action": "RedeemTIM3"}).msg_id,
                 "Burn quantity does not match the redemption request.", id="request-without-quantity"),
])
def test_a_minter_cannot_burn_for_a_user_outside_that_users_redemption(minters, make_request, error):
    token, user = minters.token, minters.user
    ok(minters.via({"Action": "Mint", "Recipient": user, "Quantity": str(10 * UNIT)}), "Mint-Response")
    ok(minters.via({"Action": "Mint", "Recipient": minters.other_user, "Quantity": str(10 * UNIT)}), "Mint-Response")
    quantity = str(4 * UNIT)
    request_id = make_request(minters, quantity)
    before = tokens_state()
    refused(minters.via({"Action": "Burn", "User": user, "Quantity": quantity, "Redemption-Request": request_id}), error)
    assert tokens_state() == before
    assert (balance(token, user), supply(token)) == (10 * UNIT, 20 * UNIT)


def test_only_a_minter_burns_for_someone_else(minters, wallet):
    token, user, stranger = minters.token, minters.user, wallet()
    ok(minters.via({"Action": "Mint", "Recipient": user, "Quantity": str(10 * UNIT)}), "Mint-Response")
    ok(minters.via({"Action": "Mint", "Recipient": stranger, "Quantity": str(10 * UNIT)}), "Mint-Response")
    request = send(user, minters.minter, {"Action": "RedeemTIM3", "Quantity": str(UNIT)})
    before = tokens_state()
    only_minters = "Only an authorized minter may burn for a user, inside that user's redemption."
    # A holder, even holding a valid request id, cannot burn someone else's tokens.
    refused(send(stranger, token, {"Action": "Burn", "User": user, "Quantity": str(UNIT),
                                   "Redemption-Request": request.msg_id}), only_minters)
    # Neither can the owner, nor a process that is no longer a minter.
    refused(send(minters.owner, token, {"Action": "Burn", "User": user, "Quantity": str(UNIT),
                                        "Redemption-Request": request.msg_id}), only_minters)
    ok(send(minters.owner, token, {"Action": "RemoveMinter", "Minter": minters.minter.id}), "RemoveMinter-Response")
    refused(minters.via({"Action": "Burn", "User": user, "Quantity": str(UNIT), "Redemption-Request": request.msg_id}),
            only_minters)
    assert tokens_state()["tim3x"]["TokenAccount"] == before["tim3x"]["TokenAccount"]
    assert supply(token) == 20 * UNIT


def test_a_burn_for_a_user_cannot_take_locked_funds(minters):
    token, user = minters.token, minters.user
    locker = spawn_relay(minters.owner, "locker")
    ok(send(minters.owner, token, {"Action": "SetLocker", "Locker": locker.id}), "SetLocker-Response")
    ok(minters.via({"Action": "Mint", "Recipient": user, "Quantity": str(10 * UNIT)}), "Mint-Response")
    ok(relay(minters.owner, locker, token, {"Action": "Lock", "User": user, "Quantity": str(8 * UNIT)}), "Lock-Response")
    request = send(user, minters.minter, {"Action": "RedeemTIM3", "Quantity": str(3 * UNIT)})
    before = tokens_state()
    refused(minters.via({"Action": "Burn", "User": user, "Quantity": str(3 * UNIT), "Redemption-Request": request.msg_id}),
            "Insufficient balance: 2 available, 3 needed.")
    assert tokens_state() == before


# --- Lock / Unlock -----------------------------------------------------------------------------------------

def test_only_the_configured_locker_locks_and_unlocks(db, wallet):
    owner, user, stranger, locker, new_locker = wallet(), wallet(), wallet(), wallet(), wallet()
    token = spawn_token(owner, "lockable")
    mint(owner, token, user, 100 * UNIT)
    lock = {"Action": "Lock", "User": user, "Quantity": str(UNIT)}
    unlock = {"Action": "Unlock", "User": user, "Quantity": str(UNIT)}
    before = tokens_state()
    for sender in (owner, user, stranger):  # no locker yet: nobody, not even the owner
        refused(send(sender, token, lock), "Only the Lock Manager may Lock.")
    refused(send(stranger, token, {"Action": "SetLocker", "Locker": stranger}), "Only the owner may SetLocker.")
    assert tokens_state() == before

    assert ok(send(owner, token, {"Action": "SetLocker", "Locker": locker}), "SetLocker-Response").get("Locker") == locker
    for sender in (owner, user, stranger):
        refused(send(sender, token, lock), "Only the Lock Manager may Lock.")
        refused(send(sender, token, unlock), "Only the Lock Manager may Unlock.")
    ok(send(locker, token, lock), "Lock-Response")
    ok(send(owner, token, {"Action": "SetLocker", "Locker": new_locker}), "SetLocker-Response")
    refused(send(locker, token, unlock), "Only the Lock Manager may Unlock.")  # replaced: no longer the locker
    ok(send(new_locker, token, unlock), "Unlock-Response")
    assert locked(token, user) == 0


def test_usda_lock_and_unlock_belong_to_the_lock_manager(system, operator, wallet):
    usda, alice = system["usda"], wallet()
    ok(send(alice, usda, {"Action": "Mint", "Quantity": str(FAUCET_PER_REQUEST)}), "Mint-Response")
    before = tokens_state()
    for sender in (alice, operator):
        refused(send(sender, usda, {"Action": "Lock", "User": alice, "Quantity": "1"}), "Only the Lock Manager may Lock.")
        refused(send(sender, usda, {"Action": "Unlock", "User": alice, "Quantity": "1"}), "Only the Lock Manager may Unlock.")
    assert tokens_state() == before
    assert state_of(usda).locker == system["lock-manager"].id


def test_lock_within_the_available_balance_and_unlock_within_what_is_locked(owned, wallet):
    token, holder, locker = owned.token, owned.holder, owned.locker

    def lock(quantity, user=holder, **tags):
        return send(locker, token, {"Action": "Lock", "User": user, "Quantity": str(quantity), **tags})

    def unlock(quantity, user=holder):
        return send(locker, token, {"Action": "Unlock", "User": user, "Quantity": str(quantity)})

    answer = ok(lock(60 * UNIT, **{"X-Operation-Id": "op-l"}), "Lock-Response")
    assert answer.tag_dict == {"X-Operation-Id": "op-l", "Action": "Lock-Response", "User": holder,
                               "Quantity": str(60 * UNIT), "Locked": str(60 * UNIT)}
    before = tokens_state()
    refused(lock(40 * UNIT + 1), "Insufficient unlocked balance: 40 available to lock.")
    refused(lock(1, user=wallet()), "Insufficient unlocked balance: 0 available to lock.")
    assert tokens_state() == before
    assert ok(lock(40 * UNIT), "Lock-Response").get("Locked") == str(100 * UNIT)
    refused(lock(1), "Insufficient unlocked balance: 0 available to lock.")

    before = tokens_state()
    refused(unlock(100 * UNIT + 1), "Cannot unlock more than is locked.")
    refused(unlock(1, user=wallet()), "Cannot unlock more than is locked.")
    assert tokens_state() == before
    answer = ok(unlock(30 * UNIT), "Unlock-Response")
    assert answer.tag_dict == {"Action": "Unlock-Response", "User": holder, "Quantity": str(30 * UNIT),
                               "Locked": str(70 * UNIT)}
    shown = ok(send(holder, token, {"Action": "Balance"}), "Balance-Response")
    assert (shown.get("Balance"), shown.get("Locked")) == (str(100 * UNIT), str(70 * UNIT))
    assert (balance(token, holder), locked(token, holder), supply(token)) == (100 * UNIT, 70 * UNIT, 100 * UNIT)


def test_locked_funds_cannot_be_transferred_or_burned(owned):
    token, holder, other, locker = owned.token, owned.holder, owned.other, owned.locker
    ok(send(locker, token, {"Action": "Lock", "User": holder, "Quantity": str(70 * UNIT)}), "Lock-Response")
    before = tokens_state()
    refused(send(holder, token, {"Action": "Transfer", "Recipient": other, "Quantity": str(30 * UNIT + 1)}),
            "Insufficient balance: 30 available, 30.000001 needed.")
    refused(send(holder, token, {"Action": "Burn", "Quantity": str(30 * UNIT + 1)}), "Insufficient balance: 30 available")
    assert tokens_state() == before
    assert send(holder, token, {"Action": "Transfer", "Recipient": other, "Quantity": str(30 * UNIT)}).status == Message.APPLIED
    refused(send(holder, token, {"Action": "Transfer", "Recipient": other, "Quantity": "1"}), "Insufficient balance: 0 available")
    assert (balance(token, holder), locked(token, holder)) == (70 * UNIT, 70 * UNIT)
    ok(send(locker, token, {"Action": "Unlock", "User": holder, "Quantity": str(20 * UNIT)}), "Unlock-Response")
    assert send(holder, token, {"Action": "Transfer", "Recipient": other, "Quantity": str(20 * UNIT)}).status == Message.APPLIED
    assert (balance(token, holder), locked(token, holder), balance(token, other)) == (50 * UNIT, 50 * UNIT, 50 * UNIT)


@pytest.mark.parametrize("action", ["Lock", "Unlock"])
@pytest.mark.parametrize("user, error", [
    pytest.param(None, "User is required.", id="missing"),
    pytest.param("", "User is required.", id="empty"),
    pytest.param("holder", "User must be a 43-character address.", id="not-an-address"),
])
def test_lock_and_unlock_need_a_valid_user(owned, action, user, error):
    before = tokens_state()
    refused(send(owned.locker, owned.token, {"Action": action, "User": user, "Quantity": "1"}), error)
    assert tokens_state() == before
