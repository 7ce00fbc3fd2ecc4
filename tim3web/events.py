"""Hop events: settled messages go to the channel layer after commit.

Best effort: the database is how a client catches up (CONTRACT websocket).
In embedded mode the in-memory layer lives in Daphne's event loop, so events
from worker threads are handed to that loop thread-safely.
"""

import asyncio
import logging
import time

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings

from tim3web.serializers import message_to_dict

log = logging.getLogger(__name__)
ALL_HOPS = "hops"
_server_loop: asyncio.AbstractEventLoop | None = None
_send_lock: asyncio.Lock | None = None  # the server loop's: one publish's events at a time, in publish order


def flow_group(flow_id: str) -> str:
    return f"flow.{flow_id}"


def remember_server_loop(loop: asyncio.AbstractEventLoop) -> None:
    global _server_loop, _send_lock
    if loop is not _server_loop or _send_lock is None:
        _server_loop, _send_lock = loop, asyncio.Lock()


def hop_events(messages) -> list[tuple[str, dict]]:
    events = []
    committed_at = int(time.time() * 1000)  # called right after commit: what `bench` measures lag from
    for msg in messages:
        event = {"type": "hop", "flow": msg.pushed_for, "message": message_to_dict(msg), "committed_at": committed_at}
        events.append((ALL_HOPS, event))
        events.append((flow_group(msg.pushed_for), event))
    return events


async def _send_all(layer, events, lock: asyncio.Lock | None = None) -> None:
    if lock is None:
        for group, event in events:
            await layer.group_send(group, {"type": "tim3.event", "event": event})
        return
    # In-memory layer: each publish is its own task in the server loop, and group_send
    # yields, so without the lock a later publish (a flow's end) could overtake an
    # earlier one (its last hops). Tasks start in publish order; the lock is FIFO.
    async with lock:
        await _send_all(layer, events)


def publish(events: list[tuple[str, dict]]) -> None:
    layer = get_channel_layer()
    if layer is None or not events:
        return
    try:
        if settings.CHANNEL_LAYERS["default"]["BACKEND"].endswith("InMemoryChannelLayer"):
            loop, lock = _server_loop, _send_lock
            if loop is None or loop.is_closed():
                return  # no server in this process: nobody can be watching
            if _running_loop() is loop:
                loop.create_task(_send_all(layer, events, lock))
            else:
                asyncio.run_coroutine_threadsafe(_send_all(layer, events, lock), loop)
        else:
            async_to_sync(_send_all)(layer, events)
    except Exception:  # never let a watcher problem touch delivery
        log.exception("could not publish hop events")


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def publish_hops(sender, messages, **kwargs) -> None:
    publish(hop_events(messages))


def publish_flow_ends(sender, flows, **kwargs) -> None:
    events = []
    for flow in flows:
        event = {"type": "flow", "flow": flow.id, "status": flow.status, "error": flow.error or None}
        events += [(ALL_HOPS, event), (flow_group(flow.id), event)]
    publish(events)
