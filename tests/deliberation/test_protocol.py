"""The Habermas Machine protocol through the pages members use: positions, critique and revision, the final
preference, and the human mediator arm (docs/habermas-protocol.md)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from deliberation import selectors, services
from deliberation.models import (
    Candidate,
    Experiment,
    FinalPreference,
    Opinion,
    Participant,
    Position,
    PredictedAgreement,
    Ranking,
    Room,
    Round,
)
from deliberation.tasks import mediate_round
from tests.conftest import OPINIONS, client_for
from tests.factories import ArmFactory, ExperimentFactory, QuestionFactory

pytestmark = pytest.mark.django_db

CRITIQUES = [
    "It leaves out where the money should go; please say it must fund schools and hospitals.",
    "It sounds as if we all want higher taxes. Say clearly that some of us would rather cut waste.",
    "Fine, but it should mention closing loopholes, which matters more than the headline rate.",
]


def _page(client: Client, participant: Participant) -> str:
    return client.get(reverse("participant", args=[participant.code])).content.decode()


def _view(client: Client, participant: Participant) -> str:
    match = re.search(r'data-view="([a-z_]+)"', _page(client, participant))
    assert match is not None
    return match.group(1)


def _join(experiment: Experiment, count: int) -> list[tuple[Participant, Client]]:
    members = [services.participant_join(experiment=experiment, external_id=f"hm-{i}") for i in range(count)]
    return [(member, client_for(member)) for member in members]


def _rate_and_rank(member: Participant, client: Client, *, prefer_last: bool = False) -> None:
    round_ = Round.objects.current(room_id=member.room_id)
    shown = list(member.presentations.filter(candidate__round=round_).order_by("position").values_list("candidate_id", flat=True))
    assert shown, "a rater is shown statements"
    for candidate_id in shown:
        response = client.post(reverse("rating_submit", args=[member.code, candidate_id]), {"agreement": "5", "quality": "4"})
        assert response.status_code == 302
    # Ranked by candidate id (not by the member's own presentation order), so rankings can be compared.
    order = sorted(shown, reverse=prefer_last)
    response = client.post(reverse("ranking_submit", args=[member.code]), {f"rank_{cid}": str(i + 1) for i, cid in enumerate(order)})
    assert response.status_code == 302


def test_a_two_round_protocol_with_positions_through_the_pages() -> None:
    question = QuestionFactory(affirming_statement="Taxes on the rich should rise.", negating_statement="Taxes on the rich should not rise.")
    experiment = ExperimentFactory(slug="habermas", group_size=3, critique_rounds=1, ask_positions=True)
    experiment.questions.set([question])
    members = _join(experiment, 3)
    room = members[0][0].room

    # Before the opinion: the position, on a scale from the question's negating to its affirming statement.
    member, client = members[0]
    page = _page(client, member)
    assert 'data-view="position_before"' in page and "Taxes on the rich should not rise." in page
    refused = client.post(reverse("opinion_submit", args=[member.code]), {"text": OPINIONS[0]})
    assert refused.status_code == 422 and "your position" in refused.content.decode()
    for i, (member, client) in enumerate(members):
        assert client.post(reverse("position_submit", args=[member.code]), {"position": str(2 + i), "strength": "6"}).status_code == 302
        assert _view(client, member) == "opinions"
        assert client.post(reverse("opinion_submit", args=[member.code]), {"text": OPINIONS[i]}).status_code == 302
    first = Round.objects.get(room=room, index=0)
    assert first.phase == Round.Phase.MEDIATING
    assert mediate_round.apply(args=[first.pk]).get() == "stored"

    # Rate and rank the first statements: members who ranked wait for the others (not "done": a round follows).
    _rate_and_rank(*members[0], prefer_last=True)
    assert _view(members[0][1], members[0][0]) == "ranked"
    assert Participant.objects.get(pk=members[0][0].pk).finished_at is None
    _rate_and_rank(*members[1], prefer_last=True)
    _rate_and_rank(*members[2])
    first.refresh_from_db()
    assert first.phase == Round.Phase.DONE and first.outcome == Round.Outcome.COMPLETED
    assert Room.objects.get(pk=room.pk).status == Room.Status.RUNNING

    # The critique round: everyone sees the Borda winner of the rankings and writes a critique.
    critique_round = Round.objects.get(room=room, index=1)
    shown = list(first.candidates.filter(shown=True).order_by("rank"))
    # Two members put the later statement first, one the earlier: with two shown statements the later wins.
    orders = [Ranking.objects.get(participant=m, round=first).order for m, _ in members]
    assert orders[0][0] == orders[1][0] == max(c.pk for c in shown) != orders[2][0]
    assert critique_round.kind == Round.Kind.CRITIQUE and critique_round.previous_winner_id == orders[0][0]
    assert critique_round.phase == Round.Phase.OPINIONS and critique_round.phase_deadline is not None
    assert first.winning_candidate().pk == orders[0][0] and len(shown) == 2
    member, client = members[0]
    page = _page(client, member)
    assert 'data-view="opinions"' in page and "Your critique" in page
    assert critique_round.previous_winner.text.split()[0] in page
    # Drafts survive a reload, as in the opinion phase.
    client.post(reverse("opinion_draft", args=[member.code]), {"text": "half a critique"})
    assert "half a critique" in _page(client, member)
    for i, (member, client) in enumerate(members):
        assert client.post(reverse("opinion_submit", args=[member.code]), {"text": CRITIQUES[i]}).status_code == 302
    critique_round.refresh_from_db()
    assert critique_round.phase == Round.Phase.MEDIATING
    assert mediate_round.apply(args=[critique_round.pk]).get() == "stored"

    # The revision prompt carries the opinions, the previous statement and the critiques, neutralised alike.
    revised = list(Candidate.objects.filter(round=critique_round))
    assert revised and all("<critique n=" in c.prompt and "Previous consensus statement" in c.prompt for c in revised)
    assert all(OPINIONS[0][:30] in c.prompt and CRITIQUES[0][:30] in c.prompt for c in revised)
    assert len({tuple(c.opinion_order) for c in revised}) > 1, "orders are shuffled per sample"
    assert PredictedAgreement.objects.filter(candidate__round=critique_round).count() == 3 * len(revised)

    for member, client in members:
        _rate_and_rank(member, client)
    critique_round.refresh_from_db()
    assert critique_round.phase == Round.Phase.DONE

    # Closing: the final preference (first vs revised statement) and the position after.
    member, client = members[0]
    page = _page(client, member)
    assert 'data-view="closing"' in page and "completion-code" not in page
    first_winner, revised_winner = first.winning_candidate(), critique_round.winning_candidate()
    assert first_winner.text in page and revised_winner.text in page
    for i, (member, client) in enumerate(members):
        preferred = revised_winner.pk if i < 2 else first_winner.pk
        response = client.post(reverse("closing_submit", args=[member.code]), {"preferred": str(preferred), "position": "5", "strength": str(3 + i)})
        assert response.status_code == 302
        assert 'class="completion-code"' in _page(client, member)
    preferences = list(FinalPreference.objects.filter(participant__room=room))
    assert [p.prefers_revision for p in preferences] == [True, True, False]
    assert {p.first_candidate_id for p in preferences} == {first_winner.pk}
    assert Position.objects.filter(participant__room=room, stage=Position.Stage.BEFORE).count() == 3
    after = Position.objects.filter(participant__room=room, stage=Position.Stage.AFTER)
    assert sorted(p.strength for p in after) == [3, 4, 5] and {p.round_id for p in after} == {critique_round.pk}
    assert Room.objects.get(pk=room.pk).status == Room.Status.CLOSED


def test_without_the_protocol_a_room_plays_one_round_as_before(group) -> None:
    for i, persona in enumerate(group):
        services.opinion_submit(participant=persona.participant, text=OPINIONS[i])
    round_ = Round.objects.get(room=group[0].participant.room)
    mediate_round.apply(args=[round_.pk])
    _rate_and_rank(group[0].participant, group[0].client)
    assert Participant.objects.get(pk=group[0].participant.pk).finished_at is not None
    assert _view(group[0].client, group[0].participant) == "done"
    for persona in group[1:]:
        _rate_and_rank(persona.participant, persona.client)
    assert Round.objects.filter(room=round_.room).count() == 1
    assert Room.objects.get(pk=round_.room_id).status == Room.Status.CLOSED


def test_a_critique_deadline_drops_the_silent_and_revises_for_the_rest() -> None:
    experiment = ExperimentFactory(slug="critique-deadline", group_size=3, critique_rounds=1)
    members = _join(experiment, 3)
    for i, (member, _) in enumerate(members):
        services.opinion_submit(participant=member, text=OPINIONS[i])
    first = Round.objects.current(room_id=members[0][0].room_id)
    mediate_round.apply(args=[first.pk])
    for member, client in members:
        _rate_and_rank(member, client)
    critique_round = Round.objects.current(room_id=members[0][0].room_id)
    for i, (member, _) in enumerate(members[:2]):
        services.opinion_submit(participant=member, text=CRITIQUES[i])
    Round.objects.filter(pk=critique_round.pk).update(phase_deadline=timezone.now() - timedelta(seconds=1))
    assert services.round_deadline_fire(round_id=critique_round.pk, phase=Round.Phase.OPINIONS) == "mediating"
    assert Participant.objects.get(pk=members[2][0].pk).dropout_reason == "no opinion before the deadline"
    assert mediate_round.apply(args=[critique_round.pk]).get() == "stored"
    assert _view(members[2][1], members[2][0]) == "dropped"
    assert _view(members[0][1], members[0][0]) == "rating"


def _human_arm_experiment(slug: str, **fields: object) -> Experiment:
    experiment = ExperimentFactory(slug=slug, group_size=3, **fields)
    experiment.arms.all().delete()
    ArmFactory(experiment=experiment, name="human", human_mediator=True)
    return experiment


def test_a_human_mediator_writes_the_statement_and_members_rate_it_blind() -> None:
    experiment = _human_arm_experiment("human-arm", critique_rounds=1)
    members = _join(experiment, 3)
    first = Round.objects.current(room_id=members[0][0].room_id)
    assert first.mediator_id is not None
    mediator, mediator_client = next((m, c) for m, c in members if m.pk == first.mediator_id)
    writers = [(m, c) for m, c in members if m.pk != first.mediator_id]
    assert _view(mediator_client, mediator) == "mediator"
    refused = mediator_client.post(reverse("opinion_submit", args=[mediator.code]), {"text": OPINIONS[0]})
    assert refused.status_code == 422
    for i, (member, client) in enumerate(writers):
        client.post(reverse("opinion_submit", args=[member.code]), {"text": OPINIONS[i]})
    first.refresh_from_db()
    assert first.phase == Round.Phase.MEDIATING and first.phase_deadline is not None
    assert mediate_round.apply(args=[first.pk]).get() == "nothing to do"  # no model writes in this arm
    page = _page(mediator_client, mediator)
    assert OPINIONS[0] in page and OPINIONS[1] in page and 'id="mediator-form"' in page
    statement = "We agree that public services need money, and we disagree on whether higher rates on the rich are the way."
    assert mediator_client.post(reverse("mediator_statement_submit", args=[mediator.code]), {"text": statement}).status_code == 302
    candidate = Candidate.objects.get(round=first)
    assert candidate.author_id == mediator.pk and candidate.backend == "human" and candidate.shown
    member, client = writers[0]
    page = _page(client, member)
    # Blind: the same statement card as a model's, with nothing naming its author.
    assert 'data-view="rating"' in page and statement in page and "Statement 1" in page
    assert "human" not in page.lower() and mediator.label not in page
    for member, client in writers:
        _rate_and_rank(member, client)
    critique_round = Round.objects.current(room_id=mediator.room_id)
    assert critique_round.index == 1 and critique_round.mediator_id == mediator.pk
    for i, (member, _) in enumerate(writers):
        services.opinion_submit(participant=member, text=CRITIQUES[i])
    page = _page(mediator_client, mediator)
    assert CRITIQUES[0] in page and CRITIQUES[1] in page and statement in page
    services.mediator_statement_submit(participant=mediator, text=statement + " We also want loopholes closed.")
    for member, client in writers:
        _rate_and_rank(member, client)
    member, client = writers[0]
    assert _view(client, member) == "closing"
    revised = Candidate.objects.get(round=critique_round)
    client.post(reverse("closing_submit", args=[member.code]), {"preferred": str(revised.pk)})
    assert FinalPreference.objects.get(participant=member).prefers_revision
    assert _view(mediator_client, mediator) == "done"


def test_a_human_mediator_who_writes_nothing_in_time_fails_the_round() -> None:
    experiment = _human_arm_experiment("human-late")
    members = _join(experiment, 3)
    round_ = Round.objects.current(room_id=members[0][0].room_id)
    writers = [m for m, _ in members if m.pk != round_.mediator_id]
    for i, member in enumerate(writers):
        services.opinion_submit(participant=member, text=OPINIONS[i])
    assert Opinion.objects.filter(round=round_).count() == 2
    Round.objects.filter(pk=round_.pk).update(phase_deadline=timezone.now() - timedelta(seconds=1))
    assert services.round_deadline_fire(round_id=round_.pk, phase=Round.Phase.MEDIATING) == "failed"
    round_.refresh_from_db()
    assert round_.outcome == Round.Outcome.FAILED and "human mediator" in round_.mediation_error


def test_the_position_is_asked_only_when_the_study_asks_for_it(participant) -> None:
    response = participant.client.post(reverse("position_submit", args=[participant.participant.code]), {"position": "3", "strength": "3"})
    assert response.status_code == 422 and "does not ask" in response.content.decode()
    bad = ExperimentFactory(slug="positions", ask_positions=True)
    member = services.participant_join(experiment=bad)
    with pytest.raises(services.InvalidInput):
        services.position_before_submit(participant=member, position="9", strength="3")


def test_the_mediators_screen_is_pushed_again_when_the_phase_changes() -> None:
    """The mediator's one screen (waiting, writing, rated) must re-render over the socket at each phase."""
    from deliberation import selectors

    experiment = _human_arm_experiment("human-push")
    members = _join(experiment, 3)
    round_ = Round.objects.current(room_id=members[0][0].room_id)
    mediator = Participant.objects.get(pk=round_.mediator_id)
    waiting = selectors.room_state_for(mediator)
    for i, member in enumerate(m for m, _ in members if m.pk != mediator.pk):
        services.opinion_submit(participant=member, text=OPINIONS[i])
    writing = selectors.room_state_for(mediator)
    assert waiting.view == writing.view == "mediator" and waiting.main_key() != writing.main_key()


