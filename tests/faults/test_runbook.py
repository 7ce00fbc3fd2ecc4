"""docs/operations.md, step by step: every command of the recovery runbook run
on a small real scenario (Postgres, Redis, a real `celery worker` when a step
needs one), with the output the runbook tells the operator to look for."""

import json
import signal
import time
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import DataError

from processes import tasks
from processes.actions import request_deposit, request_faucet, request_redemption
from processes.blueprints.state import CoordinatorState, Operation
from processes.flows import Flow
from processes.runtime.delivery import drain_mailbox
from processes.runtime.ids import new_id
from processes.runtime.models import Message
from processes.runtime.quantities import UNIT
from processes.services import bootstrap_system
from tests.scaled.stack import pending_count, purge_broker, wait_until_idle

pytestmark = [pytest.mark.scaled, pytest.mark.django_db(transaction=True)]


def run(*args) -> str:
    """A manage.py command, as the operator types it; its output. Exit 1 fails the test."""
    out = StringIO()
    try:
        call_command(*args, stdout=out)
    except SystemExit as exc:
        pytest.fail(f"manage.py {' '.join(args)} exited {exc.code}:\n{out.getvalue()}")
    print(f"$ manage.py {' '.join(args)}\n{out.getvalue()}")  # shown with -s: the runbook's examples
    return out.getvalue()


def wait_flow(flow: Flow, status: str, *, timeout: float = 60.0) -> Flow:
    deadline = time.monotonic() + timeout
    while True:
        flow.refresh_from_db()
        if flow.status != Flow.PENDING:
            assert flow.status == status, (flow.kind, flow.status, flow.error)
            return flow
        assert time.monotonic() < deadline, f"{flow.kind} flow still pending after {timeout}s"
        time.sleep(0.1)


