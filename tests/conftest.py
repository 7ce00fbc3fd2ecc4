"""Shared fixtures. Unit tests drive delivery in-process with `run_until_idle`
(the same drain the Celery workers run); scaled tests start real workers."""

import pytest

from processes.runtime.delivery import run_until_idle, send_message
from processes.runtime.ids import new_id
from processes.services import bootstrap_system, operator_address


@pytest.fixture(autouse=True)
def _no_doorbell(settings):
    # Unit tests deliver by calling the drain themselves; scaled tests turn the doorbell on.
    settings.TIM3_DOORBELL = "none"


@pytest.fixture
def system(db):
    """The bootstrapped processes, by name."""
    return bootstrap_system(environment="test")


@pytest.fixture
def operator(system):
    return operator_address()


@pytest.fixture
def wallet():
    """A factory of fresh wallet addresses."""
    return new_id


def deliver() -> int:
    return run_until_idle()


def send(sender, process, tags, data=""):
    """Send from a wallet and deliver the whole cascade; return the root message."""
    msg = send_message(sender=sender, target=process.id, tags=tags, data=data)
    run_until_idle()
    msg.refresh_from_db()
    return msg
