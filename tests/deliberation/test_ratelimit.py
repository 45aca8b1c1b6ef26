"""Rate limits that hold: forwarded addresses believed only from trusted proxies, counters that other
keys cannot evict, and participants' limits counted only after their code resolves (issue 12)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest
from django.core.cache import caches
from django.test import Client, RequestFactory
from django.urls import reverse

from deliberation import ratelimit
from deliberation.models import Opinion
from tests.conftest import OPINIONS

pytestmark = pytest.mark.django_db

NGINX = "10.0.0.5"


@pytest.fixture(autouse=True)
def one_rate_limit_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The limits count per fixed 60 s window; the tests run inside one (see test_abuse.py)."""
    frozen = 1_800_000_030.0
    monkeypatch.setattr(ratelimit, "time", SimpleNamespace(time=lambda: frozen))


@pytest.fixture(autouse=True)
def empty_limiter() -> None:
    caches[ratelimit.CACHE_ALIAS].clear()


def _address(request_meta: dict[str, str]) -> str:
    return ratelimit.client_ip(RequestFactory().get("/", **request_meta))


def _random_ip() -> str:
    value = uuid.uuid4().int
    return f"198.{value % 250}.{(value >> 8) % 250}.{(value >> 16) % 250}"


# --- The client address --------------------------------------------------------


def test_without_trusted_proxies_the_forwarded_header_is_ignored(settings) -> None:
    settings.TRUSTED_PROXY_COUNT, settings.TRUSTED_PROXIES = 0, []
    assert _address({"REMOTE_ADDR": "203.0.113.9", "HTTP_X_FORWARDED_FOR": "1.2.3.4"}) == "203.0.113.9"


@pytest.mark.parametrize(
    ("count", "proxies", "forwarded", "peer", "client"),
    [
        # nginx ($proxy_add_x_forwarded_for) appends the address it saw; what the client wrote stays left of it.
        (1, [], "6.6.6.6, 203.0.113.9", NGINX, "203.0.113.9"),
        (1, [], "203.0.113.9", NGINX, "203.0.113.9"),
        (0, ["10.0.0.0/8"], "6.6.6.6, 203.0.113.9", NGINX, "203.0.113.9"),
        # A load balancer (10.1.2.3) in front of nginx: two trusted hops, by count or by address.
        (2, [], "6.6.6.6, 203.0.113.9, 10.1.2.3", NGINX, "203.0.113.9"),
        (0, ["10.0.0.0/8"], "6.6.6.6, 203.0.113.9, 10.1.2.3", NGINX, "203.0.113.9"),
        # A peer that is not a trusted proxy is the client, whatever it forwards.
        (0, ["10.0.0.0/8"], "6.6.6.6", "203.0.113.9", "203.0.113.9"),
        # Ports and IPv6 as proxies write them.
        (1, [], "[2001:db8::7]:5123", NGINX, "2001:db8::7"),
        (1, [], "203.0.113.9:41234", NGINX, "203.0.113.9"),
        # Garbage handed on by a trusted proxy: counted as that proxy, never as a fresh key.
        (0, ["10.0.0.0/8"], "not-an-address, 10.1.2.3", NGINX, "10.1.2.3"),
        # A request from the proxy itself (no forwarded entries).
        (1, [], "", NGINX, NGINX),
    ],
)
def test_the_client_is_the_right_most_address_not_of_a_trusted_proxy(settings, count, proxies, forwarded, peer, client) -> None:
    settings.TRUSTED_PROXY_COUNT, settings.TRUSTED_PROXIES = count, proxies
    assert _address({"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": forwarded}) == client


def test_a_rotating_client_written_forwarded_entry_does_not_dodge_the_join_limit(experiment, settings) -> None:
    """The review's attack: 65 joins behind nginx, each with a new first X-Forwarded-For entry. Before, the
    limit counted the first entry (client-written) and none got a 429."""
    settings.TRUSTED_PROXY_COUNT = 1
    settings.RATE_LIMIT_JOIN_PER_IP = 60
    statuses = []
    for i in range(65):
        browser = Client(REMOTE_ADDR=NGINX)  # a fresh browser each time: one browser holds one seat
        forwarded = f"7.7.{i // 250}.{i % 250}, 203.0.113.50"  # what nginx sends on: the client's text, then the peer it saw
        statuses.append(browser.post(reverse("join", args=[experiment.slug]), {"consent": "yes"}, HTTP_X_FORWARDED_FOR=forwarded).status_code)
    assert statuses[:60] == [302] * 60
    assert statuses[60:] == [429] * 5
    # Another client behind the same proxy is not affected.
    assert Client(REMOTE_ADDR=NGINX).post(reverse("join", args=[experiment.slug]), {"consent": "yes"}, HTTP_X_FORWARDED_FOR="203.0.113.51").status_code == 302


