"""Hop events: settled messages go to the channel layer after commit, off the drain's path.

Best effort: the database is how a client catches up (CONTRACT websocket), so
publishing never raises into delivery and drops events while the layer is down.

Every event goes to one group, ALL_HOPS, batched: a message on the layer is
`{"type": "tim3.events", "events": [event, ...]}`. Each web process has one
receiver in that group (tim3web.fanout.Hub) that hands each event to the
process's sockets, per-flow ones included, so the order a flow's events were
published in is the order every socket sees them.

A drain used to spend ~2 ms publishing (a fresh event loop and Redis connection
per call, a group_send per event and per stream) before it could drain the
next process. Now `publish` only queues the events for this process's
Publisher: a coroutine that sends whatever is queued, in order, in as few
group_sends as it can. Scaled mode runs it in a daemon thread with its own
long-lived loop (and so its own Redis connections). Embedded mode runs it in
Daphne's loop, where the in-memory layer lives.
"""

import asyncio
import atexit
import logging
import os
import threading
import time
from collections.abc import Iterable

from channels.layers import BaseChannelLayer, InMemoryChannelLayer, get_channel_layer

from processes.flows import Flow
from processes.runtime.models import Message
from tim3web.serializers import message_to_dict

log = logging.getLogger(__name__)
ALL_HOPS = "hops"
BATCH_TYPE = "tim3.events"
CHUNK = 100  # events per group_send: a few tens of kB, well inside a Redis message
MAX_PENDING = 20_000  # events queued while sends are slow or failing; beyond this new ones are dropped
SEND_TIMEOUT = 5.0  # seconds: an unreachable broker must not hold the queue forever
RETRY_AFTER = 1.0  # seconds to wait after a failed send before trying again


class Publisher:
    """Sends queued events to ALL_HOPS from one coroutine (`run`) in `loop`, in queue order.

    `put` is called from any thread and only appends to a list: the caller never
    waits for the layer. One coroutine sending is what keeps the order (a flow's
    end after its last hop) without locks on the async side.
    """

    def __init__(self, layer: BaseChannelLayer, loop: asyncio.AbstractEventLoop):
        self.layer, self.loop = layer, loop
        self.pid = os.getpid()
        self._lock = threading.Lock()  # guards _pending between the publishing threads and `run`
        self._pending: list[dict] = []
        self._wake = asyncio.Event()  # only touched in `loop`
        self._idle = threading.Event()  # nothing queued or being sent (flush waits on it)
        self._idle.set()
        self._failing = False  # in an outage: logged once when it starts and once when it ends
        self._dropped = 0
        self.task: asyncio.Task | None = None  # set when `run` is a task in a running loop (embedded)

    def put(self, events: list[dict]) -> None:
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self._lost(len(events), "too many hop events queued")
                return
            wake = not self._pending  # else a wake-up is already on its way to `run`
            self._pending.extend(events)
            self._idle.clear()
        if wake:
            self.loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()  # before taking: whatever is put after the take wakes us again
            with self._lock:
                batch, self._pending = self._pending, []
            if batch:
                await self._send(batch)
            with self._lock:
                if not self._pending:
                    self._idle.set()

    async def _send(self, batch: list[dict]) -> None:
        for start in range(0, len(batch), CHUNK):
            message = {"type": BATCH_TYPE, "events": batch[start:start + CHUNK]}
            try:
                await asyncio.wait_for(self.layer.group_send(ALL_HOPS, message), SEND_TIMEOUT)
            except Exception as exc:  # broker down or unreachable: drop, the database has it all
                with self._lock:
                    self._lost(len(batch) - start, f"the channel layer failed ({type(exc).__name__}: {exc})")
                await asyncio.sleep(RETRY_AFTER)  # not a connection attempt per event while it is down
                return
        if self._failing:
            with self._lock:
                log.warning("hop events are flowing again; %d were dropped (clients catch up over the API)",
                            self._dropped)
                self._failing, self._dropped = False, 0

    def _lost(self, count: int, why: str) -> None:
        """Count dropped events; log the first of an outage only (called under _lock)."""
        if not self._failing:
            log.warning("dropping hop events until the channel layer takes them again: %s", why)
        self._failing = True
        self._dropped += count

    def flush(self, timeout: float) -> bool:
        """Wait (from another thread than `loop`'s) until everything queued was sent or dropped."""
        return self._idle.wait(timeout)


