"""A Hypothesis state machine over the whole system: users and the owner act in
random order while delivery is partial, and the invariants must hold after
every step.

Steps: faucet, v2 deposits and redemptions, v1 lock mints and burns, USDA and
TIM3 transfers between users, pauses and resumes and limit changes by the
owner, risk checks, timeouts (PendingTimeout and CleanupExpired), and an
attacker's wallet forging what only processes may send. Delivery
is a step too: one process's mailbox (all of it, or only its head message), or
everything, so flows are left in flight and interleave.

After every step: every invariant of `processes.invariants` (supply == sum of
balances, nothing negative, gap-free slots, TIM3 supply <= USDA reserves, and
equality with the books when nothing is in flight), plus: with nothing in
flight, no flow and no operation is still pending and each flow's status is
its operation's. At the end of each example everything is delivered, every
flow has ended, and the message log replays to exactly the live state.

Each example starts from the same freshly bootstrapped, funded system, inside a
savepoint that its teardown rolls back (the test database is only reset per
test function, so the starting state is built once and each example undoes
its own steps).

Time: CleanupExpired is sent by the scheduler like the Cron tick, and the tick's
message timestamp may be moved forward: it simulates the tick arriving later in
message time without sleeping (the log stays self-consistent, so replay agrees).

TIM3_STATEFUL_EXAMPLES raises the number of examples for a longer hunt.
"""

import os

from django.db import transaction
from django.db.models import F, Q, Sum
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from processes import actions
from processes.blueprints.state import CoordinatorState, FaucetGrant, Operation, TokenAccount, TokenState
from processes.flows import Flow, start_flow
from processes.invariants import check_invariants
from processes.runtime.delivery import drain_mailbox, run_until_idle, send_message
from processes.runtime.ids import new_id
from processes.runtime.models import Message
from processes.runtime.quantities import UNIT
from processes.runtime.replay import replay_all
from processes.services import bootstrap_system, operator_address, send_check_risk_alerts, send_cleanup_expired

U = UNIT
USERS = 3
PROCESSES = ("usda", "tim3", "coordinator", "lock-manager", "state-manager")

users = st.integers(min_value=0, max_value=USERS - 1)
ordinary = st.integers(min_value=1, max_value=300).map(lambda n: n * U)
amounts = st.one_of(
    ordinary, ordinary, ordinary,  # (one_of picks a branch uniformly: mostly ordinary amounts)
    st.integers(min_value=1, max_value=999_999),  # below the 1 TIM3 minimum, or dust
    st.integers(min_value=301, max_value=1_500).map(lambda n: n * U),  # large: cooldown, caps, limits
)
# What an attacker's wallet may send, naming a real operation: every one must fail
# (or, for a status answer nobody is waiting for, be ignored) and change nothing.
FORGERIES = [
    ("coordinator", action) for action in (
        "Mint-Response", "Mint-Error", "Burn-Response", "Burn-Error", "LockCollateral-Success",
        "LockCollateral-Error", "UnlockCollateral-Success", "UnlockCollateral-Error", "UpdatePosition-Response",
        "UpdatePosition-Error", "Transfer-Error", "Debit-Notice", "Credit-Notice", "Risk-Alert",
        "Message-Status-Response")
] + [
    ("lock-manager", action) for action in (
        "Lock-Response", "Lock-Error", "Unlock-Response", "Unlock-Error", "LockCollateral", "UnlockCollateral")
] + [("state-manager", "UpdatePosition"), ("tim3", "Mint"), ("tim3", "Burn"), ("usda", "Lock"), ("usda", "Unlock")]
scopes = st.sampled_from(["mint", "redeem", "all"])
limits = st.sampled_from([
    ("MaxAmount", 20 * U), ("MaxAmount", 100_000 * U),
    ("UserDailyLimit", 300 * U), ("UserDailyLimit", 50_000 * U),
    ("RateLimitPerMinute", 3), ("RateLimitPerMinute", 60),
    ("PendingTimeout", 1), ("PendingTimeout", 300),
])


def starting_state() -> dict:
    """The bootstrapped system, and users who start with 1,000 USDA from the faucet, of
    which 400 deposited (v2) and 300 locked (v1), so that most requests, redemptions
    included, can succeed. Built once per test; every example starts from it."""
    processes = bootstrap_system(environment="test")
    users = [new_id() for _ in range(USERS)]
    for user in users:
        actions.request_faucet(wallet=user, quantity=str(1_000 * U))
    run_until_idle()
    for user in users:
        actions.request_deposit(wallet=user, quantity=str(400 * U), mode="deposit")
        actions.request_deposit(wallet=user, quantity=str(300 * U), mode="lock")
    run_until_idle()
    assert set(Flow.objects.values_list("status", flat=True)) == {Flow.COMPLETED}
    assert check_invariants() == []
    return {"ids": {name: p.id for name, p in processes.items()}, "owner": operator_address(), "users": users,
            "attacker": new_id()}


