"""Recovery of lost tasks: the broker (Redis) may lose a task, the database says what should happen.

recovery.rounds_recover re-enqueues a mediation that shows no sign of life, fires phase and
group-wait deadlines whose timers never came, and does each once however often it runs;
deliberation.recovery runs it periodically in workers (a thread) and in the embedded server
(a task of its loop); dispatch.enqueue and the rate limiter keep a broker outage from turning
a committed write into an error. tests/deliberation/test_fault_redis_restart.py shows the
whole of it with a real Redis restart.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery import current_app
from django.utils import timezone

from deliberation import dispatch, recovery, services
from deliberation.models import MAX_MEDIATION_ATTEMPTS, Candidate, Opinion, Participant, Release, Room, Round
from deliberation.tasks import mediate_round
from tests.conftest import OPINIONS
from tests.factories import ExperimentFactory

pytestmark = pytest.mark.django_db

STALL = timedelta(minutes=5)


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[Any]]]:
    """What the services hand to dispatch.enqueue (after commit), instead of a real broker."""
    calls: list[tuple[str, list[Any]]] = []

    def record(name: str, *, args: list[Any], countdown: float = 0.0) -> bool:
        calls.append((str(name), list(args)))
        return True

    monkeypatch.setattr(dispatch, "enqueue", record)
    return calls


def _mediating_round(group, *, idle_for: timedelta) -> Round:
    for persona, text in zip(group, OPINIONS):
        services.opinion_submit(participant=persona.participant, text=text)
    round_ = Round.objects.get(room=group[0].participant.room)
    assert round_.phase == Round.Phase.MEDIATING
    Round.objects.filter(pk=round_.pk).update(progress_at=timezone.now() - idle_for)
    return round_


def test_a_mediation_whose_task_was_lost_is_enqueued_again_once(group, enqueued, django_capture_on_commit_callbacks) -> None:
    round_ = _mediating_round(group, idle_for=STALL + timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True):
        report = recovery.rounds_recover(stalled_after=STALL)
    assert report.requeued == [round_.pk] and not report.failed
    assert enqueued == [(mediate_round.name, [round_.pk])]
    round_.refresh_from_db()
    assert round_.phase == Round.Phase.MEDIATING and round_.progress_stage == "queued"
    # The requeue restarts the stall clock: sweeping again (from this or another worker) does nothing.
    with django_capture_on_commit_callbacks(execute=True):
        assert not recovery.rounds_recover(stalled_after=STALL)
    assert len(enqueued) == 1


def test_a_mediation_that_shows_progress_or_beats_is_left_alone(group, enqueued, django_capture_on_commit_callbacks) -> None:
    round_ = _mediating_round(group, idle_for=STALL - timedelta(seconds=30))
    with django_capture_on_commit_callbacks(execute=True):
        assert not recovery.rounds_recover(stalled_after=STALL)
    # A running task beats (recovery.heartbeat), however long its model takes to load.
    Round.objects.filter(pk=round_.pk).update(progress_at=timezone.now() - STALL * 2)
    assert services.mediation_heartbeat(round_id=round_.pk)
    with django_capture_on_commit_callbacks(execute=True):
        assert not recovery.rounds_recover(stalled_after=STALL)
    assert enqueued == []


def test_a_round_with_its_statements_is_not_mediated_again(group, enqueued) -> None:
    round_ = _mediating_round(group, idle_for=STALL * 2)
    Candidate.objects.create(round=round_, index=0, text="A statement", backend="t", model_id="m", seed=1, prompt="p")
    assert not recovery.rounds_recover(stalled_after=STALL)
    assert enqueued == []


def test_a_mediation_out_of_attempts_ends_as_failed_instead_of_waiting_forever(group, enqueued) -> None:
    round_ = _mediating_round(group, idle_for=STALL * 2)
    Round.objects.filter(pk=round_.pk).update(mediation_attempts=MAX_MEDIATION_ATTEMPTS)
    report = recovery.rounds_recover(stalled_after=STALL)
    assert report.failed == [round_.pk] and not report.requeued
    round_.refresh_from_db()
    assert round_.phase == Round.Phase.DONE and round_.outcome == Round.Outcome.FAILED
    assert "no progress since" in round_.mediation_error
    assert enqueued == []


def test_an_overdue_phase_deadline_fires_without_its_timer(group, enqueued) -> None:
    for persona, text in zip(group[:2], OPINIONS):
        services.opinion_submit(participant=persona.participant, text=text)
    round_ = Round.objects.get(room=group[0].participant.room)
    # Just past the deadline, the timer still has its grace period to fire by itself.
    Round.objects.filter(pk=round_.pk).update(phase_deadline=timezone.now() - recovery.DEADLINE_GRACE / 2)
    assert not recovery.rounds_recover(stalled_after=STALL)
    Round.objects.filter(pk=round_.pk).update(phase_deadline=timezone.now() - recovery.DEADLINE_GRACE * 2)
    report = recovery.rounds_recover(stalled_after=STALL)
    assert report.deadlines == {round_.pk: "mediating"}
    round_.refresh_from_db()
    assert round_.phase == Round.Phase.MEDIATING
    assert Participant.objects.get(pk=group[2].participant.pk).dropped_out_at is not None


def test_an_overdue_wait_for_a_group_fires_without_its_timer(enqueued) -> None:
    experiment = ExperimentFactory(slug="waiting", group_size=3, max_wait_seconds=60)
    participant = services.participant_join(experiment=experiment, external_id="alone")
    room = participant.room
    assert not recovery.rounds_recover(stalled_after=STALL)
    Room.objects.filter(pk=room.pk).update(created_at=timezone.now() - timedelta(seconds=60) - recovery.DEADLINE_GRACE * 2)
    report = recovery.rounds_recover(stalled_after=STALL)
    assert report.waits == {room.pk: "released"}
    assert Release.objects.filter(participant=participant).exists()
    assert not recovery.rounds_recover(stalled_after=STALL)


def test_an_enqueue_while_the_broker_is_down_is_logged_not_raised(group, settings, monkeypatch, caplog, django_capture_on_commit_callbacks) -> None:
    from kombu.exceptions import OperationalError

    settings.USE_CELERY = True

    def broker_down(*args: object, **kwargs: object) -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(current_app, "send_task", broker_down)
    assert dispatch.enqueue(dispatch.TaskName.MEDIATE_ROUND, args=[1]) is False
    # The last opinion commits and starts mediation; the failed enqueue does not undo or hide that.
    for persona, text in zip(group[:2], OPINIONS):
        services.opinion_submit(participant=persona.participant, text=text)
    with caplog.at_level(logging.ERROR, logger="deliberation.dispatch"), django_capture_on_commit_callbacks(execute=True):
        services.opinion_submit(participant=group[2].participant, text=OPINIONS[2])
    assert "Could not enqueue deliberation.tasks.mediate_round" in caplog.text
    assert Opinion.objects.filter(participant=group[2].participant).exists()
    assert Round.objects.get(room=group[0].participant.room).phase == Round.Phase.MEDIATING


def test_the_rate_limiter_lets_requests_through_when_its_cache_is_down(monkeypatch, caplog) -> None:
    from deliberation import ratelimit

    class CacheDown:
        def add(self, *args: object, **kwargs: object) -> None:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(ratelimit, "caches", {ratelimit.CACHE_ALIAS: CacheDown()})
    with caplog.at_level(logging.WARNING, logger="deliberation.ratelimit"):
        assert ratelimit.hit(scope="submit", key="someone", limit=1)
    assert "not checked" in caplog.text


# --- The periodic sweep ----------------------------------------------------------------------


@pytest.fixture
def sweeps(settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Semaphore]:
    """Turn the sweep on (every 10 ms) with a counting stand-in for the database work; stop it after."""
    settings.CONCORD_RECOVERY_INTERVAL_SECONDS = 0.01
    done = threading.Semaphore(0)
    monkeypatch.setattr(recovery, "sweep_once", lambda: done.release())
    yield done
    recovery.stop()


def test_the_sweep_is_off_unless_configured(settings) -> None:
    settings.CONCORD_RECOVERY_INTERVAL_SECONDS = 0
    assert not recovery.start_in_thread()


def test_a_worker_sweeps_on_a_thread_from_the_moment_it_is_ready(sweeps: threading.Semaphore) -> None:
    from config.celery import start_recovery_sweep

    start_recovery_sweep()  # the worker_ready handler
    for _ in range(3):
        assert sweeps.acquire(timeout=30)
    assert not recovery.start_in_thread()  # once per process


@pytest.mark.asyncio
async def test_the_embedded_server_sweeps_on_its_own_loop(sweeps: threading.Semaphore, settings, monkeypatch) -> None:
    from config.asgi import RememberServerLoop

    settings.USE_CELERY = False
    monkeypatch.setattr(dispatch, "_server_loop", None)  # this test's loop ends with the test
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    # Any connection to the server starts it, once.
    await RememberServerLoop(app)({"type": "http"}, None, None)
    await RememberServerLoop(app)({"type": "http"}, None, None)
    assert seen == ["http", "http"]
    for _ in range(3):
        assert await asyncio.to_thread(sweeps.acquire, timeout=30)
    assert not recovery.start_on_loop(asyncio.get_running_loop())
    recovery.stop()
    await asyncio.sleep(0.05)  # let the loop run the cancellation before it closes


def test_sweep_once_survives_a_database_error(monkeypatch, caplog) -> None:
    def database_down(**kwargs: object) -> None:
        raise RuntimeError("could not connect to server")

    monkeypatch.setattr(recovery, "rounds_recover", database_down)
    with caplog.at_level(logging.ERROR, logger="deliberation.recovery"):
        assert recovery.sweep_once() is None
    assert "Recovery sweep failed" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_running_mediation_beats_while_it_works(group, enqueued, settings) -> None:
    settings.CONCORD_MEDIATION_STALL_SECONDS = 3  # a beat every second
    round_ = _mediating_round(group, idle_for=timedelta(hours=1))
    before = Round.objects.get(pk=round_.pk).progress_at
    with recovery.heartbeat(round_id=round_.pk):
        deadline = time.monotonic() + 60
        while Round.objects.get(pk=round_.pk).progress_at == before:
            assert time.monotonic() < deadline, "no heartbeat within 60 s"
            time.sleep(0.1)


def test_a_side_by_side_round_whose_model_task_was_lost_after_the_human_statement_is_mediated_again(
    enqueued, django_capture_on_commit_callbacks
) -> None:
    """Human vs model: the mediator's statement is in, the model's task was lost; the sweep queues the model again
    (the human statement alone must not count as "the statements are in"), and once the model's are stored, it
    leaves the round alone."""
    from tests.factories import ArmFactory

    experiment = ExperimentFactory(slug="h2h-lost", group_size=4)
    experiment.arms.all().delete()
    model_arm = ArmFactory(experiment=experiment, name="model", weight=0, n_candidates=4, k_shown=2)
    ArmFactory(experiment=experiment, name="human-vs-model", human_mediator=True, compare_with=model_arm, k_shown=3)
    members = [services.participant_join(experiment=experiment, external_id=f"h2h-{i}") for i in range(4)]
    round_ = Round.objects.current(room_id=members[0].room_id)
    mediator = Participant.objects.get(pk=round_.mediator_id)
    for member, text in zip((m for m in members if m.pk != mediator.pk), OPINIONS):
        services.opinion_submit(participant=member, text=text)
    services.mediator_statement_submit(participant=mediator, text="We agree public services need money and differ on who should pay.")
    enqueued.clear()  # the task queued when mediation began: lost with the broker
    Round.objects.filter(pk=round_.pk).update(progress_at=timezone.now() - STALL * 2)
    with django_capture_on_commit_callbacks(execute=True):
        report = recovery.rounds_recover(stalled_after=STALL)
    assert report.requeued == [round_.pk]
    assert enqueued == [(mediate_round.name, [round_.pk])]
    assert mediate_round.apply(args=[round_.pk]).get() == "stored"
    round_.refresh_from_db()
    assert round_.phase == Round.Phase.RATING
    assert Candidate.objects.filter(round=round_, author=mediator).count() == 1
    assert Candidate.objects.filter(round=round_, author__isnull=True, shown=True).count() == 2


def test_a_side_by_side_round_with_the_models_statements_waits_for_the_human_not_the_model(enqueued) -> None:
    from tests.factories import ArmFactory

    experiment = ExperimentFactory(slug="h2h-waits", group_size=4)
    experiment.arms.all().delete()
    model_arm = ArmFactory(experiment=experiment, name="model", weight=0, n_candidates=4, k_shown=2)
    ArmFactory(experiment=experiment, name="human-vs-model", human_mediator=True, compare_with=model_arm, k_shown=3)
    members = [services.participant_join(experiment=experiment, external_id=f"h2w-{i}") for i in range(4)]
    round_ = Round.objects.current(room_id=members[0].room_id)
    for member, text in zip((m for m in members if m.pk != round_.mediator_id), OPINIONS):
        services.opinion_submit(participant=member, text=text)
    assert mediate_round.apply(args=[round_.pk]).get() == "stored"
    enqueued.clear()
    Round.objects.filter(pk=round_.pk).update(progress_at=timezone.now() - STALL * 2)
    assert not recovery.rounds_recover(stalled_after=STALL).requeued
    assert enqueued == []
