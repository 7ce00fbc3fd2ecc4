"""The web process's request threads (tim3web.asgi.RequestThreads) through the real ASGI application.

Each request's sync code runs in one thread that no other request uses at the same
time; a finished request's thread serves the next one instead of a new thread being
started and joined per request.
"""

import asyncio
import threading

import pytest
from channels.testing import ApplicationCommunicator, HttpCommunicator
from django.conf import settings
from django.core.signals import request_finished, request_started
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


async def test_a_request_switches_to_its_thread_once(monkeypatch):
    # request_started, the view and request_finished run in one hand-off to the request's
    # thread (Django's own handler made three: ~10 % of Daphne's CPU under load).
    submitted = []
    take = django_asgi_app.threads.take

    def counting_take():
        executor = take()
        submit = executor.submit
        monkeypatch.setattr(executor, "submit", lambda fn, *a, **kw: submitted.append(fn) or submit(fn, *a, **kw))
        return executor

    monkeypatch.setattr(django_asgi_app.threads, "take", counting_take)
    finished_in = []
    request_finished.connect(lambda **kw: finished_in.append(threading.get_ident()), dispatch_uid="t-finished",
                            weak=False)
    try:
        assert await get("/api/health") == 200
    finally:
        request_finished.disconnect(dispatch_uid="t-finished")
    assert len(submitted) == 1
    assert len(finished_in) == 1 and finished_in[0] != threading.get_ident()  # in the request's thread


async def test_a_streamed_static_file_is_whole_and_closed_after_it_was_sent():
    # WhiteNoise streams files: such a response is closed (request_finished) only once it was sent.
    events = []
    request_finished.connect(lambda **kw: events.append("finished"), dispatch_uid="t-static", weak=False)
    try:
        communicator = ApplicationCommunicator(application, {
            "type": "http", "http_version": "1.1", "method": "GET", "path": "/static/css/app.css",
            "raw_path": b"/static/css/app.css", "query_string": b"", "headers": [(b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)})
        await communicator.send_input({"type": "http.request", "body": b""})
        start = await communicator.receive_output(timeout=10)
        body = b""
        while True:
            part = await communicator.receive_output(timeout=10)
            if part.get("body"):
                events.append("sent")
            body += part.get("body", b"")
            if not part.get("more_body"):
                break
        await communicator.wait(timeout=10)
    finally:
        request_finished.disconnect(dispatch_uid="t-static")
    assert start["status"] == 200
    assert body == (settings.BASE_DIR / "static" / "css" / "app.css").read_bytes()
    assert events[-1] == "finished" and events.count("finished") == 1 and "sent" in events