@pytest.mark.parametrize("human_first", [True, False])
def test_human_and_model_statements_side_by_side_for_head_to_head_preferences(human_first: bool) -> None:
    from deliberation.models import PairwisePreference

    experiment = ExperimentFactory(slug=f"human-h2h-{human_first}", group_size=4)
    experiment.arms.all().delete()
    model_arm = ArmFactory(experiment=experiment, name="model", weight=0, n_candidates=4, k_shown=2)
    ArmFactory(experiment=experiment, name="human-vs-model", human_mediator=True, compare_with=model_arm, k_shown=3)
    members = _join(experiment, 4)
    round_ = Round.objects.current(room_id=members[0][0].room_id)
    mediator = Participant.objects.get(pk=round_.mediator_id)
    writers = [(m, c) for m, c in members if m.pk != mediator.pk]
    for i, (member, _) in enumerate(writers):
        services.opinion_submit(participant=member, text=OPINIONS[i])
    statement = "We agree that public services need money, and we differ on whether the rich should pay more of it."
    if human_first:
        services.mediator_statement_submit(participant=mediator, text=statement)
        assert Round.objects.get(pk=round_.pk).phase == Round.Phase.MEDIATING  # waits for the model
        assert mediate_round.apply(args=[round_.pk]).get() == "stored"
    else:
        assert mediate_round.apply(args=[round_.pk]).get() == "stored"
        assert Round.objects.get(pk=round_.pk).phase == Round.Phase.MEDIATING  # waits for the mediator
        services.mediator_statement_submit(participant=mediator, text=statement)
    round_.refresh_from_db()
    assert round_.phase == Round.Phase.RATING
    human = Candidate.objects.get(round=round_, author=mediator)
    model_shown = list(Candidate.objects.filter(round=round_, author__isnull=True, shown=True))
    assert len(model_shown) == 2 and all(c.source_arm_id == model_arm.pk for c in model_shown)
    member, client = writers[0]
    page = _page(client, member)
    assert statement in page and all(c.text.split()[0] in page for c in model_shown)
    # Each model statement is paired with the human one for a preference; rating and ranking as usual.
    pairs = selectors.preference_pairs(participant=member, round_=round_)
    assert sorted(tuple(sorted(p)) for p in pairs) == sorted(tuple(sorted((human.pk, c.pk))) for c in model_shown)
    for member, client in writers:
        for first, second in selectors.preference_pairs(participant=member, round_=round_):
            model_one = second if first == human.pk else first
            client.post(reverse("preference_submit", args=[member.code]), {"candidate_a": first, "candidate_b": second, "preferred": model_one})
        _rate_and_rank(member, client)
    round_.refresh_from_db()
    assert round_.phase == Round.Phase.DONE
    assert PairwisePreference.objects.filter(round=round_).count() == 3 * 2
    from research.analytics_protocol import load_protocol

    data = load_protocol(experiment)
    assert data.ai_over_human == [True] * 6


