"""ASGI entry point: HTTP behind a body-size limit, and websockets behind a same-origin check and session auth."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_http = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from config.asgi_guards import RequestBodyLimit, SameOriginWebsocket, install_daphne_body_limit  # noqa: E402
from deliberation.dispatch import remember_server_loop  # noqa: E402
from deliberation.recovery import start_on_loop  # noqa: E402
from deliberation.routing import websocket_urlpatterns  # noqa: E402

ASGIApp = Callable[[dict[str, Any], Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]]


class RememberServerLoop:
    """Lets in-process tasks (the embedded default) run on the server's own event loop, where the
    server also sweeps for tasks it lost when it last stopped (Celery workers do that themselves)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        remember_server_loop(loop)
        if not settings.USE_CELERY:
            start_on_loop(loop)  # once per process; a no-op when the sweep is off
        await self.app(scope, receive, send)


# daphne itself refuses oversized bodies while they arrive (it would otherwise take them whole first).
install_daphne_body_limit()

http_app: Any = ASGIStaticFilesHandler(django_http) if settings.SERVE_STATIC else django_http

application = RememberServerLoop(
    ProtocolTypeRouter(
        {
            "http": RequestBodyLimit(http_app),
            "websocket": SameOriginWebsocket(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
        }
    )
)
