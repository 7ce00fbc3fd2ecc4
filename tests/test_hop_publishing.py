"""Hop publishing (tim3web.events) off the drain's path: a drain's events are one
channel-layer message, sent by a background thread, in order; a layer that is
slow, hanging or down costs the drain nothing and is logged once per outage.

The layer is a recording stand-in (the scaled publisher's code path: any layer
but the in-memory one) except in the last test, which points the real Redis
layer at a port where nothing listens.
"""

import asyncio
import copy
import logging
import os
import threading
import time

import pytest
from channels.layers import BaseChannelLayer, channel_layers

from processes import actions
from processes.flows import Flow
from processes.runtime.delivery import run_until_idle
from processes.runtime.models import Message
from processes.runtime.quantities import UNIT
from processes.runtime.signals import messages_settled
from tim3web import events

FLOW = "F" * 43
OTHER = "G" * 43


class RecordingLayer(BaseChannelLayer):
    """Records each group_send; `gate` cleared holds sends, `down` makes them fail like a lost Redis."""

    extensions = ["groups"]

    def __init__(self):
        super().__init__()
        self.sent: list[tuple[str, dict]] = []
        self.started = threading.Event()  # a send began (it may be held at the gate)
        self.gate = threading.Event()
        self.gate.set()
        self.down = False
        self.failures = 0

    async def group_send(self, group, message):
        self.started.set()
        while not self.gate.is_set():
            await asyncio.sleep(0.005)
        if self.down:
            self.failures += 1
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        self.sent.append((group, copy.deepcopy(message)))

    def events(self) -> list[dict]:
        return [event for _, message in self.sent for event in message["events"]]


@pytest.fixture
def layer(monkeypatch):
    fake = RecordingLayer()
    monkeypatch.setitem(channel_layers.backends, "default", fake)
    monkeypatch.setattr(events, "_background", None)  # this test's publisher thread starts on first publish
    yield fake
    fake.gate.set()
    fake.down = False


def message(n: int, flow: str = FLOW) -> Message:
    """An unsaved settled message: what `messages_settled` carries after a drain commits."""
    return Message(msg_id=f"{n:0>43}", sender="S" * 43, target="T" * 43, action="Transfer",
                   tags=[["Action", "Transfer"], ["Quantity", str(n)]], timestamp=n, slot=n, reference=n,
                   pushed_for=flow, status=Message.APPLIED)


def ids(got: list[dict]) -> list[str]:
    return [e["message"]["id"] if e["type"] == "hop" else f"end {e['flow']}" for e in got]


def test_a_drains_settled_messages_are_one_group_send(layer):
    messages = [message(n) for n in range(30)]
    before = int(time.time() * 1000)
    events.publish_hops(Message, messages=messages)
    assert events.flush(5)

    assert len(layer.sent) == 1, "one channel-layer message per drain, not one per event and stream"
    group, sent = layer.sent[0]
    assert group == events.ALL_HOPS and sent["type"] == "tim3.events"
    assert ids(sent["events"]) == [m.msg_id for m in messages]
    for event, msg in zip(sent["events"], messages, strict=True):
        assert set(event) == {"type", "flow", "message", "committed_at"}
        assert (event["type"], event["flow"], event["message"]["slot"]) == ("hop", FLOW, msg.slot)
        assert before <= event["committed_at"] <= int(time.time() * 1000)


def test_a_large_batch_goes_in_chunks_in_order(layer):
    messages = [message(n) for n in range(250)]
    events.publish_hops(Message, messages=messages)
    assert events.flush(5)
    assert [len(m["events"]) for _, m in layer.sent] == [events.CHUNK, events.CHUNK, 50]
    assert ids(layer.events()) == [m.msg_id for m in messages]


def test_what_queues_during_a_send_goes_out_together_hops_before_the_flow_end(layer):
    layer.gate.clear()  # the first send is slow
    events.publish_hops(Message, messages=[message(0)])
    assert layer.started.wait(5)
    later = [message(n, flow) for n, flow in ((1, FLOW), (2, OTHER), (3, FLOW))]
    for msg in later:  # three more drains settle while the first send is on its way
        events.publish_hops(Message, messages=[msg])
    events.publish_flow_ends(Flow, flows=[Flow(id=FLOW, status=Flow.COMPLETED)])
    layer.gate.set()
    assert events.flush(5)

    assert [len(m["events"]) for _, m in layer.sent] == [1, 4], "the queued drains were coalesced"
    assert ids(layer.events()) == ["0" * 43, *[m.msg_id for m in later], f"end {FLOW}"]
    assert layer.events()[-1] == {"type": "flow", "flow": FLOW, "status": "completed", "error": None}


