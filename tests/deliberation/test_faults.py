"""Faults: nothing a participant submitted is lost, and the database is what guarantees it."""

from __future__ import annotations

import threading

import psycopg2
import pytest
from django.db import connection, connections
from django.urls import reverse

from deliberation import services
from deliberation.models import Candidate, Opinion, Presentation, Rating, Round
from tests.conftest import OPINIONS

pytestmark = pytest.mark.django_db(transaction=True)


def _postgres_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (`make test` starts one): SQLite has no server connection to drop")


def _rating_round(group) -> tuple[Round, list[int]]:
    for persona, text in zip(group, OPINIONS):
        services.opinion_submit(participant=persona.participant, text=text)
    round_ = Round.objects.get(room=group[0].participant.room)
    # The shortest path to an open rating phase: two shown candidates, as mediation would store them.
    shown = []
    for index in range(2):
        candidate = Candidate.objects.create(
            round=round_, index=index, text=f"Statement {index}", backend="t", model_id="m", seed=index, prompt="p", rank=index + 1, shown=True
        )
        shown.append(candidate.pk)
        for persona in group:
            Presentation.objects.create(participant=persona.participant, candidate=candidate, position=index)
    Round.objects.filter(pk=round_.pk).update(phase=Round.Phase.RATING)
    return round_, shown


def test_two_concurrent_identical_ratings_store_exactly_one(group) -> None:
    _round, shown = _rating_round(group)
    participant = group[0].participant
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def submit(agreement: int) -> None:
        try:
            barrier.wait(timeout=10)
            services.rating_submit(participant=participant, candidate_id=shown[0], agreement=agreement, quality=4)
        except BaseException as error:  # noqa: BLE001 - surfaced below
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=submit, args=(value,)) for value in (3, 6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    ratings = list(Rating.objects.filter(participant=participant, candidate_id=shown[0]))
    assert len(ratings) == 1 and ratings[0].agreement in (3, 6)


def test_two_concurrent_opinion_submits_store_exactly_one(group) -> None:
    participant = group[0].participant
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def submit(text: str) -> None:
        try:
            barrier.wait(timeout=10)
            services.opinion_submit(participant=participant, text=text)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=submit, args=(text,)) for text in OPINIONS[:2]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert Opinion.objects.filter(participant=participant).count() == 1


def test_a_dropped_database_connection_gives_a_clean_error_and_the_retry_succeeds(participant) -> None:
    _postgres_only()
    url = reverse("opinion_submit", args=[participant.participant.code])
    participant.client.get(reverse("participant", args=[participant.participant.code]))
    connection.ensure_connection()
    backend_pid = connection.connection.info.backend_pid
    settings_dict = connection.settings_dict
    killer = psycopg2.connect(
        dbname=settings_dict["NAME"], user=settings_dict["USER"], host=settings_dict["HOST"] or "127.0.0.1", port=settings_dict["PORT"] or 5432
    )
    killer.autocommit = True
    with killer.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [backend_pid])
    killer.close()

    failed = participant.client.post(url, {"text": OPINIONS[0]})
    assert failed.status_code == 503
    assert "Please try again" in failed.content.decode() and "Traceback" not in failed.content.decode()
    retried = participant.client.post(url, {"text": OPINIONS[0]})
    assert retried.status_code == 302
    assert Opinion.objects.filter(participant=participant.participant).count() == 1
