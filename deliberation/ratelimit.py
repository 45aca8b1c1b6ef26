"""Fixed-window rate limits in the cache (Redis when configured), for join and submit floods."""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections.abc import Callable

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse

logger = logging.getLogger(__name__)


def client_ip(request: HttpRequest) -> str:
    if settings.TRUST_X_FORWARDED_FOR:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        if forwarded:
            return forwarded.split(",")[0].strip()
    return request.META.get("REMOTE_ADDR", "unknown")


def client_ip_address(request: HttpRequest) -> str | None:
    """`client_ip`, when it is an IP address (None otherwise: a unix socket, a malformed forwarded header).

    Login throttling (django-axes, AXES_CLIENT_IP_CALLABLE) stores it in an address column, which
    PostgreSQL would refuse to fill with anything else."""
    value = client_ip(request)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def hit(*, scope: str, key: str, limit: int, window_seconds: int = 60) -> bool:
    """Count one request; False once `limit` requests were made in the current window.

    When the counters cannot be reached (Redis restarting), the request is let through: for the
    length of an outage a flood goes uncounted, which is better than refusing every participant's
    submission while the database that stores it is up.
    """
    if limit <= 0:
        return True
    bucket = f"rl:{scope}:{key}:{int(time.time() // window_seconds)}"
    try:
        cache.add(bucket, 0, timeout=window_seconds * 2)
        try:
            count = cache.incr(bucket)
        except ValueError:  # expired between add and incr
            cache.set(bucket, 1, timeout=window_seconds * 2)
            count = 1
    except Exception:  # redis-py's ConnectionError and TimeoutError, OSError: the cache is unreachable
        logger.warning("Rate limit %s not checked: the cache is unavailable", scope, exc_info=True)
        return True
    return count <= limit


def rate_limited(scope: str, *, limit_setting: str, by: str = "ip") -> Callable:
    """Refuse with 429 past the limit. `by` is "ip" or "participant" (the code in the URL)."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @functools.wraps(view)
        def wrapped(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
            if request.method == "POST":
                key = str(kwargs.get("code")) if by == "participant" else client_ip(request)
                if not hit(scope=scope, key=key, limit=getattr(settings, limit_setting)):
                    return HttpResponse(
                        "Too many requests: please wait a minute and try again.",
                        status=429,
                        headers={"Retry-After": "60"},
                        content_type="text/plain; charset=utf-8",
                    )
            return view(request, *args, **kwargs)

        return wrapped

    return decorator
