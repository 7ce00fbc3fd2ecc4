"""A database error inside a handler that is about the database, not the message
(a lock or statement timeout, a deadlock victim, a cancelled statement, a lost
connection) must leave the message pending for a retry. Recorded as the
message's failure it would refuse a payment the user could make, and replay
(which meets no such error) would disagree with the log for ever.

On the real stack: a `celery worker` whose Postgres session has
lock_timeout=200ms, and a row lock held by the test on the payer's USDA
account while the worker applies the payer's transfer."""

import threading
import time

import pytest
from django.db import connections, transaction

from processes.blueprints.state import TokenAccount
from processes.runtime.delivery import send_message
from processes.runtime.ids import new_id
from processes.runtime.models import Message
from processes.runtime.quantities import UNIT
from processes.services import bootstrap_system
from tests.scaled.stack import verify_clean, wait_until_idle

pytestmark = [pytest.mark.scaled, pytest.mark.django_db(transaction=True)]


def hold_row_lock(pk: int, *, seconds: float, locked: threading.Event) -> None:
    try:
        with transaction.atomic():
            TokenAccount.objects.select_for_update().get(pk=pk)
            locked.set()
            time.sleep(seconds)
    finally:
        connections.close_all()


def test_lock_timeout_inside_a_handler_is_retried_not_recorded_as_the_messages_failure(runbook_stack):
    stack = runbook_stack
    stack.start_worker(PGOPTIONS="-c lock_timeout=200")
    usda = bootstrap_system(environment="test")["usda"]
    payer, payee = new_id(), new_id()
    send_message(sender=payer, target=usda.id, tags={"Action": "Mint", "Quantity": str(100 * UNIT)})
    wait_until_idle(stack, timeout=60)
    account = TokenAccount.objects.get(process=usda, account=payer)

    locked = threading.Event()
    holder = threading.Thread(target=hold_row_lock, args=(account.pk,), kwargs={"seconds": 2.0, "locked": locked})
    holder.start()
    assert locked.wait(10)
    transfer = send_message(sender=payer, target=usda.id,
                            tags={"Action": "Transfer", "Recipient": payee, "Quantity": str(7 * UNIT)})
    holder.join()
    wait_until_idle(stack, timeout=60)

    transfer.refresh_from_db()
    assert (transfer.status, transfer.error) == (Message.APPLIED, ""), transfer.error
    balances = dict(TokenAccount.objects.filter(process=usda).values_list("account", "balance"))
    assert balances == {payer: 93 * UNIT, payee: 7 * UNIT}
    verify_clean()