def start_thread(layer: BaseChannelLayer) -> Publisher:
    """A Publisher in a daemon thread with its own event loop: it never keeps the process from exiting."""
    loop = asyncio.new_event_loop()
    publisher = Publisher(layer, loop)
    threading.Thread(target=loop.run_until_complete, args=(publisher.run(),), name="hop-publisher",
                     daemon=True).start()
    return publisher


_background: Publisher | None = None  # scaled mode: this process's publisher thread
_server: Publisher | None = None  # embedded mode: the publisher in Daphne's loop
_start_lock = threading.Lock()
# A publisher inherited through fork has no thread in the child, and its loop's Redis sockets are the
# parent's too: keep it referenced so it is never collected (closing its loop would close them).
_forked_away: list[Publisher] = []


def _reset_after_fork() -> None:
    global _start_lock
    _start_lock = threading.Lock()  # it may have been held by a thread that does not exist in the child


os.register_at_fork(after_in_child=_reset_after_fork)


def remember_server_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Called by each websocket in its loop: with the in-memory layer, publish into that loop."""
    global _server
    layer = get_channel_layer()
    if not isinstance(layer, InMemoryChannelLayer):
        return  # scaled mode: this process publishes, if at all, through its background thread
    if _server is not None and _server.loop is loop and _server.layer is layer:
        return
    publisher = Publisher(layer, loop)
    publisher.task = loop.create_task(publisher.run())  # the loop only keeps a weak reference to a task
    _server = publisher


def _publisher() -> Publisher | None:
    global _background
    layer = get_channel_layer()
    if layer is None:
        return None
    if isinstance(layer, InMemoryChannelLayer):
        server = _server
        if server is None or server.layer is not layer or server.loop.is_closed():
            return None  # no server in this process: nobody can be watching
        return server
    if _background is None or _background.pid != os.getpid():  # first publish here, or we were forked
        with _start_lock:
            if _background is None or _background.pid != os.getpid():
                if _background is not None:
                    _forked_away.append(_background)
                _background = start_thread(layer)
    return _background


def publish(events: list[dict]) -> None:
    """Queue events for the channel layer; returns at once and never raises."""
    if not events:
        return
    try:
        publisher = _publisher()
        if publisher is not None:
            publisher.put(events)
    except Exception:  # never let a watcher problem touch delivery
        log.exception("could not publish hop events")


def flush(timeout: float = 1.0) -> bool:
    """Wait until this process's background publisher sent (or dropped) what it was given."""
    publisher = _background
    if publisher is None or publisher.pid != os.getpid():
        return True
    return publisher.flush(timeout)


atexit.register(flush)  # best effort: a worker's last hops still go out when it exits cleanly


def hop_events(messages: Iterable[Message]) -> list[dict]:
    committed_at = int(time.time() * 1000)  # called right after commit: what `bench` measures lag from
    return [{"type": "hop", "flow": msg.pushed_for, "message": message_to_dict(msg), "committed_at": committed_at}
            for msg in messages]


def flow_end_events(flows: Iterable[Flow]) -> list[dict]:
    return [{"type": "flow", "flow": flow.id, "status": flow.status, "error": flow.error or None} for flow in flows]


def publish_hops(sender: object, messages: list[Message], **kwargs) -> None:
    publish(hop_events(messages))


def publish_flow_ends(sender: object, flows: list[Flow], **kwargs) -> None:
    publish(flow_end_events(flows))
