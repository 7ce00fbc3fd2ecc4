"""Ringing a doorbell: enqueue the Celery task `drain(process_id)`.

With a Redis broker the message is built here and pushed with one `LPUSH`,
the way kombu's Redis transport delivers it. `drain.delay` produces the very
same message but costs ~1.3 ms of CPU in a web request (Celery builds a
result backend per thread — and under ASGI every request is a new thread —
then assembles the message and goes through kombu's producer): a fifth of
what the web process spent per deposit. The message differs from one ring to
the next only in its task id and process id. tests/test_doorbell.py compares
it with the one Celery builds, so a Celery or kombu upgrade that changes the
format fails a test, and tests/scaled has real workers drain what it pushes.

Any other broker (memory:// in embedded mode and unit tests) goes through
Celery. A failed ring is logged and left to the sweeper, as before: the
message itself is safe in the database.
"""

import base64
import json
import os
import socket
import threading
import uuid

import redis

DRAIN_TASK = "processes.tasks.drain"
QUEUE = "celery"  # Celery's default queue; this app routes nothing elsewhere

_clients_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}  # by broker URL; each holds a thread-safe connection pool
_origin = f"{os.getpid()}@{socket.gethostname()}"


def broker_url() -> str:
    from tim3web.celery import app  # the app's URL, which tests may point at another broker

    return app.conf.broker_url


def _redis(url: str) -> redis.Redis:
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = redis.Redis.from_url(url)
        return client


def drain_message(process_id: str) -> str:
    """The broker message Celery would send for `drain.delay(process_id)` (task protocol 2, JSON)."""
    task_id = str(uuid.uuid4())
    body = json.dumps([[process_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": DRAIN_TASK, "id": task_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
            "root_id": task_id, "parent_id": None, "argsrepr": repr((process_id,)), "kwargsrepr": "{}",
            "origin": _origin, "ignore_result": True, "replaced_task_nesting": 0,
            "stamped_headers": None, "stamps": {},
        },
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": QUEUE}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    })


def ring(process_ids: list[str]) -> None:
    """Enqueue one drain task per process (raises if the broker cannot be reached)."""
    if not process_ids:
        return
    url = broker_url()
    if url.startswith(("redis://", "rediss://")):
        _redis(url).lpush(QUEUE, *[drain_message(p) for p in process_ids])
        return
    from processes.tasks import drain

    for process_id in process_ids:
        drain.delay(process_id)
