"""Migration 0009 backfills opinions.generation_position for rounds mediated before it was recorded."""

from __future__ import annotations

import importlib

import pytest
from django.apps import apps

from deliberation.models import Candidate, Opinion
from tests.factories import ParticipantFactory, RoomFactory

pytestmark = pytest.mark.django_db
migration = importlib.import_module("deliberation.migrations.0009_package_reproducibility")


def test_positions_follow_the_participants_the_candidates_quote_in_id_order() -> None:
    room = RoomFactory()
    round_ = room.rounds.get()
    members = [ParticipantFactory(room=room) for _ in range(4)]
    opinions = [Opinion.objects.create(round=round_, participant=m, text=f"opinion {i}") for i, m in enumerate(members)]
    # The third member's opinion was left out (exclusion protocol): no candidate quotes it.
    quoted = [members[3].pk, members[0].pk, members[1].pk]
    for index in range(2):
        Candidate.objects.create(
            round=round_, index=index, text="s", backend="b", model_id="m", seed=1, prompt="p",
            opinion_order=quoted if index == 0 else list(reversed(quoted)),
        )
    migration.backfill_generation_positions(apps, None)
    positions = {o.participant_id: o.generation_position for o in Opinion.objects.filter(pk__in=[o.pk for o in opinions])}
    assert positions == {members[0].pk: 0, members[1].pk: 1, members[2].pk: None, members[3].pk: 2}
