"""Joining a study: arm and question draws, rooms, seats, presence and page views."""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from fractions import Fraction

from django.db import transaction
from django.db.models import Count, F
from django.utils import timezone

from .. import events
from ..inputs import clean_text
from ..models import AllowedExternalId, Arm, Experiment, PageView, Participant, Question, Room, RoomAssignment, Round
from .errors import JoinRefused
from .phases import room_wait_deadline_schedule, round_open_opinions

# Enough to show a stable alphabet of anonymous names in a room of up to 8.
PARTICIPANT_LABELS = ["A", "B", "C", "D", "E", "F", "G", "H"]


@dataclass(frozen=True)
class ArmDraw:
    """One balanced, seeded arm assignment, with what is needed to reproduce it."""

    arm: Arm
    seed: int
    ordinal: int
    counts: dict[str, int]
    tied_arm_ids: list[int]


def _draw_arm(*, experiment: Experiment) -> ArmDraw:
    """Balanced assignment: the arm furthest below its weighted share of rooms, ties broken by a seeded draw.

    Arms with weight 0 are never assigned (for example an arm used only as a head-to-head opponent).
    The draw for the n-th room depends only on the experiment's seed, n and the counts so far, so the
    whole sequence can be replayed from the recorded seed.
    """
    arms = list(experiment.arms.filter(weight__gt=0).annotate(room_count=Count("rooms")).order_by("id"))
    if not arms:
        raise JoinRefused("This study is not set up yet: it has no conditions.")
    # Exact fractions: comparing room_count / weight as floats could split a tie that is one.
    share = {arm.pk: Fraction(arm.room_count, arm.weight) for arm in arms}
    fewest = min(share.values())
    tied = [arm for arm in arms if share[arm.pk] == fewest]
    ordinal = experiment.rooms.count()
    # random.Random seeded with a str hashes it with SHA-512: the same in every process.
    rng = random.Random(f"{experiment.assignment_seed}:{ordinal}")
    return ArmDraw(
        arm=rng.choice(tied),
        seed=experiment.assignment_seed,
        ordinal=ordinal,
        counts={str(arm.pk): arm.room_count for arm in arms},
        tied_arm_ids=[arm.pk for arm in tied],
    )


def _choose_question(*, experiment: Experiment) -> Question:
    question_ids = list(experiment.question_pool().values_list("id", flat=True))
    if not question_ids:
        raise JoinRefused("This study is not set up yet: it has no questions.")
    # Every question once before any twice, in an order drawn from the recorded seed.
    random.Random(f"{experiment.assignment_seed}:questions").shuffle(question_ids)
    return Question.objects.get(pk=question_ids[experiment.rooms.count() % len(question_ids)])


def room_create(*, experiment: Experiment, arm: Arm | None = None, question: Question | None = None) -> Room:
    with transaction.atomic():
        draw = None if arm is not None else _draw_arm(experiment=experiment)
        if draw is not None:
            arm = draw.arm
        assert arm is not None
        ordinal = experiment.rooms.count()
        room = Room.objects.create(
            experiment=experiment,
            arm=arm,
            question=question or _choose_question(experiment=experiment),
            capacity=experiment.group_size,
        )
        RoomAssignment.objects.create(
            room=room,
            method="balanced" if draw is not None else "given",
            seed=experiment.assignment_seed,
            ordinal=ordinal,
            counts=draw.counts if draw is not None else {},
            tied_arm_ids=draw.tied_arm_ids if draw is not None else [],
        )
        Round.objects.create(room=room, index=0, seed=random.Random(f"{experiment.assignment_seed}:{room.pk}").getrandbits(31))
        if experiment.max_wait_seconds:
            room_wait_deadline_schedule(room_id=room.pk, seconds=experiment.max_wait_seconds)
    return room


def _add_participant(*, room: Room, external_id: str) -> Participant:
    taken = set(room.participants.values_list("label", flat=True))
    label = next(f"Participant {letter}" for letter in PARTICIPANT_LABELS if f"Participant {letter}" not in taken)
    now = timezone.now()
    participant = Participant.objects.create(room=room, label=label, external_id=external_id, consented_at=now)
    events.send_on_commit(events.ParticipantJoined(room_id=room.pk, participant_id=participant.pk))
    if room.participants.count() >= room.capacity:
        round_open_opinions(round_=Round.objects.select_for_update().current(room_id=room.pk))
    return participant


