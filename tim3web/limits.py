"""A bound on the HTTP requests one ASGI process serves at once.

Under ASGI, Django runs each request's sync code in a thread of its own: 200
wallets posting at once made Daphne open more connections than Postgres allows
("too many clients already", a 500 for the request and for any worker that
needed a connection just then). Database connections are now bounded by the
web process's pool (settings: TIM3_DB_POOL_MAX_SIZE); this bounds the threads.
Requests beyond it wait in the event loop for a free slot instead (websockets
are not counted: they hold no thread or connection while open).
"""

import asyncio
import os


class LimitConcurrency:
    def __init__(self, app, limit: int | None = None):
        self.app = app
        self.limit = limit or int(os.environ.get("TIM3_HTTP_CONCURRENCY", "16"))
        self._semaphores: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            semaphore = self._semaphores[loop] = asyncio.Semaphore(self.limit)
        return semaphore

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        async with self._semaphore():
            return await self.app(scope, receive, send)
