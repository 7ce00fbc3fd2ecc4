"""The doorbell pushed straight to Redis is the message Celery itself would send,
and a real worker drains the mailbox it rings."""

import base64
import json
import os

import pytest
import redis

from processes.doorbell import QUEUE, ring
from processes.runtime.delivery import send_message
from processes.runtime.models import Message
from processes.services import bootstrap_system
from processes.tasks import drain
from tests.scaled.stack import purge_broker, wait_until_idle

pytestmark = pytest.mark.django_db(transaction=True)

# Differ on every ring (fresh ids), or name the sending process.
PER_RING = {"id", "root_id", "correlation_id", "delivery_tag", "origin", "reply_to"}


def queued() -> list[dict]:
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    try:
        return [json.loads(raw) for raw in client.lrange(QUEUE, 0, -1)]
    finally:
        client.close()


def comparable(message: dict) -> dict:
    """The message with what differs per ring taken out and its body decoded."""
    return {
        "envelope": {k: v for k, v in message.items() if k not in {"headers", "properties", "body"}},
        "headers": {k: v for k, v in message["headers"].items() if k not in PER_RING},
        "properties": {k: v for k, v in message["properties"].items() if k not in PER_RING},
        "body": json.loads(base64.b64decode(message["body"])),
    }


def test_pushed_doorbell_is_the_message_celery_sends():
    purge_broker()
    try:
        drain.delay("process-a")
        ring(["process-a"])
        by_celery, ours = (comparable(m) for m in reversed(queued()))  # LPUSH: the newest first
    finally:
        purge_broker()
    assert ours == by_celery
    assert ours["body"][0] == ["process-a"] and ours["headers"]["task"] == "processes.tasks.drain"


def test_one_ring_enqueues_one_task_per_process():
    purge_broker()
    try:
        ring(["process-a", "process-b", "process-c"])
        messages = queued()
    finally:
        purge_broker()
    assert sorted(json.loads(base64.b64decode(m["body"]))[0][0] for m in messages) == [
        "process-a", "process-b", "process-c"]
    assert len({m["headers"]["id"] for m in messages}) == 3  # each its own task id


def test_a_real_worker_drains_what_the_pushed_doorbell_rings(scaled, settings):
    usda = bootstrap_system(environment="test")["usda"]
    settings.TIM3_DOORBELL = "none"  # queue it silently, then ring by hand below
    message = send_message(sender=usda.owner, target=usda.id, tags={"Action": "Balance"})
    settings.TIM3_DOORBELL = "celery"
    scaled.start_worker()
    ring([usda.id])
    wait_until_idle(timeout=30)
    message.refresh_from_db()
    assert message.status == Message.APPLIED
    reply = Message.objects.get(parent=message.msg_id)
    assert (reply.action, reply.target) == ("Balance-Response", usda.owner)
