"""Content-Security-Policy: only the site's own scripts, styles and sockets.

htmx runs under it because the templates use no inline scripts or styles, htmx's
indicator styles are turned off and eval is disallowed (see the htmx-config meta tag).
"""

from __future__ import annotations

from typing import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        # The admin ships inline scripts of its own; it is for logged-in staff only.
        if settings.CONTENT_SECURITY_POLICY and not request.path.startswith("/admin/"):
            response.headers.setdefault("Content-Security-Policy", settings.CONTENT_SECURITY_POLICY)
        return response
