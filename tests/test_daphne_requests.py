"""Daphne hands POST bodies to Django untouched: Twisted does not parse them first.

Twisted parses every POST's Content-Type and any form body into `request.args`,
which Daphne never reads (it passes the raw body to the ASGI application);
tim3web.asgi turns that off (skip_twisted_form_parsing). The body Daphne reads
must still be the whole body, as sent.
"""

import io
from types import SimpleNamespace

from daphne import http_protocol
from twisted.web import http
from twisted.web.test.requesthelper import DummyChannel

import tim3web.asgi  # noqa: F401 - installs Daphne's request class, as `daphne tim3web.asgi:application` does


def daphne_request_for(body: bytes, content_type: bytes):
    """A request built the way Daphne's factory builds them, with its body received."""
    channel = DummyChannel()
    channel.factory = SimpleNamespace(server=SimpleNamespace(protocol_connected=lambda request: None))
    request = http_protocol.WebRequest(channel)
    request.requestHeaders.setRawHeaders(b"content-type", [content_type])
    request.content = io.BytesIO()
    request.handleContentChunk(body)
    return request


def test_a_form_post_reaches_the_app_unparsed_and_whole(monkeypatch):
    parsed, handed_over = [], []
    monkeypatch.setattr(http, "_parseContentType", lambda line: parsed.append(line) or b"")
    body = b"quantity=2000000&mode=deposit&csrfmiddlewaretoken=abc"
    request = daphne_request_for(body, b"application/x-www-form-urlencoded")
    # Daphne's process() starts the ASGI application with the request's body.
    monkeypatch.setattr(request, "process", lambda: handed_over.append(request.content.read()))
    request.requestReceived(b"POST", b"/deposit", b"HTTP/1.1")
    assert parsed == [], "Twisted parsed the Content-Type of a POST Daphne hands to Django"
    assert request.args == {}, "Twisted parsed the form into request.args"
    assert handed_over == [body]


def test_twisteds_own_request_would_have_parsed_it(monkeypatch):
    # The check above can fail: a plain Twisted request parses the same POST.
    parsed = []
    monkeypatch.setattr(http, "_parseContentType",
                        lambda line: parsed.append(line) or b"application/x-www-form-urlencoded")
    request = http.Request(DummyChannel())
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/x-www-form-urlencoded"])
    request.content = io.BytesIO()
    request.handleContentChunk(b"quantity=1")
    monkeypatch.setattr(request, "process", lambda: None)
    request.requestReceived(b"POST", b"/deposit", b"HTTP/1.1")
    assert parsed == [b"application/x-www-form-urlencoded"] and request.args == {b"quantity": [b"1"]}


def test_installing_twice_keeps_one_subclass():
    installed = http_protocol.WebRequest
    tim3web.asgi.skip_twisted_form_parsing()
    assert http_protocol.WebRequest is installed and installed.__mro__[1].__name__ == "WebRequest"
