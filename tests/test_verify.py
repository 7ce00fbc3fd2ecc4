"""`manage.py verify`: invariants plus a replay of the message log, diffed with live state."""

import io

import pytest
from django.core.management import call_command
from django.db.models import F

from processes.blueprints.state import TokenAccount, TokenState
from processes.runtime.models import Message, Process
from processes.runtime.quantities import UNIT
from tests.conftest import send


def verify(*args) -> tuple[int, str]:
    """Run the command: (exit code, output)."""
    out = io.StringIO()
    try:
        call_command("verify", *args, stdout=out)
    except SystemExit as exc:
        return exc.code, out.getvalue()
    return 0, out.getvalue()


@pytest.fixture
def busy(system, wallet):
    """A bootstrapped system after faucet mints, transfers, a failure and an inbox message."""
    usda = system["usda"]
    alice, bob, carol = wallet(), wallet(), wallet()
    for who, amount in ((alice, 1000), (bob, 300), (alice, 25)):
        assert send(who, usda, {"Action": "Mint", "Quantity": str(amount * UNIT)}).status == Message.APPLIED
    assert send(alice, usda, {"Action": "Transfer", "Recipient": bob, "Quantity": str(125 * UNIT)}).status == Message.APPLIED
    assert send(bob, usda, {"Action": "Transfer", "Recipient": carol, "Quantity": "1"}).status == Message.APPLIED
    assert send(carol, usda, {"Action": "Transfer", "Recipient": alice, "Quantity": "2"}).status == Message.FAILED
    inbox = send(carol, usda, {"Action": "Wave"})
    assert send(alice, usda, {"Action": "Transfer", "Recipient": carol, "Quantity": "10"}).status == Message.APPLIED
    return {"usda": usda, "tim3": system["tim3"], "alice": alice, "bob": bob, "carol": carol, "inbox": inbox}


def test_verify_is_clean_after_mints_and_transfers(busy):
    code, out = verify()
    assert code == 0, out
    assert out.strip().endswith("verify: clean")
    assert "INVARIANT" not in out and "REPLAY" not in out
    processes = Process.objects.values_list("id", flat=True)
    replayed = Message.objects.exclude(status=Message.PENDING).filter(target__in=list(processes)).count()
    assert f"replayed {replayed} messages of {len(processes)} processes" in out


def test_verify_is_clean_on_a_fresh_bootstrap(system):
    code, out = verify()
    assert (code, out.strip().splitlines()[-1]) == (0, "verify: clean")


def test_corrupted_balance_fails_verify_naming_process_and_account(busy):
    bob = busy["bob"]
    TokenAccount.objects.filter(process=busy["usda"], account=bob).update(balance=F("balance") + 1)
    code, out = verify()
    assert code == 1
    assert "verify: clean" not in out
    assert "INVARIANT  usda: total supply" in out  # supply no longer equals the balances
    replay_lines = [line for line in out.splitlines() if line.startswith("REPLAY")]
    assert any("usda" in line and bob in line and "TokenAccount" in line for line in replay_lines), out
    assert "problem(s)" in out.splitlines()[-1]


def test_balance_corruption_is_found_by_replay_even_when_the_sum_still_matches(busy):
    usda, alice, bob = busy["usda"], busy["alice"], busy["bob"]
    TokenAccount.objects.filter(process=usda, account=alice).update(balance=F("balance") - 7)
    TokenAccount.objects.filter(process=usda, account=bob).update(balance=F("balance") + 7)
    assert verify("--no-replay")[0] == 0  # the invariants alone cannot see it ...
    code, out = verify()  # ... the replay can
    assert code == 1
    assert alice in out and bob in out


def test_corrupted_total_supply_fails_verify(busy):
    TokenState.objects.filter(process=busy["usda"]).update(total_supply=F("total_supply") + 1_000_000)
    code, out = verify()
    assert code == 1
    assert "INVARIANT  usda: total supply" in out
    assert any(line.startswith("REPLAY") and "usda" in line and "TokenState" in line for line in out.splitlines()), out


def test_deleted_message_leaves_a_slot_gap_that_verify_reports(busy):
    usda, inbox = busy["usda"], busy["inbox"]
    assert Message.objects.filter(target=usda.id, slot__gt=inbox.slot).exists()  # a gap, not the end
    Message.objects.filter(pk=inbox.pk).delete()
    code, out = verify()
    assert code == 1
    assert f"REPLAY     usda: slot {inbox.slot} is missing (next is {inbox.slot + 1})" in out
    assert "INVARIANT  usda: slots are not gap-free" in out
    assert "tim3" not in out.replace("replayed", "")  # only the damaged process is named


def test_tampered_message_log_fails_verify(busy):
    usda, alice = busy["usda"], busy["alice"]
    transfer = Message.objects.filter(target=usda.id, sender=alice, action="Transfer", status=Message.APPLIED).first()
    tags = [[k, "11" if k == "Quantity" else v] for k, v in transfer.tags]
    Message.objects.filter(pk=transfer.pk).update(tags=tags)
    code, out = verify()
    assert code == 1
    assert f"usda slot {transfer.slot} (Transfer {transfer.msg_id})" in out