def section(output: str, title: str) -> str:
    """The lines of one section of `mailbox`'s output."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return "\n".join(lines[start:end])


def test_runbook_commands_on_a_real_scenario(runbook_stack, settings, monkeypatch):
    stack = runbook_stack
    procs = bootstrap_system(environment="test")
    user = new_id()

    # 1. Find stuck messages: no worker runs; a faucet and a deposit wait, the deposit half-way.
    faucet = request_faucet(wallet=user, quantity=str(100 * UNIT))
    drain_mailbox(process_id=procs["usda"].id)
    deposit = request_deposit(wallet=user, quantity=str(10 * UNIT))
    drain_mailbox(process_id=procs["usda"].id)  # the USDA transfer is applied ...
    drain_mailbox(process_id=procs["coordinator"].id)  # ... the coordinator asked TIM3 to mint, nobody answers
    out = run("mailbox")
    pending = section(out, "pending messages:")
    assert "tim3" in pending and "oldest" in pending, out
    ops = section(out, "pending operations:")
    assert deposit.id in ops and "deposit" in ops and "step minting" in ops, out
    assert section(out, "dead letters:") == "dead letters: none", out

    # 2. Re-drive: the doorbells were lost (broker emptied); a worker alone does nothing ...
    purge_broker()
    worker = stack.start_worker()
    time.sleep(1.0)
    assert pending_count() > 0, "nothing rang, so nothing may have been applied"
    # ... until `redrive` rings every process that has pending messages.
    out = run("redrive")
    assert "rang 1 doorbell(s)" in out, out  # tim3, where the deposit's Mint waits
    wait_until_idle(stack, timeout=60)
    wait_flow(faucet, Flow.COMPLETED)
    wait_flow(deposit, Flow.COMPLETED)
    assert "pending messages: none" in run("mailbox")

    # 2b. `redrive --drain`: no worker at all; apply everything in the operator's own process.
    stack.kill(worker, signal.SIGTERM)
    settings.TIM3_DOORBELL = "none"  # nobody would hear it anyway
    redeem = request_redemption(wallet=user, quantity=str(4 * UNIT))
    assert "coordinator" in section(run("mailbox"), "pending messages:")
    out = run("redrive", "--drain")
    assert "applied" in out and "still pending: 0 process(es)" in out, out
    wait_flow(redeem, Flow.COMPLETED, timeout=5)

    # 3. A dead letter: a message whose drain keeps failing outside any handler (here a
    # database error that repeats on every try) is given up after TIM3_MAX_ATTEMPTS; its
    # sender gets <Action>-Error, and `mailbox` lists it with the error.
    poisoned = request_deposit(wallet=user, quantity=str(3 * UNIT))

    def broken_drain(**kwargs):
        raise DataError("value too long for type character varying(43)")

    monkeypatch.setattr(tasks, "drain_mailbox", broken_drain)
    for _ in range(settings.TIM3_MAX_ATTEMPTS):
        with pytest.raises(DataError):
            tasks.drain(procs["usda"].id)  # what a worker runs; here `retry` re-raises
    monkeypatch.undo()
    dead = section(run("mailbox"), "dead letters:")
    assert poisoned.id in dead and "Dead-lettered after" in dead and "DataError" in dead, dead
    run("redrive", "--drain")
    wait_flow(poisoned, Flow.FAILED, timeout=5)  # no USDA moved: the user keeps it

    # 4. Pause minting, then resume (worker running again).
    settings.TIM3_DOORBELL = "celery"
    stack.start_worker()
    out = run("pause", "--scope", "mint", "--reason", "runbook drill")
    assert "pause (mint) sent to 1 coordinator(s)" in out, out
    wait_until_idle(stack, timeout=60)
    state = CoordinatorState.objects.get(process=procs["coordinator"])
    assert state.paused_mint and not state.paused_redeem and state.pause_reason == "runbook drill"
    out = run("send", "coordinator", "Info", "--wait", "--timeout", "60")  # what the coordinator itself says
    assert "Paused-Mint=true" in out and "Paused-Redeem=false" in out, out
    refused = request_deposit(wallet=user, quantity=str(5 * UNIT))
    assert "Minting is paused: runbook drill" in wait_flow(refused, Flow.REFUNDED).error
    wait_flow(request_redemption(wallet=user, quantity=str(1 * UNIT)), Flow.COMPLETED)  # redeeming still works
    out = run("resume", "--scope", "mint")
    assert "resume (mint) sent to 1 coordinator(s)" in out, out
    wait_until_idle(stack, timeout=60)
    assert "Paused-Mint=false" in run("send", "coordinator", "Info", "--wait", "--timeout", "60")
    wait_flow(request_deposit(wallet=user, quantity=str(5 * UNIT)), Flow.COMPLETED)

    # 5. Prove reserves, and the whole log.
    wait_until_idle(stack, timeout=60)
    out = run("reserves")
    assert "reserves: OK" in out and "in flight        0 operations, 0 messages" in out, out
    figures = json.loads(run("reserves", "--json"))
    assert figures["problems"] == [] and figures["tim3_supply"] == figures["usda_reserves"] == 10 * UNIT, figures
    out = run("verify")
    assert "verify: clean" in out, out

    # 6. Roll a coordinator back: v2 spawned beside v1, made active, takes a deposit;
    # rolled back, v1 is active again and v2 keeps answering (its TIM3 stays redeemable).
    out = run("coordinator", "spawn")
    assert "spawned coordinator-v2" in out, out
    out = run("coordinator", "activate", "coordinator-v2")
    assert "active: coordinator-v2" in out, out
    on_v2 = wait_flow(request_deposit(wallet=user, quantity=str(20 * UNIT)), Flow.COMPLETED)
    v2 = Operation.objects.get(flow_id=on_v2.id).process
    assert v2.name == "coordinator-v2"
    out = run("coordinator", "rollback")
    assert "rolled back; active: coordinator" in out and "* v1" in out, out
    wait_flow(request_redemption(wallet=user, quantity=str(15 * UNIT)), Flow.COMPLETED)  # paid by v2
    assert Operation.objects.filter(process=v2, kind=Operation.REDEEM, status=Operation.COMPLETED).exists()
    wait_until_idle(stack, timeout=60)
    assert "reserves: OK" in run("reserves")
    assert "verify: clean" in run("verify")
    assert not Message.objects.filter(status=Message.PENDING).exists()
