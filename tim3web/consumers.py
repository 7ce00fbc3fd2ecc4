"""WebSocket /ws/flows/ and /ws/flows/<id>/: hops as they are applied, then the flow's end (CONTRACT)."""

import asyncio
import json

from channels.generic.websocket import AsyncWebsocketConsumer

from tim3web.events import remember_server_loop
from tim3web.fanout import hub


class FlowConsumer(AsyncWebsocketConsumer):
    # Events reach the socket through this process's hub (tim3web.fanout), never through a channel
    # of its own: no channel layer here saves a channel and a receive loop on the layer per socket.
    channel_layer_alias = None

    async def connect(self):
        self.flow = self.scope["url_route"]["kwargs"].get("flow_id")  # None: every flow
        remember_server_loop(asyncio.get_running_loop())
        await hub().start()
        await self.accept()
        hub().add(self, self.flow)

    async def disconnect(self, code):
        hub().leave(self, self.flow)

    async def receive(self, text_data=None, bytes_data=None):
        # The stream is one-way; say so instead of silently dropping input.
        await self.send(json.dumps({"type": "error", "error": "This socket only streams events."}))


class NoSuchStream(AsyncWebsocketConsumer):
    """Any other websocket path (a malformed flow id, say): refused at the handshake, not a traceback."""

    async def connect(self):
        await self.close(code=4404)