def test_ipv6_clients_are_counted_by_their_64(settings, experiment) -> None:
    settings.RATE_LIMIT_JOIN_PER_IP = 3
    statuses = [
        Client(REMOTE_ADDR=f"2001:db8:1:2::{i:x}").post(reverse("join", args=[experiment.slug]), {"consent": "yes"}).status_code for i in range(1, 6)
    ]
    assert statuses == [302, 302, 302, 429, 429]


# --- Counters other keys cannot evict -------------------------------------------


def _limiter_keys() -> int:
    """How many counters the limiter's cache holds: local memory (embedded mode) or Redis (`make test`)."""
    limiter = caches[ratelimit.CACHE_ALIAS]
    store = limiter._cache  # type: ignore[attr-defined]
    if isinstance(store, dict):
        return len(store)
    client = store.get_client(None, write=False)
    return sum(1 for _ in client.scan_iter(match=limiter.make_key("rl:*")))


def test_requests_to_made_up_participant_urls_make_no_keys_and_do_not_reset_the_join_limit(experiment, settings) -> None:
    """The review's attack in embedded mode: 320 requests to random /p/<x>/draft/ filled the shared local-memory
    cache (300 entries) and its culling reset the join counter."""
    settings.RATE_LIMIT_JOIN_PER_IP = 5
    settings.RATE_LIMIT_DRAFT_PER_PARTICIPANT = 240
    ip = _random_ip()
    join_url = reverse("join", args=[experiment.slug])
    for _ in range(5):
        assert Client(REMOTE_ADDR=ip).post(join_url, {"consent": "yes"}).status_code == 302
    keys_before = _limiter_keys()
    filler = Client(REMOTE_ADDR=ip)
    for _ in range(320):
        assert filler.post(reverse("opinion_draft", args=[uuid.uuid4().hex[:12]]), {"text": "x"}).status_code == 404
    assert _limiter_keys() == keys_before
    assert Client(REMOTE_ADDR=ip).post(join_url, {"consent": "yes"}).status_code == 429


def test_the_limiter_has_its_own_cache_so_filling_the_default_cache_evicts_nothing(experiment, settings) -> None:
    settings.RATE_LIMIT_JOIN_PER_IP = 2
    ip = _random_ip()
    join_url = reverse("join", args=[experiment.slug])
    for _ in range(2):
        Client(REMOTE_ADDR=ip).post(join_url, {"consent": "yes"})
    default = caches["default"]
    for i in range(1000):  # far past the default cache's 300 entries: it culls, the limiter does not notice
        default.set(f"filler-{i}", i)
    assert Client(REMOTE_ADDR=ip).post(join_url, {"consent": "yes"}).status_code == 429


# --- Participants' limits count after the code resolves ------------------------------


def test_posts_to_someone_elses_url_neither_count_nor_lock_them_out(participant, settings) -> None:
    """The review's attack: 60 requests to another participant's URL used up their budget, so their own
    opinion then got a 429."""
    settings.RATE_LIMIT_SUBMIT_PER_PARTICIPANT = 60
    victim = participant.participant
    stranger = Client()
    keys_before = _limiter_keys()
    for _ in range(61):
        assert stranger.post(reverse("opinion_submit", args=[victim.code]), {"text": OPINIONS[1]}).status_code == 404
    assert _limiter_keys() == keys_before
    response = participant.client.post(reverse("opinion_submit", args=[victim.code]), {"text": OPINIONS[0]})
    assert response.status_code == 302
    assert Opinion.objects.filter(participant=victim).count() == 1


def test_a_participants_own_flood_is_still_throttled(participant, settings) -> None:
    settings.RATE_LIMIT_DRAFT_PER_PARTICIPANT = 4
    url = reverse("opinion_draft", args=[participant.participant.code])
    assert [participant.client.post(url, {"text": "draft"}).status_code for _ in range(6)] == [204] * 4 + [429] * 2
