"""ASGI guards that act before Django (or a consumer) sees a request.

- `RequestBodyLimit`: a request body larger than REQUEST_BODY_MAX_BYTES is refused with 413 before
  Django reads it. Django's ASGI handler reads the whole body (into a spooled temporary file) before
  any middleware or view runs, and a multipart body is then parsed again: a 148 MB upload to the
  join page once peaked a daphne process at 1.4 GB before the 403. A declared Content-Length over
  the limit is refused without reading a byte; a chunked body (no length) is counted as it streams
  in, and refused as soon as it passes the limit.
  Under daphne that is not early enough on its own: Twisted receives the whole body (into a temporary
  file) before daphne calls the application, and daphne then queues all of it at once. So
  `install_daphne_body_limit` also makes daphne's request refuse a body past the limit as it arrives
  (by the declared length as soon as the headers are in, before an `Expect: 100-continue` client sends
  anything; by counting otherwise), answer 413 and drop the connection.
- `SameOriginWebsocket`: a websocket's Origin must be the site it connects to, port included
  (Django's CSRF rule): `scheme://host[:port]` whose `host[:port]` is the request's Host header, with
  that host in ALLOWED_HOSTS, or one of CSRF_TRUSTED_ORIGINS. channels' AllowedHostsOriginValidator
  compares host names only, so a page served by another application on another port of the same
  host could open participants' sockets.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOO_LARGE_BODY = b"Request body too large.\n"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


async def _send_413(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(TOO_LARGE_BODY)).encode()), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": TOO_LARGE_BODY})


class RequestBodyLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int | None = None) -> None:
        self.app = app
        self._max_bytes = max_bytes

    @property
    def max_bytes(self) -> int:
        return self._max_bytes if self._max_bytes is not None else int(settings.REQUEST_BODY_MAX_BYTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0 or length > limit:
                logger.warning("Refused a %s-byte body to %s (limit %d)", declared.decode("latin1"), scope.get("path"), limit)
                await _send_413(send)
                return

        received = 0
        too_large = False
        response_started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Django's handler stops reading at a disconnect and sends nothing; the 413 is ours.
                    too_large = True
                    logger.warning("Refused a streamed body to %s past %d bytes", scope.get("path"), limit)
                    return {"type": "http.disconnect"}
            return message

        async def watching_send(message: dict[str, Any]) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await self.app(scope, counting_receive, watching_send)
        if too_large and not response_started:
            await _send_413(send)


def origin_is_same_site(origin: str, host: str | None) -> bool:
    """Whether a websocket from `origin` (the Origin header) may connect to `host` (the Host header)."""
    if not origin or origin == "null":
        return False
    parts = urlsplit(origin.lower())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return False
    try:
        port = parts.port
    except ValueError:
        return False
    normalised = f"{parts.scheme}://{parts.netloc}"
    if normalised in {trusted.lower().rstrip("/") for trusted in settings.CSRF_TRUSTED_ORIGINS}:
        return True
    allowed_hosts = settings.ALLOWED_HOSTS
    if host:
        # Same origin: the page's host and port are the ones this socket was opened to.
        domain, _ = split_domain_port(host.lower())
        return bool(domain) and validate_host(domain, allowed_hosts) and parts.netloc == host.lower()
    # No Host header (every HTTP/1.1 client sends one; only in-process test harnesses leave it out): the
    # origin must be an allowed host at its scheme's default port.
    return port is None and validate_host(parts.hostname, allowed_hosts)


class SameOriginWebsocket:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = _header(scope, b"origin")
        host = _header(scope, b"host")
        if origin is not None and origin_is_same_site(origin.decode("latin1"), host.decode("latin1") if host is not None else None):
            await self.app(scope, receive, send)
            return
        await WebsocketDenier()(scope, receive, send)


def _too_large_response() -> bytes:
    return (
        b"HTTP/1.1 413 Request Entity Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
        + f"content-length: {len(TOO_LARGE_BODY)}\r\n".encode()
        + b"connection: close\r\n\r\n"
        + TOO_LARGE_BODY
    )


def install_daphne_body_limit() -> bool:
    """Make daphne refuse bodies over REQUEST_BODY_MAX_BYTES while they arrive (see the module's docstring).

    daphne builds each connection's requests from `daphne.http_protocol.WebRequest` (looked up when a
    connection is made), and offers no setting for this, so the class is replaced by a subclass that
    checks the length. Returns False where daphne is not installed (another ASGI server: rely on its own
    limit, e.g. uvicorn behind nginx's client_max_body_size, and on RequestBodyLimit).
    """
    try:
        from daphne import http_protocol
    except ImportError:  # pragma: no cover - daphne is a dependency
        return False
    if getattr(http_protocol.WebRequest, "concord_body_limit", False):
        return True
    base: Any = http_protocol.WebRequest

    class BodyLimitedWebRequest(base):
        concord_body_limit = True
        _body_received = 0
        _body_refused = False

        def _refuse_body(self, described: str) -> None:
            self._body_refused = True
            logger.warning("Refused a %s body to %s (limit %d) before reading it", described, self.uri.decode("latin1", "replace"), settings.REQUEST_BODY_MAX_BYTES)
            self.channel.transport.write(_too_large_response())
            self.channel.loseConnection()  # stops reading; what the client still sends is dropped

        def gotLength(self, length: int | None) -> None:
            super().gotLength(length)
            if length is not None and length > settings.REQUEST_BODY_MAX_BYTES:
                self._refuse_body(f"{length}-byte")

        def handleContentChunk(self, data: bytes) -> None:
            if self._body_refused:
                return
            self._body_received += len(data)
            if self._body_received > settings.REQUEST_BODY_MAX_BYTES:
                self._refuse_body("streamed")
                return
            super().handleContentChunk(data)

        def process(self) -> Any:
            if self._body_refused:
                return None
            return super().process()

    http_protocol.WebRequest = BodyLimitedWebRequest
    return True