def _exported_statuses(experiment: Experiment, tmp_path) -> dict[str, dict[str, str]]:
    from io import StringIO
    from pathlib import Path

    from django.core.management import call_command

    from research.models import DatasetExport
    from tests.research.study import read_export_zip

    out = tmp_path / f"export-{DatasetExport.objects.count()}"
    call_command("export_dataset", "--experiment", experiment.slug, "--format", "csv", "--out", str(out), "--as-user", experiment.owner.username,
                 stdout=StringIO())
    tables, _, _ = read_export_zip(Path(DatasetExport.objects.order_by("-id").first().path), "csv")
    return {row["label"]: row for row in tables["participants"]}


def test_the_closing_questions_have_a_timer_and_a_member_who_misses_it_is_recorded(
    tmp_path, django_capture_on_commit_callbacks, monkeypatch
) -> None:
    """After the last round the closing questions run on the round's timer, fired like the other phases' (the
    ROUND_DEADLINE task, or the recovery sweep when that task was lost). A member who has not answered by then took
    part to the end: they finish with the step missing (closing_missed), a partial code, and the export says so."""
    from deliberation import dispatch, recovery
    from deliberation.dispatch import TaskName

    experiment = ExperimentFactory(slug="closing-timer", group_size=3, ask_positions=True, rating_seconds=120)
    members = _join(experiment, 3)
    for i, (member, client) in enumerate(members):
        client.post(reverse("position_submit", args=[member.code]), {"position": str(2 + i), "strength": "5"})
        client.post(reverse("opinion_submit", args=[member.code]), {"text": OPINIONS[i]})
    round_ = Round.objects.current(room_id=members[0][0].room_id)
    assert mediate_round.apply(args=[round_.pk]).get() == "stored"
    scheduled: list[tuple[str, list[object], float]] = []
    monkeypatch.setattr(dispatch, "enqueue", lambda name, *, args, countdown=0.0: scheduled.append((str(name), list(args), countdown)) or True)
    with django_capture_on_commit_callbacks(execute=True):
        for member, client in members:
            _rate_and_rank(member, client)
    round_.refresh_from_db()
    assert round_.phase == Round.Phase.DONE and round_.phase_deadline is not None
    assert (TaskName.ROUND_DEADLINE.value, [round_.pk, "done"], 120.5) in scheduled
    # The closing screen shows its timer, as the other phases do.
    (answering, answering_client), (late, late_client), (late_too, _) = members
    page = _page(late_client, late)
    assert 'data-view="closing"' in page and 'class="timer" data-deadline=' in page
    answering_client.post(reverse("closing_submit", args=[answering.code]), {"position": "4", "strength": "4"})
    # Before the deadline the late members are still answering: not "completed" in the export.
    statuses = _exported_statuses(experiment, tmp_path)
    assert statuses[answering.label]["completion_status"] == "completed"
    assert statuses[late.label]["completion_status"] == "incomplete"
    assert services.round_deadline_fire(round_id=round_.pk, phase=Round.Phase.DONE) == "early"

    # The timer's task was lost: the recovery sweep fires the deadline.
    Round.objects.filter(pk=round_.pk).update(phase_deadline=timezone.now() - recovery.DEADLINE_GRACE * 2)
    report = recovery.rounds_recover(stalled_after=timedelta(minutes=5))
    assert report.deadlines == {round_.pk: "closing missed"}
    assert not recovery.rounds_recover(stalled_after=timedelta(minutes=5))  # fired once
    assert services.round_deadline_fire(round_id=round_.pk, phase=Round.Phase.DONE) == "stale"  # the task, late
    for member in (late, late_too):
        member.refresh_from_db()
        assert member.finished_at is not None and member.closing_missed_at is not None and member.dropped_out_at is None
        assert member.completion_status(released=False, round_done=True) == "closing_missed"
        assert member.completion_code().startswith("P") and not Position.objects.filter(participant=member, stage="after").exists()
    answering.refresh_from_db()
    assert answering.completion_code().startswith("C") and answering.closing_missed_at is None
    page = _page(late_client, late)
    assert 'data-view="done"' in page and 'id="closing-missed"' in page and late.completion_code() in page
    assert 'class="timer"' not in page
    # An answer after the deadline changes nothing.
    late_client.post(reverse("closing_submit", args=[late.code]), {"position": "4", "strength": "4"})
    assert not Position.objects.filter(participant=late, stage="after").exists()
    statuses = _exported_statuses(experiment, tmp_path)
    assert statuses[answering.label]["completion_status"] == "completed" and statuses[answering.label]["closing_missed_at"] == ""
    assert statuses[late.label]["completion_status"] == statuses[late_too.label]["completion_status"] == "closing_missed"
    assert statuses[late.label]["closing_missed_at"] != ""


