import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tim3web.settings")
# Under ASGI every request runs its sync code in a thread of its own, so a persistent
# database connection (CONN_MAX_AGE > 0) is never reused: it stays open until garbage
# collection. Under load Daphne held ~90 idle connections and Postgres refused
# everyone else ("too many clients"), workers included. So the web process takes its
# connections from a bounded pool shared by all threads (settings: TIM3_DB_POOL*), and
# with TIM3_DB_POOL=0 it connects per request (CONN_MAX_AGE=0, Django's advice under ASGI).
os.environ.setdefault("TIM3_DB_POOL", "1")
os.environ.setdefault("DB_CONN_MAX_AGE", "0")

import asyncio  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import django  # noqa: E402
from asgiref.sync import ThreadSensitiveContext, sync_to_async  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.core import signals  # noqa: E402
from django.core.exceptions import RequestAborted  # noqa: E402
from django.core.handlers.asgi import ASGIHandler, get_script_prefix  # noqa: E402
from django.http import FileResponse, HttpRequest, HttpResponse  # noqa: E402
from django.urls import set_script_prefix  # noqa: E402


class RequestThreads:
    """Long-lived request threads, each serving one request at a time.

    Django gives every request a ThreadSensitiveContext of its own, which starts a thread
    for it and joins that thread when the request ends: ~12 context switches and a thread
    start per request, a tenth of Daphne's CPU under load. A request here takes an idle
    single-thread executor instead and gives it back when it ends. All of one request's
    sync code still runs in one thread, which no other request uses meanwhile. There are
    never more threads than requests once in flight (LimitConcurrency bounds those).
    No lock: list.pop and list.append are atomic, even for two event loops (tests).
    """

    def __init__(self) -> None:
        self.idle: list[ThreadPoolExecutor] = []

    def take(self) -> ThreadPoolExecutor:
        try:
            return self.idle.pop()
        except IndexError:
            return ThreadPoolExecutor(max_workers=1, thread_name_prefix="request")

    def give_back(self, executor: ThreadPoolExecutor) -> None:
        # A request cancelled while its sync code runs gives its thread back busy: the next
        # request that takes it starts when that code is done (an executor runs one call at a time).
        self.idle.append(executor)


class SyncChainASGIHandler(ASGIHandler):
    """Django's ASGI handler, running the middleware chain and the view in one thread switch.

    Every view and middleware here is sync. In async mode Django runs each middleware's
    hooks through sync_to_async, a hand-off between the event loop and the request's
    thread each time: about a dozen per API request, ~1 ms of CPU (half of what a 404
    cost Daphne). Built in sync mode, the chain runs as under WSGI, in the request's own
    thread (the one the request_started/finished signals use, so the same DB connection).
    """

    threads = RequestThreads()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        executor = self.threads.take()
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            self.threads.give_back(executor)

    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)

    def respond(self, request: HttpRequest, scope: dict) -> HttpResponse:
        """The request's sync part, in its thread: request_started, the middleware and view,
        and for a response whose body is already in memory, close() (request_finished: the
        database connection goes back to the pool before the bytes go out)."""
        signals.request_started.send(sender=self.__class__, scope=scope)
        response = self.get_response(request)
        response._handler_class = self.__class__
        if isinstance(response, FileResponse):
            response.block_size = self.chunk_size
        if not response.streaming:
            response.close()
        return response

    async def handle(self, scope, receive, send) -> None:
        """Django 5.2's ASGIHandler.handle with one switch to the request's thread instead of
        three (request_started, get_response, response.close each had their own: ~10 % of
        Daphne's CPU under load, py-spy). A streaming response (static files) is still closed
        after it was sent; a disconnect still cancels the request as in Django."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            await signals.request_started.asend(sender=self.__class__, scope=scope)
            body_file.close()
            await self.send_response(error_response, send)
            await sync_to_async(error_response.close)()
            return

        async def process_request() -> HttpResponse:
            response = await sync_to_async(self.respond, thread_sensitive=True)(request, scope)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass  # the client went away while we sent
            return response

        # As Django: whichever ends first, the client's disconnect or the response.
        tasks = [asyncio.create_task(self.listen_for_disconnect(receive)), asyncio.create_task(process_request())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        try:
            response = tasks[1].result()
        except asyncio.CancelledError:
            await signals.request_finished.asend(sender=self.__class__)
        else:
            if response.streaming:
                await sync_to_async(response.close)()
        body_file.close()


def skip_twisted_form_parsing() -> None:
    """Daphne's requests leave POST bodies to Django.

    Twisted parses every POST's Content-Type (through the email package's header
    registry: 8 % of Daphne's CPU under bench load) and any form body into
    `request.args`, which Daphne never reads: it hands the raw body to the ASGI
    application, and Django parses forms itself. Twisted's own switch for that is
    Request's `parsePOSTFormSubmission` argument; Daphne's factory builds its
    requests from the module's `WebRequest`, so a subclass there turns it off.
    """
    import inspect

    from daphne import http_protocol
    from twisted.web import http

    if getattr(http_protocol.WebRequest, "leaves_forms_to_the_app", False):
        return
    if "parsePOSTFormSubmission" not in inspect.signature(http.Request.__init__).parameters:
        return  # an older Twisted (daphne allows >= 22.4): it keeps parsing, requests still work

    class WebRequestLeavingFormsToTheApp(http_protocol.WebRequest):
        leaves_forms_to_the_app = True

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, parsePOSTFormSubmission=False, **kwargs)

    http_protocol.WebRequest = WebRequestLeavingFormsToTheApp


skip_twisted_form_parsing()
django.setup(set_prefix=False)  # what get_asgi_application() does before building its handler
django_asgi_app = SyncChainASGIHandler()

from tim3web.limits import LimitConcurrency  # noqa: E402
from tim3web.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter({
    "http": LimitConcurrency(django_asgi_app),  # at most TIM3_HTTP_CONCURRENCY requests at once
    "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
})
