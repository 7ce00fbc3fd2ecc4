"""The web process's request threads (tim3web.asgi.RequestThreads) through the real ASGI application.

Each request's sync code runs in one thread that no other request uses at the same
time; a finished request's thread serves the next one instead of a new thread being
started and joined per request.
"""

import asyncio
import threading

import pytest
from channels.testing import HttpCommunicator
from django.core.signals import request_started
from django.db import connections

from tim3web.asgi import application, django_asgi_app

pytestmark = pytest.mark.django_db(transaction=True)


async def get(path: str) -> int:
    communicator = HttpCommunicator(application, "GET", path, headers=[(b"host", b"127.0.0.1")])
    response = await communicator.get_response(timeout=10)
    await communicator.wait(timeout=10)  # the request has ended: its thread is given back
    return response["status"]


@pytest.fixture(autouse=True)
def _close_request_thread_connections():
    yield
    # A request thread keeps its Django connection objects: close them so nothing holds the test database.
    for executor in django_asgi_app.threads.idle:
        executor.submit(connections.close_all).result(timeout=10)


@pytest.fixture
def request_thread_ids():
    seen: list[int] = []

    def record(**kwargs) -> None:
        seen.append(threading.get_ident())

    request_started.connect(record, dispatch_uid="test-request-threads")
    yield seen
    request_started.disconnect(dispatch_uid="test-request-threads")


async def test_requests_one_after_another_reuse_one_thread(request_thread_ids):
    assert [await get("/api/health") for _ in range(3)] == [200, 200, 200]
    assert len(request_thread_ids) == 3
    assert len(set(request_thread_ids)) == 1
    assert request_thread_ids[0] != threading.get_ident()  # not the event loop's thread
    assert len(django_asgi_app.threads.idle) >= 1


async def test_requests_in_flight_together_never_share_a_thread(request_thread_ids):
    # Both requests must be inside their sync code at once to pass the barrier: if they
    # shared a thread, the first would wait there forever and the barrier would break.
    both_inside = threading.Barrier(2, timeout=5)

    def meet(**kwargs) -> None:
        both_inside.wait()

    request_started.connect(meet, dispatch_uid="test-request-threads-meet")
    try:
        statuses = await asyncio.gather(get("/api/health"), get("/api/health"))
    finally:
        request_started.disconnect(dispatch_uid="test-request-threads-meet")
    assert statuses == [200, 200]
    assert len(set(request_thread_ids)) == 2
    # Both threads are kept for later requests.
    assert len(django_asgi_app.threads.idle) >= 2
