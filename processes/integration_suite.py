"""SPEC §6: the seeds' integration suite, run against the live system.

Every check asserts. It uses a throwaway wallet, waits for the real workers to
deliver (or drives delivery itself with `drive=True`, for a system with no
worker running), and returns one row per check.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from processes.actions import (
    ActionError,
    pause_state,
    request_deposit,
    request_faucet,
    request_pause,
    request_redemption,
    request_resume,
)
from processes.blueprints.state import Position, TokenAccount
from processes.flows import Flow
from processes.invariants import check_invariants
from processes.runtime.delivery import run_until_idle, send_message
from processes.runtime.ids import new_id
from processes.runtime.models import Message, Wallet
from processes.runtime.quantities import UNIT
from processes.services import active_coordinator, operator_address, resolve_process


class CheckFailed(AssertionError):
    pass


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str
    ms: int


@dataclass
class Suite:
    drive: bool = False
    timeout: float = 30.0
    wallet: str = field(default_factory=new_id)
    results: list[CheckResult] = field(default_factory=list)

    # --- plumbing ---------------------------------------------------------------
    def settle(self) -> None:
        if self.drive:
            run_until_idle()

    def wait_flow(self, flow: Flow) -> Flow:
        deadline = time.monotonic() + self.timeout
        while True:
            self.settle()
            flow.refresh_from_db()
            if flow.status != Flow.PENDING:
                return flow
            if time.monotonic() > deadline:
                raise CheckFailed(f"flow {flow.id} ({flow.kind}) still pending after {self.timeout:.0f}s: "
                                  "is a worker running?")
            time.sleep(0.02)

    def ask(self, process_name: str, tags: dict, *, sender: str | None = None) -> list[Message]:
        """Send and wait for the whole cascade; return the replies to the sender."""
        process = resolve_process(process_name)
        root = send_message(sender=sender or self.wallet, target=process.id, tags=tags)
        deadline = time.monotonic() + self.timeout
        while True:
            self.settle()
            cascade = list(Message.objects.filter(pushed_for=root.msg_id).order_by("seq"))
            if cascade and all(m.status != Message.PENDING for m in cascade):
                return [m for m in cascade if m.target == root.sender]
            if time.monotonic() > deadline:
                raise CheckFailed(f"{tags.get('Action')} to {process_name} not answered within {self.timeout:.0f}s")
            time.sleep(0.02)

    def expect(self, flow: Flow, status: str, contains: str = "") -> Flow:
        flow = self.wait_flow(flow)
        if flow.status != status or (contains and contains.lower() not in flow.error.lower()):
            raise CheckFailed(f"{flow.kind} {flow.quantity}: expected {status}"
                              f"{' mentioning ' + repr(contains) if contains else ''}, got {flow.status} {flow.error!r}")
        return flow

    def balance(self, token: str, *, locked: bool = False) -> int:
        row = TokenAccount.objects.filter(process__name=token, account=self.wallet).first()
        return 0 if row is None else (row.locked if locked else row.balance)

    def run_check(self, name: str, fn: Callable[[], str]) -> None:
        started = time.monotonic()
        try:
            detail, passed = fn(), True
        except (CheckFailed, ActionError, LookupError) as exc:
            detail, passed = str(exc), False
        except Exception as exc:  # a crash is a failed check, reported, not a traceback
            detail, passed = f"{type(exc).__name__}: {exc}", False
        self.results.append(CheckResult(name, passed, detail, int((time.monotonic() - started) * 1000)))

    # --- the checks -------------------------------------------------------------------
    def communication(self) -> str:
        names = ["usda", "tim3", "coordinator", "lock-manager", "state-manager"]
        for name in names:
            replies = self.ask(name, {"Action": "Info"})
            if not any(r.action == "Info-Response" for r in replies):
                raise CheckFailed(f"{name} did not answer Info")
        return "Info answered by all five processes"

    def health(self) -> str:
        for name in ("coordinator", "state-manager"):
            replies = self.ask(name, {"Action": "SystemHealth"})
            if not any(r.action == "SystemHealth-Response" for r in replies):
                raise CheckFailed(f"{name} did not answer SystemHealth")
        problems = check_invariants()
        if problems:
            raise CheckFailed("; ".join(problems[:3]))
        return "SystemHealth answered; invariants hold"

    def fund(self) -> str:
        for _ in range(3):
            self.expect(request_faucet(wallet=self.wallet, quantity=str(1_000 * UNIT)), Flow.COMPLETED)
        if self.balance("usda") != 3_000 * UNIT:
            raise CheckFailed(f"expected 3000 USDA from the faucet, have {self.balance('usda') / UNIT}")
        return "3000 USDA from the faucet"

    def v2_mint(self) -> str:
        self.expect(request_deposit(wallet=self.wallet, quantity=str(10 * UNIT), mode="deposit"), Flow.COMPLETED)
        if self.balance("tim3") != 10 * UNIT:
            raise CheckFailed(f"TIM3 balance {self.balance('tim3')} after depositing 10 USDA")
        return "deposit 10 USDA -> 10 TIM3"

    def v1_mint(self) -> str:
        self.expect(request_deposit(wallet=self.wallet, quantity=str(5 * UNIT), mode="lock"), Flow.COMPLETED)
        if self.balance("usda", locked=True) != 5 * UNIT or self.balance("tim3") != 15 * UNIT:
            raise CheckFailed("lock 5 USDA did not give 5 TIM3 with 5 USDA locked")
        return "lock 5 USDA -> 5 TIM3, 5 USDA locked"

    def v2_redeem(self) -> str:
        before = self.balance("usda")
        self.expect(request_redemption(wallet=self.wallet, quantity=str(4 * UNIT), mode="deposit"), Flow.COMPLETED)
        if self.balance("usda") != before + 4 * UNIT or self.balance("tim3") != 11 * UNIT:
            raise CheckFailed("redeem 4 TIM3 did not pay 4 USDA")
        return "redeem 4 TIM3 -> 4 USDA"

    def v1_redeem(self) -> str:
        self.expect(request_redemption(wallet=self.wallet, quantity=str(2 * UNIT), mode="lock"), Flow.COMPLETED)
        if self.balance("usda", locked=True) != 3 * UNIT or self.balance("tim3") != 9 * UNIT:
            raise CheckFailed("burn 2 TIM3 did not unlock 2 USDA")
        return "burn 2 TIM3 -> 2 USDA unlocked"

    def consistency(self) -> str:
        position = sum(Position.objects.filter(user=self.wallet).values_list("tim3", flat=True))
        if position != self.balance("tim3"):
            raise CheckFailed(f"position {position} != TIM3 balance {self.balance('tim3')}")
        problems = check_invariants()
        if problems:
            raise CheckFailed("; ".join(problems[:3]))
        return "positions == balances; supply backed by reserves"

    def errors(self) -> str:
        for bad in ("0", "-1", "1.5", "1e3", "05", ""):
            try:
                request_deposit(wallet=self.wallet, quantity=bad)
            except ActionError:
                continue
            raise CheckFailed(f"quantity {bad!r} was accepted")
        self.expect(request_deposit(wallet=self.wallet, quantity=str(200_000 * UNIT), mode="lock"), Flow.FAILED, "maximum")
        self.expect(request_redemption(wallet=self.wallet, quantity=str(500 * UNIT), mode="deposit"), Flow.FAILED)
        if self.balance("tim3") != 9 * UNIT:
            raise CheckFailed("a rejected request changed the TIM3 balance")
        return "0, -1, 1.5, 1e3, 05, empty, over limit, over balance: all refused, nothing moved"

    def circuit_breaker(self) -> str:
        self.expect(request_deposit(wallet=self.wallet, quantity=str(1_000 * UNIT), mode="lock"), Flow.COMPLETED)
        self.expect(request_deposit(wallet=self.wallet, quantity=str(1_000 * UNIT), mode="lock"), Flow.FAILED, "cooldown")
        self.expect(request_redemption(wallet=self.wallet, quantity=str(1_000 * UNIT), mode="lock"), Flow.COMPLETED)
        return "a 1000 TIM3 operation starts the large-operation cooldown"

    def pause(self) -> str:
        owner = operator_address()
        if pause_state()["mint"]:  # a real pause (or risk halt): the check's own resume would lift it
            raise CheckFailed("minting is already paused; the check leaves that pause alone and does not run")
        try:
            for flow in request_pause(wallet=owner, scope="mint", reason="integration suite pause check", role="admin"):
                self.expect(flow, Flow.COMPLETED)
            self.expect(request_deposit(wallet=self.wallet, quantity=str(2 * UNIT), mode="deposit"),
                        Flow.REFUNDED, "paused")
            self.expect(request_redemption(wallet=self.wallet, quantity=str(1 * UNIT), mode="deposit"), Flow.COMPLETED)
        finally:
            for flow in request_resume(wallet=owner, scope="mint"):
                self.expect(flow, Flow.COMPLETED)
        return "mint paused: deposit refunded, redeem still works; resumed"

    def performance(self) -> str:
        times = []
        for _ in range(5):
            started = time.monotonic()
            self.expect(request_deposit(wallet=self.wallet, quantity=str(1 * UNIT), mode="deposit"), Flow.COMPLETED)
            times.append((time.monotonic() - started) * 1000)
        return f"5 deposits: median {statistics.median(times):.0f} ms, max {max(times):.0f} ms (request to final hop)"

    def run(self) -> list[CheckResult]:
        Wallet.objects.get_or_create(address=self.wallet, defaults={"label": "integration-suite"})
        active_coordinator()  # fail fast on an unbootstrapped system
        for name, fn in [
            ("communication", self.communication), ("health", self.health), ("funding", self.fund),
            ("v2 mint", self.v2_mint), ("v1 mint", self.v1_mint), ("v2 redeem", self.v2_redeem),
            ("v1 redeem", self.v1_redeem), ("state consistency", self.consistency),
            ("error handling", self.errors), ("circuit breaker", self.circuit_breaker), ("pause", self.pause),
            ("performance", self.performance),
        ]:
            self.run_check(name, fn)
        return self.results


def format_table(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'check':<{width}}  result  {'ms':>6}  detail", "-" * (width + 60)]
    for r in results:
        lines.append(f"{r.name:<{width}}  {'PASS' if r.passed else 'FAIL':<6}  {r.ms:>6}  {r.detail}")
    failed = sum(not r.passed for r in results)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(lines)
