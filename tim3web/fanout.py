"""Process-local fan-out of the hop stream to this process's websockets.

With every socket in the channel-layer group, channels_redis hands each event
to each socket through its shared receive lock, one socket at a time: one
Daphne with 100 watchers delivered ~10 events a second, far slower than two
workers settle hops (tests/load). Here one receiver per event loop is in the
ALL_HOPS group; it takes the publishers' batches (tim3web.events), serializes
each event once and sends it to every local socket that wants it, in the order
received: /ws/flows/ sockets get every event, /ws/flows/<id>/ sockets their
flow's. The sockets themselves need no channel and no group.
"""

import asyncio
import json
import logging

from channels.layers import get_channel_layer

from tim3web.events import ALL_HOPS

log = logging.getLogger(__name__)
REJOIN_SECONDS = 60.0  # group membership expires (a day in channels_redis) and a restarted Redis forgets it


class Hub:
    def __init__(self):
        self.everything: set = set()  # sockets on /ws/flows/
        self.by_flow: dict[str, set] = {}  # sockets on /ws/flows/<id>/, by flow id
        self.task: asyncio.Task | None = None
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        """The receiver is in the group (a socket added after this gets every later event)."""
        async with self.lock:
            if self.task is None or self.task.done():
                layer = get_channel_layer()
                channel = await layer.new_channel()
                await layer.group_add(ALL_HOPS, channel)
                self.task = asyncio.create_task(self._run(layer, channel))

    def add(self, socket, flow: str | None = None) -> None:
        """`socket` gets every event, or only flow `flow`'s."""
        if flow is None:
            self.everything.add(socket)
        else:
            self.by_flow.setdefault(flow, set()).add(socket)

    def leave(self, socket, flow: str | None = None) -> None:
        if flow is None:
            self.everything.discard(socket)
            return
        sockets = self.by_flow.get(flow)
        if sockets is not None:
            sockets.discard(socket)
            if not sockets:
                del self.by_flow[flow]

    async def _run(self, layer, channel: str) -> None:
        rejoin = asyncio.create_task(self._stay_joined(layer, channel))
        failing = False
        try:
            while True:
                try:
                    message = await layer.receive(channel)
                except asyncio.CancelledError:
                    raise
                except Exception:  # the broker went away for a moment: keep listening
                    if not failing:
                        log.warning("hop fan-out cannot receive; retrying every second", exc_info=True)
                    failing = True
                    await asyncio.sleep(1.0)
                    await self._join(layer, channel)  # a restarted Redis forgot the group
                    continue
                if failing:
                    log.warning("hop fan-out receives again")
                    failing = False
                for event in message.get("events", ()):
                    await self._deliver(event)
        finally:
            rejoin.cancel()

    async def _stay_joined(self, layer, channel: str) -> None:
        while True:
            await asyncio.sleep(REJOIN_SECONDS)
            await self._join(layer, channel)

    @staticmethod
    async def _join(layer, channel: str) -> None:
        try:
            await layer.group_add(ALL_HOPS, channel)
        except Exception:  # noqa: BLE001 - the receive loop reports the outage
            pass

    async def _deliver(self, event: dict) -> None:
        flow = event.get("flow")
        watchers = self.by_flow.get(flow, ())
        if not (self.everything or watchers):
            return
        text = json.dumps(event)
        for socket in list(self.everything):
            await self._send(socket, text, None)
        for socket in list(watchers):
            await self._send(socket, text, flow)

    async def _send(self, socket, text: str, flow: str | None) -> None:
        try:
            await socket.send(text)
        except Exception:  # noqa: BLE001 - a socket that went away
            self.leave(socket, flow)


_hubs: dict[asyncio.AbstractEventLoop, Hub] = {}


def hub() -> Hub:
    """This event loop's hub (one per Daphne process; one per test loop in tests)."""
    loop = asyncio.get_running_loop()
    if loop not in _hubs:
        for stale in [k for k in _hubs if k.is_closed()]:
            del _hubs[stale]
        _hubs[loop] = Hub()
    return _hubs[loop]