def participant_join(
    *, experiment: Experiment, external_id: str = "", room: Room | None = None, browser_codes: Collection[str] = ()
) -> Participant:
    """Consent and join: into `room` if given (an invite to one room), else the forming room.

    `browser_codes` are the participant codes the joining browser already holds (its session): the
    only proof of a seat. A known external id resumes that participant only from a browser that
    holds its code; from any other it is refused (external ids are not secrets). And unless the
    experiment allows several seats per browser, a browser that already holds a seat in this
    experiment is given that seat back instead of a new one.
    """
    external_id = clean_text(external_id).strip()[:200]
    with transaction.atomic():
        # Serialise joins per experiment, so two arrivals cannot both take the last seat.
        experiment = Experiment.objects.select_for_update().get(pk=experiment.pk)
        if experiment.require_allow_list and not (
            external_id and AllowedExternalId.objects.filter(experiment=experiment, external_id=external_id).exists()
        ):
            raise JoinRefused(
                "This study is open only to invited participants, and your participant id is not on its list. "
                "Please open the study from the link your recruitment panel gave you."
            )
        if external_id:
            existing = (
                Participant.objects.filter(room__experiment=experiment, external_id=external_id)
                .order_by("-id")
                .first()
            )
            if existing is not None:
                if existing.code in browser_codes:
                    return existing
                raise JoinRefused(
                    "Someone has already joined this study with this participant id, in another browser. If that was you, "
                    "please go back to that browser window; otherwise contact the researchers."
                )
        if browser_codes and not experiment.allow_several_seats_per_browser:
            mine = Participant.objects.filter(room__experiment=experiment, code__in=list(browser_codes)).order_by("-id").first()
            if mine is not None:
                return mine
        if not experiment.accepts_participants():
            raise JoinRefused("This study is not accepting participants right now.")
        if room is not None:
            room = Room.objects.select_for_update().get(pk=room.pk)
            if room.experiment_id != experiment.pk:
                raise JoinRefused("This invitation does not belong to this study.")
            if room.status != Room.Status.OPEN:
                raise JoinRefused("This room is closed: its discussion has already started or ended.")
            if room.participants.count() >= room.capacity:
                raise JoinRefused("This room is full.")
            return _add_participant(room=room, external_id=external_id)
        # The experiment lock above already serialises joins, so no room lock is needed here
        # (and PostgreSQL refuses FOR UPDATE with GROUP BY).
        forming: Room | None = (
            experiment.rooms.filter(status=Room.Status.OPEN)
            .annotate(size=Count("participants"))
            .filter(size__lt=F("capacity"))
            .order_by("id")
            .first()
        )
        return _add_participant(room=forming or room_create(experiment=experiment), external_id=external_id)


def presence_connect(*, participant_id: int) -> None:
    with transaction.atomic():
        Participant.objects.filter(pk=participant_id).update(connections=F("connections") + 1, last_seen_at=timezone.now())
        room_id = Participant.objects.values_list("room_id", flat=True).get(pk=participant_id)
        events.send_on_commit(events.PresenceChanged(room_id=room_id))


def presence_disconnect(*, participant_id: int) -> None:
    with transaction.atomic():
        Participant.objects.filter(pk=participant_id, connections__gt=0).update(
            connections=F("connections") - 1, last_seen_at=timezone.now()
        )
        room_id = Participant.objects.values_list("room_id", flat=True).get(pk=participant_id)
        events.send_on_commit(events.PresenceChanged(room_id=room_id))



def page_view_record(*, participant_id: int, view: str, round_id: int | None, phase: str = "") -> bool:
    """Record that a participant was shown a screen; a repeat of the screen they were already on is not a new view."""
    with transaction.atomic():
        last = PageView.objects.filter(participant_id=participant_id).order_by("-shown_at", "-id").first()
        if last is not None and last.view == view and last.round_id == round_id:
            return False
        PageView.objects.create(participant_id=participant_id, view=view, round_id=round_id, phase=phase)
    return True


@transaction.atomic
def participant_persona_record(*, room_id: int, external_id: str, persona: dict[str, object]) -> bool:
    """Mark a simulated participant (a bot of simulate_cohort) and keep the persona it played.

    Bots join through the real invite link like people, so they are marked after joining, by their room and
    external id (the bot's label). Returns False when no such participant joined (the bot never got in)."""
    return bool(Participant.objects.filter(room_id=room_id, external_id=external_id).update(simulated_persona=persona))