class TIM3System(RuleBasedStateMachine):
    start: dict = {}  # set by the test to starting_state()

    def __init__(self) -> None:
        super().__init__()
        # A savepoint over the starting state, rolled back by teardown: a fresh system per example.
        self._atomic = transaction.atomic()
        self._atomic.__enter__()
        self.ids, self.owner = self.start["ids"], self.start["owner"]
        self.users, self.attacker = self.start["users"], self.start["attacker"]

    def teardown(self) -> None:
        try:
            run_until_idle()
            assert check_invariants() == []
            pending = list(Flow.objects.filter(status=Flow.PENDING).values_list("kind", "mode", "id"))
            assert pending == [], f"flows still pending after everything was delivered: {pending}"
            report = replay_all()
            assert report.clean, "\n".join(report.differences)
        finally:
            transaction.set_rollback(True)
            self._atomic.__exit__(None, None, None)

    # --- users ------------------------------------------------------------------------------

    @rule(user=users, quantity=amounts)
    def faucet(self, user, quantity):
        actions.request_faucet(wallet=self.users[user], quantity=str(quantity))

    @rule(user=users, quantity=amounts)
    def deposit(self, user, quantity):
        actions.request_deposit(wallet=self.users[user], quantity=str(quantity), mode="deposit")

    @rule(user=users, quantity=amounts)
    def redeem(self, user, quantity):
        actions.request_redemption(wallet=self.users[user], quantity=str(quantity), mode="deposit")

    @rule(user=users, quantity=amounts)
    def lock_mint(self, user, quantity):
        actions.request_deposit(wallet=self.users[user], quantity=str(quantity), mode="lock")

    @rule(user=users, quantity=amounts)
    def burn(self, user, quantity):
        actions.request_redemption(wallet=self.users[user], quantity=str(quantity), mode="lock")

    @rule(token=st.sampled_from(["usda", "tim3"]), sender=users, recipient=users, quantity=amounts)
    def transfer(self, token, sender, recipient, quantity):
        start_flow(user=self.users[sender], target=self.ids[token], kind="transfer", quantity=quantity, tags={
            "Action": "Transfer", "Recipient": self.users[recipient], "Quantity": str(quantity)})

    # --- the owner and the scheduler -----------------------------------------------------------

    @rule(pause=st.booleans(), scope=scopes)
    def pause_or_resume(self, pause, scope):
        if pause:
            actions.request_pause(wallet=self.owner, scope=scope, reason="stateful test", role="admin")
        else:
            actions.request_resume(wallet=self.owner, scope=scope)

    @rule(limit=limits)
    def configure(self, limit):
        config_type, value = limit
        send_message(sender=self.owner, target=self.ids["coordinator"], tags={
            "Action": "Configure", "ConfigType": config_type, "Value": str(value)})

    @rule(later_s=st.sampled_from([0, 2, 400]))
    def cleanup_expired(self, later_s):
        """The Cron tick, `later_s` later in message time, delivered to the coordinator at once
        after what the coordinator already had (so it meets operations waiting in flight; what
        it sends stays in flight)."""
        drain_mailbox(process_id=self.ids["coordinator"])
        for tick in send_cleanup_expired():
            Message.objects.filter(pk=tick.pk).update(timestamp=F("timestamp") + later_s * 1000)
        drain_mailbox(process_id=self.ids["coordinator"])

    @rule()
    def check_risk(self):
        send_check_risk_alerts()

    # --- an attacker -------------------------------------------------------------------------

    @rule(forgery=st.sampled_from(FORGERIES), pick=st.integers(min_value=0, max_value=99), user=users)
    def forge(self, forgery, pick, user):
        """A wallet sends what only a process may, naming a real operation and user."""
        name, action = forgery
        tags = {"Action": action, "User": self.users[user], "Sender": self.users[user], "Recipient": self.users[user],
                "Quantity": str(U), "Error": "forged", "Status": "unknown", "Handled": "false",
                "Operation": "burn", "Amount": str(U), "CollateralAmount": str(U), "CollateralType": "USDA-custody"}
        ops = list(Operation.objects.order_by("created_at", "op_id").values_list("op_id", "awaiting", "quantity"))
        if ops:
            op_id, awaiting, quantity = ops[pick % len(ops)]
            tags.update({"X-Operation-Id": op_id, "Message-Id": awaiting or op_id, "Quantity": str(quantity)})
        else:
            tags["X-Operation-Id"] = new_id()
        send_message(sender=self.attacker, target=self.ids[name], tags=tags)

    # --- delivery ---------------------------------------------------------------------------

    @rule(name=st.sampled_from(PROCESSES), head_only=st.booleans())
    def deliver_one(self, name, head_only):
        """One process's mailbox (or just its head message): the others' stay in flight."""
        drain_mailbox(process_id=self.ids[name], batch_size=1 if head_only else None)

    @rule()
    def deliver_all(self):
        run_until_idle()

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def system_invariants(self):
        assert check_invariants() == []

    @invariant()
    def forgeries_fail(self):
        for msg in Message.objects.filter(sender=self.attacker).exclude(status=Message.PENDING):
            if msg.status == Message.APPLIED:  # only a status answer nobody waits for, ignored
                assert msg.action == "Message-Status-Response", (msg.action, msg.tags)
                assert msg.result == {"messages": [], "changes": []}, msg.result

    @invariant()
    def nothing_negative(self):
        assert not TokenAccount.objects.filter(Q(balance__lt=0) | Q(locked__lt=0) | Q(locked__gt=F("balance"))).exists()
        assert not CoordinatorState.objects.filter(
            Q(custody__lt=0) | Q(collateral__lt=0) | Q(outstanding__lt=0) | Q(payouts_committed__lt=0)).exists()

    @invariant()
    def supplies_are_accounted_for(self):
        usda = TokenState.objects.get(process_id=self.ids["usda"])
        assert usda.total_supply == (FaucetGrant.objects.aggregate(s=Sum("quantity"))["s"] or 0)
        for token in TokenState.objects.all():
            assert token.total_supply == token.minted_total - token.burned_total

    @invariant()
    def at_rest_nothing_waits(self):
        if Message.objects.filter(status=Message.PENDING).exists():
            return
        assert list(Operation.objects.filter(status=Operation.PENDING).values_list("kind", "step")) == []
        assert list(Flow.objects.filter(status=Flow.PENDING).values_list("kind", "mode")) == []
        flows = dict(Flow.objects.values_list("id", "status"))
        for op in Operation.objects.all():
            assert flows[op.flow_id] == op.status, (op.kind, op.step, op.error, flows[op.flow_id])


