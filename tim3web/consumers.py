"""WebSocket /ws/flows/: every hop, as it is applied (CONTRACT)."""

import asyncio
import json

from channels.generic.websocket import AsyncWebsocketConsumer

from tim3web.events import ALL_HOPS, flow_group, remember_server_loop
from tim3web.fanout import hub


class FlowConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        remember_server_loop(asyncio.get_running_loop())
        flow = self.scope["url_route"]["kwargs"].get("flow_id")
        self.group = flow_group(flow) if flow else ALL_HOPS
        if self.group == ALL_HOPS:  # one receiver per process fans the busy stream out (tim3web.fanout)
            await hub(ALL_HOPS).start()
        else:
            await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        if self.group == ALL_HOPS:
            hub(ALL_HOPS).sockets.add(self)

    async def disconnect(self, code):
        if self.group == ALL_HOPS:
            hub(ALL_HOPS).leave(self)
        else:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        # The stream is one-way; say so instead of silently dropping input.
        await self.send(json.dumps({"type": "error", "error": "This socket only streams events."}))

    async def tim3_event(self, message):
        await self.send(json.dumps(message["event"]))


class NoSuchStream(AsyncWebsocketConsumer):
    """Any other websocket path (a malformed flow id, say): refused at the handshake, not a traceback."""

    async def connect(self):
        await self.close(code=4404)
