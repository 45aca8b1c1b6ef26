"""ASGI guards: oversized bodies refused before Django reads them; websockets only from the same origin, port included."""

from __future__ import annotations

from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from config.asgi import application
from config.asgi_guards import RequestBodyLimit, origin_is_same_site
from deliberation.models import Participant

MB = 1024 * 1024


class StreamingBody:
    """An ASGI `receive` that hands a body over in chunks and records how much of it was read."""

    def __init__(self, *, total: int, chunk: int = 64 * 1024) -> None:
        self.total, self.chunk, self.sent = total, chunk, 0

    async def __call__(self) -> dict[str, Any]:
        if self.sent >= self.total:
            return {"type": "http.disconnect"}
        size = min(self.chunk, self.total - self.sent)
        self.sent += size
        return {"type": "http.request", "body": b"x" * size, "more_body": self.sent < self.total}


async def _post(path: str, body: StreamingBody, headers: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"localhost"), *headers], "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }
    await application(scope, body, send)
    return sent


def _status(sent: list[dict[str, Any]]) -> int:
    return next(message["status"] for message in sent if message["type"] == "http.response.start")


MULTIPART = (b"content-type", b"multipart/form-data; boundary=----x")


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_148_mb_multipart_post_with_its_length_declared_is_refused_unread(experiment) -> None:
    """The review's attack: 148 MB to the join page peaked daphne at 1.4 GB before the 403."""
    body = StreamingBody(total=148 * MB)
    sent = await _post(f"/e/{experiment.slug}/join/", body, [MULTIPART, (b"content-length", str(148 * MB).encode())])
    assert _status(sent) == 413
    assert body.sent == 0  # not a byte read
    assert not await Participant.objects.acount()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_chunked_148_mb_post_is_refused_once_it_passes_the_limit(experiment) -> None:
    body = StreamingBody(total=148 * MB)
    sent = await _post(f"/e/{experiment.slug}/join/", body, [MULTIPART, (b"transfer-encoding", b"chunked")])
    assert _status(sent) == 413
    # Read only up to the limit (and the chunk that passed it), never the whole body.
    assert body.sent <= settings.REQUEST_BODY_MAX_BYTES + body.chunk
    assert body.sent < 148 * MB
    assert not await Participant.objects.acount()


@pytest.mark.asyncio
async def test_a_body_under_the_limit_reaches_the_application() -> None:
    seen: list[bytes] = []

    async def app(scope, receive, send) -> None:
        while True:
            message = await receive()
            seen.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    guard = RequestBodyLimit(app, max_bytes=1000)
    await guard({"type": "http", "headers": [(b"transfer-encoding", b"chunked")]}, StreamingBody(total=900, chunk=100), send)
    assert _status(sent) == 200 and sum(map(len, seen)) == 900


@pytest.mark.django_db
def test_a_normal_join_still_works_through_the_guard(experiment) -> None:
    assert Client().post(f"/e/{experiment.slug}/join/", {"consent": "yes"}).status_code == 302


# --- Websocket origin: port included -----------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("http://localhost:8000", "localhost:8000", True),
        ("https://localhost", "localhost", True),
        # Another application on another port of the same host (the review's finding).
        ("http://localhost:9999", "localhost:8000", False),
        ("http://localhost", "localhost:8000", False),
        ("http://localhost:8000", "localhost", False),
        ("http://evil.example", "evil.example", False),  # not an allowed host
        ("http://evil.example", "localhost", False),
        ("null", "localhost", False),
        ("", "localhost", False),
        # No Host header (in-process test harnesses): an allowed host at its scheme's default port only.
        ("http://localhost", None, True),
        ("http://localhost:9999", None, False),
    ],
)
def test_a_websocket_origin_must_match_host_and_port(origin: str, host: str | None, allowed: bool) -> None:
    assert origin_is_same_site(origin, host) is allowed


def test_a_csrf_trusted_origin_is_allowed_exactly(settings) -> None:
    settings.CSRF_TRUSTED_ORIGINS = ["https://study.example.org"]
    assert origin_is_same_site("https://study.example.org", "10.0.0.5:8001")
    assert not origin_is_same_site("https://study.example.org:8443", "10.0.0.5:8001")


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_participants_socket_from_another_port_of_the_same_host_is_refused(participant) -> None:
    cookie = (b"cookie", f"{settings.SESSION_COOKIE_NAME}={participant.client.session.session_key}".encode())
    path = f"/ws/p/{participant.participant.code}/"
    foreign = WebsocketCommunicator(application, path, headers=[(b"host", b"localhost:8000"), (b"origin", b"http://localhost:9999"), cookie])
    connected, _ = await foreign.connect(timeout=10)
    assert not connected
    same = WebsocketCommunicator(application, path, headers=[(b"host", b"localhost:8000"), (b"origin", b"http://localhost:8000"), cookie])
    connected, _ = await same.connect(timeout=10)
    assert connected
    await same.disconnect()