def test_a_study_with_a_fixed_code_gives_its_partial_code_to_those_who_missed_the_closing_questions() -> None:
    experiment = ExperimentFactory(slug="closing-codes", completion_code="DONE-1", partial_completion_code="PART-1")
    member = services.participant_join(experiment=experiment)
    assert member.completion_code() == "DONE-1"
    member.closing_missed_at = timezone.now()
    assert member.completion_code() == "PART-1"


def test_a_researcher_mediates_from_the_room_monitor(researcher, outsider_researcher, tmp_path) -> None:
    """A researcher-mediated arm: the room's mediator is a researcher's seat, not a member; the owner (or an editor)
    writes the statement on the monitor's mediator page, with the timer; a viewer may not, another researcher sees
    nothing; the members rate it blind."""
    from accounts.models import Collaboration
    from research.analytics_protocol import load_protocol

    experiment = ExperimentFactory(slug="researcher-mediates", group_size=3, owner=researcher)
    experiment.arms.all().delete()
    ArmFactory(experiment=experiment, name="researcher", human_mediator=True, mediator_is_researcher=True)
    members = _join(experiment, 3)
    round_ = Round.objects.current(room_id=members[0][0].room_id)
    seat = Participant.objects.get(pk=round_.mediator_id)
    assert seat.researcher_seat and seat.pk not in {m.pk for m, _ in members}
    assert all(_view(client, member) == "opinions" for member, client in members)  # every member writes
    owner = Client()
    owner.force_login(researcher)
    mediate_url = reverse("room_mediate", args=[seat.room_id])
    assert 'id="room-mediate"' in owner.get(reverse("room_monitor", args=[seat.room_id])).content.decode()
    assert "The members are writing" in owner.get(mediate_url).content.decode()
    for i, (member, client) in enumerate(members):
        client.post(reverse("opinion_submit", args=[member.code]), {"text": OPINIONS[i]})
    round_.refresh_from_db()
    assert round_.phase == Round.Phase.MEDIATING and round_.phase_deadline is not None
    other = Client()
    other.force_login(outsider_researcher)
    assert other.get(mediate_url).status_code == 404
    Collaboration.objects.create(experiment=experiment, user=outsider_researcher, role=Collaboration.Role.VIEWER)
    assert other.get(mediate_url).status_code == 403
    assert other.post(mediate_url, {"text": "A viewer's statement that should never be stored anywhere."}).status_code == 403
    page = owner.get(mediate_url).content.decode()
    assert all(text in page for text in OPINIONS[:3]) and 'id="mediator-form"' in page and 'class="timer" data-deadline=' in page
    owner.post(mediate_url, {"text": "Too short"})
    assert not Candidate.objects.filter(round=round_).exists()
    assert "Too short" in owner.get(mediate_url).content.decode()  # the draft is kept
    statement = "We agree that public services need money, and we disagree on whether higher rates on the rich are the way."
    assert owner.post(mediate_url, {"text": statement}).status_code == 302
    candidate = Candidate.objects.get(round=round_)
    assert candidate.author_id == seat.pk and candidate.backend == "human"
    assert Participant.objects.get(pk=seat.pk).researcher_id == researcher.pk
    member, client = members[0]
    page = _page(client, member)
    assert 'data-view="rating"' in page and statement in page and "Mediator" not in page and "researcher" not in page.lower()
    for member, client in members:
        _rate_and_rank(member, client)
    round_.refresh_from_db()
    assert round_.phase == Round.Phase.DONE and round_.outcome == Round.Outcome.COMPLETED
    assert "This round is over" in owner.get(mediate_url).content.decode()
    assert load_protocol(experiment).outcomes[0].human_mediated
    participants = _exported_statuses(experiment, tmp_path)
    assert participants[seat.label]["researcher_seat"] == "true"
    assert {participants[m.label]["researcher_seat"] for m, _ in members} == {"false"}


def test_a_room_mediated_by_a_member_has_no_researcher_mediator_page(researcher) -> None:
    experiment = _human_arm_experiment("member-mediates")
    Experiment.objects.filter(pk=experiment.pk).update(owner=researcher)
    members = _join(experiment, 3)
    owner = Client()
    owner.force_login(researcher)
    assert owner.get(reverse("room_mediate", args=[members[0][0].room_id])).status_code == 404
