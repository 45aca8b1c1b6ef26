"""A whole round, end to end below the browser: websockets, task dispatch, the real models.

Two topologies:
- embedded: tasks run in-process on the server's loop, in-memory channel layer (`make run` default);
- celery: a real Celery worker consuming the gpu queue from Redis, Redis channel layer (production, CI).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings

from config.asgi import application
from config.celery import app as celery_app
from deliberation import services
from deliberation.models import Candidate, Experiment, Participant, PredictedAgreement, Presentation, Rating, Round
from tests.conftest import OPINIONS
from tests.factories import ExperimentFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

REDIS_URL = os.environ.get("REDIS_URL", "")


@pytest.fixture(params=["embedded", "celery"])
def topology(request, settings) -> Iterator[str]:
    if request.param == "embedded":
        settings.USE_CELERY = False
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
        yield "embedded"
        return
    if not REDIS_URL:
        pytest.skip("the Celery topology needs REDIS_URL (`make test` starts one)")
    from celery.contrib.testing.worker import start_worker

    settings.USE_CELERY = True
    settings.CHANNEL_LAYERS = {
        # No client read timeout, as in config/settings.py: redis-py 8's 5 s default breaks the blocking read.
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None}]},
        }
    }
    celery_app.conf.broker_url = REDIS_URL
    celery_app.control.purge()  # leftovers of an earlier run must not leak into this one
    with start_worker(celery_app, pool="solo", perform_ping_check=False, queues=["gpu", "default"], shutdown_timeout=30):
        yield "celery"


def _make_group() -> list[Participant]:
    experiment: Experiment = ExperimentFactory(slug="integration", group_size=3)
    return [services.participant_join(experiment=experiment, external_id=f"int-{i}") for i in range(3)]


def _session_cookie(participant: Participant) -> tuple[bytes, bytes]:
    from django.contrib.sessions.backends.db import SessionStore

    from deliberation.views import SESSION_KEY

    store = SessionStore()
    store[SESSION_KEY] = [participant.code]
    store.save()
    return (b"cookie", f"{settings.SESSION_COOKIE_NAME}={store.session_key}".encode())


async def _wait_for(communicator: WebsocketCommunicator, needle: str, *, seen: list[str], timeout: float) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"{needle!r} did not arrive in {timeout}s; last: {seen[-1][:300] if seen else None}")
        message = await communicator.receive_from(timeout=remaining)
        seen.append(message)
        if needle in message:
            return message


async def test_a_whole_round_runs_live_over_websockets(topology: str) -> None:
    members = await sync_to_async(_make_group)()
    sockets: list[WebsocketCommunicator] = []
    seen: dict[int, list[str]] = {p.pk: [] for p in members}
    for participant in members:
        cookie = await sync_to_async(_session_cookie)(participant)
        communicator = WebsocketCommunicator(
            application, f"/ws/p/{participant.code}/", headers=[(b"origin", b"http://localhost"), cookie]
        )
        connected, _ = await communicator.connect(timeout=10)
        assert connected
        sockets.append(communicator)

    for participant, text in zip(members, OPINIONS):
        await sync_to_async(services.opinion_submit)(participant=participant, text=text)

    # Every participant watches the mediator work, then gets the statements pushed.
    for participant, socket in zip(members, sockets):
        await _wait_for(socket, 'data-view="rating"', seen=seen[participant.pk], timeout=240)
        assert any("The mediator is writing statements" in m or "Ranking the statements" in m for m in seen[participant.pk])

    round_ = await sync_to_async(Round.objects.get)(room=members[0].room)
    assert round_.phase == Round.Phase.RATING
    n = await sync_to_async(lambda: round_.room.arm.n_candidates)()
    assert await sync_to_async(Candidate.objects.filter(round=round_).count)() == n
    assert await sync_to_async(PredictedAgreement.objects.filter(candidate__round=round_).count)() == n * 3

    for participant, socket in zip(members, sockets):
        shown = await sync_to_async(
            lambda p=participant: list(
                Presentation.objects.filter(participant=p).order_by("position").values_list("candidate_id", flat=True)
            )
        )()
        for candidate_id in shown:
            await sync_to_async(services.rating_submit)(participant=participant, candidate_id=candidate_id, agreement=5, quality=6)
        await sync_to_async(services.ranking_submit)(
            participant=participant, positions={cid: i + 1 for i, cid in enumerate(shown)}
        )
        done = await _wait_for(socket, 'data-view="done"', seen=seen[participant.pk], timeout=30)
        assert "completion-code" in done

    round_ = await sync_to_async(Round.objects.get)(pk=round_.pk)
    assert round_.phase == Round.Phase.DONE and round_.outcome == Round.Outcome.COMPLETED
    assert await sync_to_async(Rating.objects.filter(candidate__round=round_).count)() == 3 * 2
    for socket in sockets:
        await socket.disconnect()
