"""Fixed-window rate limits, for join and submit floods; and the client address they count.

Counters live in their own cache alias, `ratelimit` (config/settings.py): Redis when configured,
else a local-memory cache of its own, sized by RATE_LIMIT_MAX_KEYS. Nothing else writes there,
and only keys that cost the requester something are made: one per client address (joins) and one
per participant whose browser proved it holds the seat (views.participant_action counts after the
participant resolves; an unknown code is a 404 that makes no key). So filling the cache with
requests to made-up URLs cannot evict, and so reset, anyone's counter.

The client address: X-Forwarded-For is believed only as far as it was written by proxies the
deployment trusts (TRUSTED_PROXY_COUNT, TRUSTED_PROXIES). The client is the right-most address
not belonging to a trusted proxy; whatever a client writes to the left of it is ignored.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence

from django.conf import settings
from django.core.cache import caches
from django.http import HttpRequest, HttpResponse

logger = logging.getLogger(__name__)

CACHE_ALIAS = "ratelimit"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_address(value: str) -> IPAddress | None:
    """An address as a proxy writes it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:443`."""
    value = value.strip().strip('"')
    if value.startswith("["):
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has several colons
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.cache
def _trusted_networks(entries: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def trusted_proxy_networks() -> tuple[IPNetwork, ...]:
    return _trusted_networks(tuple(settings.TRUSTED_PROXIES))


def _is_trusted_proxy(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(address.version == network.version and address in network for network in networks)


def client_ip(request: HttpRequest) -> str:
    """The address of the client: REMOTE_ADDR, or the right-most X-Forwarded-For entry not written by a trusted proxy.

    The hops are X-Forwarded-For's entries followed by the peer (REMOTE_ADDR), nearest last. Walking
    from the nearest, a hop is a trusted proxy when it is one of the last TRUSTED_PROXY_COUNT hops or
    its address is in TRUSTED_PROXIES; the first hop that is neither is the client. Each trusted proxy
    appends the address it received the request from, so entries left of the client's are the
    client's own writing and are never read. An entry that is not an address, handed on by a trusted
    proxy, ends the walk at that proxy (the address is then the proxy's: over-counted, never dodged).
    """
    peer = request.META.get("REMOTE_ADDR", "") or "unknown"
    count: int = settings.TRUSTED_PROXY_COUNT
    networks = trusted_proxy_networks()
    if not count and not networks:
        return peer
    forwarded = [entry for entry in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if entry.strip()]
    hops = [*forwarded, peer]
    nearest_trusted = peer
    for distance, raw in enumerate(reversed(hops)):
        address = _parse_address(raw)
        if address is None:
            return nearest_trusted
        if distance < count or _is_trusted_proxy(address, networks):
            nearest_trusted = str(address)
            continue
        return str(address)
    return nearest_trusted  # every hop is a trusted proxy: the request came from one of them


def client_ip_address(request: HttpRequest) -> str | None:
    """`client_ip`, when it is an IP address (None otherwise: a unix socket, a malformed header).

    Login throttling (django-axes, AXES_CLIENT_IP_CALLABLE) stores it in an address column, which
    PostgreSQL would refuse to fill with anything else."""
    address = _parse_address(client_ip(request))
    return str(address) if address is not None else None


def address_key(request: HttpRequest) -> str:
    """The key a client address is counted under. An IPv6 client is counted by its /64: one subscriber
    is usually given a whole /64, and could otherwise rotate through its addresses to dodge the limit
    (and make a key for each)."""
    address = _parse_address(client_ip(request))
    if address is None:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def hit(*, scope: str, key: str, limit: int, window_seconds: int = 60) -> bool:
    """Count one request; False once `limit` requests were made in the current window.

    When the counters cannot be reached (Redis restarting), the request is let through: for the
    length of an outage a flood goes uncounted, which is better than refusing every participant's
    submission while the database that stores it is up.
    """
    if limit <= 0:
        return True
    cache = caches[CACHE_ALIAS]
    window = int(time.time() // window_seconds)
    bucket = f"rl:{scope}:{key}:{window}"
    try:
        if cache.add(bucket, 0, timeout=window_seconds * 2):
            # A new window: the last one's counter is of no more use (a local-memory cache would
            # otherwise keep it until it is read again or culled).
            cache.delete(f"rl:{scope}:{key}:{window - 1}")
        try:
            count = cache.incr(bucket)
        except ValueError:  # expired between add and incr
            cache.set(bucket, 1, timeout=window_seconds * 2)
            count = 1
    except Exception:  # redis-py's ConnectionError and TimeoutError, OSError: the cache is unreachable
        logger.warning("Rate limit %s not checked: the cache is unavailable", scope, exc_info=True)
        return True
    return count <= limit


def too_many_requests() -> HttpResponse:
    return HttpResponse(
        "Too many requests: please wait a minute and try again.",
        status=429,
        headers={"Retry-After": "60"},
        content_type="text/plain; charset=utf-8",
    )


def rate_limited_by_address(scope: str, *, limit_setting: str) -> Callable:
    """Refuse POSTs with 429 past the limit per client address (join). Participants' own limits are
    counted after their code resolves: views.participant_action."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @functools.wraps(view)
        def wrapped(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
            if request.method == "POST" and not hit(scope=scope, key=address_key(request), limit=getattr(settings, limit_setting)):
                return too_many_requests()
            return view(request, *args, **kwargs)

        return wrapped

    return decorator