def test_publishing_returns_at_once_while_the_layer_hangs(layer, monkeypatch):
    monkeypatch.setattr(events, "SEND_TIMEOUT", 0.2)
    layer.gate.clear()  # every send hangs until it times out
    events.publish_hops(Message, messages=[message(0)])
    assert layer.started.wait(5)
    began = time.monotonic()
    for n in range(1, 501):
        events.publish_hops(Message, messages=[message(n)])
    assert time.monotonic() - began < 0.5, "a drain waited for the channel layer"
    assert not events.flush(0.05)  # still held: the drains did not wait for it


def test_a_layer_that_is_down_is_logged_once_and_its_events_dropped_until_it_is_back(layer, monkeypatch, caplog):
    monkeypatch.setattr(events, "RETRY_AFTER", 0.05)
    caplog.set_level(logging.WARNING, logger="tim3web.events")
    layer.down = True
    for n in range(20):
        events.publish_hops(Message, messages=[message(n)])  # never raises into delivery
        time.sleep(0.01)
    assert events.flush(5)
    assert layer.failures >= 2 and layer.sent == []
    warnings = [r for r in caplog.records if r.name == "tim3web.events"]
    assert len(warnings) == 1 and "dropping hop events" in warnings[0].getMessage()
    assert warnings[0].exc_info is None, "one line per outage, not a traceback per event"

    layer.down = False
    events.publish_hops(Message, messages=[message(99)])
    assert events.flush(5)
    assert ids(layer.events()) == ["0" * 41 + "99"]
    back = [r.getMessage() for r in caplog.records if r.name == "tim3web.events"][1:]
    assert len(back) == 1 and "flowing again" in back[0]


def test_a_forked_process_starts_its_own_publisher(layer, monkeypatch):
    events.publish_hops(Message, messages=[message(0)])
    parent = events._background
    assert parent is not None
    monkeypatch.setattr(parent, "pid", parent.pid - 1)  # what a child sees: the publisher's thread is not here
    events.publish_hops(Message, messages=[message(1)])
    assert events._background is not parent and events._background.pid == os.getpid()
    assert parent in events._forked_away  # never closed in the child: its sockets are the parent's
    assert events.flush(5)
    assert "0" * 42 + "1" in ids(layer.events())


# --- the real drain -----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_each_drain_of_a_flow_is_at_most_one_group_send(system, wallet, layer):
    drains = []
    messages_settled.connect(lambda sender, messages, **kw: drains.append(len(messages)), weak=False,
                             dispatch_uid="count-drains")
    try:
        flow = actions.request_faucet(wallet=wallet(), quantity=str(5 * UNIT))
        run_until_idle()
    finally:
        messages_settled.disconnect(dispatch_uid="count-drains")
    assert events.flush(5)
    flow.refresh_from_db()
    assert flow.status == Flow.COMPLETED
    settled = list(Message.objects.filter(pushed_for=flow.id).exclude(status=Message.PENDING).order_by("seq"))
    got = layer.events()
    assert sorted(ids(got)[:-1]) == sorted(m.msg_id for m in settled) and got[-1]["type"] == "flow"
    assert 1 <= len(layer.sent) <= len(drains), (len(layer.sent), drains)


@pytest.mark.django_db(transaction=True)
def test_a_flow_settles_with_redis_unreachable_and_one_warning(system, wallet, settings, monkeypatch, caplog):
    # The real Redis layer, on a port where nothing listens: every connection is refused.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]}}}
    monkeypatch.setattr(events, "_background", None)
    caplog.set_level(logging.WARNING, logger="tim3web.events")
    calls: list[float] = []
    publish = events.publish

    def timed(batch):
        began = time.perf_counter()
        publish(batch)
        calls.append(time.perf_counter() - began)

    monkeypatch.setattr(events, "publish", timed)
    events._publisher()  # the thread is up: what is timed below is a drain's hand-off, not the start

    flows = []
    for _ in range(3):
        flows.append(actions.request_faucet(wallet=wallet(), quantity=str(5 * UNIT)))
        run_until_idle()
    assert all(Flow.objects.get(pk=f.id).status == Flow.COMPLETED for f in flows)
    deadline = time.monotonic() + 10
    while not caplog.records and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(calls) >= 6 and max(calls) < 0.1, f"slowest publish took {max(calls) * 1000:.1f} ms"
    warnings = [r for r in caplog.records if r.name == "tim3web.events"]
    assert len(warnings) == 1 and "dropping hop events" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