def test_the_system_under_random_steps_and_partial_delivery(db, settings):
    settings.TIM3_ENV = "test"  # the faucet
    TIM3System.start = starting_state()
    run_state_machine_as_test(TIM3System, settings=hsettings(
        max_examples=int(os.environ.get("TIM3_STATEFUL_EXAMPLES", "15")), stateful_step_count=25, deadline=None,
        database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]))


def test_a_tick_in_the_same_batch_as_the_request_it_would_check_replays(system, wallet):
    """Found by the machine above (minimal form). A MintTIM3 and a later Cron tick wait in
    the coordinator's mailbox and are applied in one drain batch. The tick meets the new
    operation, whose LockCollateral is not written yet (outgoing messages are written at
    the end of the batch) but is there on replay: the coordinator used to skip it live
    and ask about it on replay, so `verify` reported a difference. A tick now looks only
    at requests that arrived before it, the same live and on replay."""
    user = wallet()
    for _ in range(2):
        actions.request_faucet(wallet=user, quantity=str(1_000 * U))
    run_until_idle()
    coordinator = system["coordinator"]
    flow = actions.request_deposit(wallet=user, quantity=str(100 * U), mode="lock")
    [tick] = send_cleanup_expired()
    Message.objects.filter(pk=tick.pk).update(timestamp=F("timestamp") + 400_000)  # 400 s later in message time
    assert drain_mailbox(process_id=coordinator.id) == 2  # one batch: the MintTIM3, then the tick
    answer = Message.objects.get(pushed_for=tick.msg_id, action="CleanupExpired-Response")
    assert answer.get("Checked") == "0"
    report = replay_all()
    assert report.clean, "\n".join(report.differences)
    run_until_idle()
    flow.refresh_from_db()
    assert flow.status == Flow.COMPLETED
    assert check_invariants() == []
    report = replay_all()
    assert report.clean, "\n".join(report.differences)
