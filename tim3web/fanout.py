"""Process-local fan-out of the all-hops stream to this process's websockets.

With every socket in the channel-layer group, channels_redis hands each event
to each socket through its shared receive lock, one socket at a time: one
Daphne with 100 watchers delivered ~10 events a second, far slower than two
workers settle hops (tests/load). Here one receiver per event loop is in the
group; it serializes each event once and sends it to every local socket, in
the order received.
"""

import asyncio
import json
import logging

from channels.layers import get_channel_layer

log = logging.getLogger(__name__)


class Hub:
    def __init__(self, group: str):
        self.group = group
        self.sockets: set = set()
        self.task: asyncio.Task | None = None
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        """The receiver is in the group (a socket added after this gets every later event)."""
        async with self.lock:
            if self.task is None or self.task.done():
                layer = get_channel_layer()
                channel = await layer.new_channel()
                await layer.group_add(self.group, channel)
                self.task = asyncio.create_task(self._run(layer, channel))

    def leave(self, consumer) -> None:
        self.sockets.discard(consumer)

    async def _run(self, layer, channel: str) -> None:
        while True:
            try:
                message = await layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception:  # the broker went away for a moment: keep listening
                log.exception("hop fan-out could not receive")
                await asyncio.sleep(1.0)
                continue
            text = json.dumps(message["event"])
            for consumer in list(self.sockets):
                try:
                    await consumer.send(text)
                except Exception:  # noqa: BLE001 - a socket that went away
                    self.sockets.discard(consumer)


_hubs: dict[tuple[asyncio.AbstractEventLoop, str], Hub] = {}


def hub(group: str) -> Hub:
    key = (asyncio.get_running_loop(), group)
    if key not in _hubs:
        for stale in [k for k in _hubs if k[0].is_closed()]:
            del _hubs[stale]
        _hubs[key] = Hub(group)
    return _hubs[key]
