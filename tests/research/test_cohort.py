"""Running cohorts: group formation with a maximum wait, allow-lists, codes, timings, the cohort monitor."""

from __future__ import annotations

import random
import re
from datetime import timedelta
from io import StringIO
from pathlib import Path
from unittest import mock

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from deliberation import services
from deliberation.models import Arm, Experiment, PageView, Participant, Release, Room, Round
from deliberation.tasks import mediate_round
from research import services as research_services
from research.exports import PROTOCOL_TABLES
from research.models import DatasetExport
from tests.conftest import OPINIONS, client_for
from tests.factories import ExperimentFactory
from tests.research.study import hand_computed_figures, read_export_zip

pytestmark = pytest.mark.django_db


def _age(room: Room, seconds: float) -> None:
    Room.objects.filter(pk=room.pk).update(created_at=timezone.now() - timedelta(seconds=seconds))


@pytest.fixture
def cohort_experiment(researcher) -> Experiment:
    return ExperimentFactory(
        owner=researcher, slug="cohort", group_size=4, min_group_size=2, max_wait_seconds=120,
        completion_url="https://panel.example/complete?cc=DONE", completion_code="DONE-123",
    )


# --- Group formation by arrival, with a maximum wait -----------------------------------------------------------


def test_the_first_arrival_starts_the_wait_timer(cohort_experiment, django_capture_on_commit_callbacks) -> None:
    with mock.patch("deliberation.dispatch.enqueue") as enqueue, django_capture_on_commit_callbacks(execute=True):
        participant = services.participant_join(experiment=cohort_experiment)
    (call,) = [c for c in enqueue.call_args_list if str(c.args[0]).endswith("room_wait_deadline")]
    assert call.kwargs["args"] == [participant.room_id]
    assert call.kwargs["countdown"] >= 120


def test_after_the_maximum_wait_a_big_enough_group_starts_with_fewer(cohort_experiment) -> None:
    first, second = (services.participant_join(experiment=cohort_experiment) for _ in range(2))
    room = first.room
    assert services.room_wait_deadline_fire(room_id=room.pk) == "early"
    _age(room, 121)
    assert services.room_wait_deadline_fire(room_id=room.pk) == "started"
    round_ = Round.objects.get(room=room)
    assert round_.phase == Round.Phase.OPINIONS
    assert Room.objects.get(pk=room.pk).status == Room.Status.RUNNING
    # A late or duplicate timer does nothing; the next arrival opens a new room.
    assert services.room_wait_deadline_fire(room_id=room.pk) == "stale"
    assert services.participant_join(experiment=cohort_experiment).room_id != room.pk
    # The smaller group still deliberates: both opinions in, mediation begins.
    for participant, text in zip((first, second), OPINIONS):
        services.opinion_submit(participant=participant, text=text)
    assert Round.objects.get(pk=round_.pk).phase == Round.Phase.MEDIATING


def test_after_the_maximum_wait_a_lone_participant_is_released_with_a_code(cohort_experiment) -> None:
    alone = services.participant_join(experiment=cohort_experiment)
    _age(alone.room, 500)
    assert services.room_wait_deadline_fire(room_id=alone.room_id) == "released"
    release = Release.objects.get(participant=alone)
    assert release.code.startswith("R") and release.waited_seconds >= 500
    round_ = Round.objects.get(room=alone.room)
    assert (round_.phase, round_.outcome) == (Round.Phase.DONE, Round.Outcome.ABANDONED)
    page = client_for(alone).get(f"/p/{alone.code}/").content.decode()
    assert 'data-view="released"' in page and release.code in page
    assert "https://panel.example/complete?cc=DONE" in page
    # Whoever arrives next starts afresh.
    assert services.participant_join(experiment=cohort_experiment).room_id != alone.room_id


def test_a_set_release_code_is_used_for_everyone(cohort_experiment) -> None:
    Experiment.objects.filter(pk=cohort_experiment.pk).update(release_code="WAITED-42")
    alone = services.participant_join(experiment=cohort_experiment)
    _age(alone.room, 500)
    services.room_wait_deadline_fire(room_id=alone.room_id)
    assert Release.objects.get(participant=alone).code == "WAITED-42"


def test_without_a_maximum_wait_the_timer_never_fires(experiment) -> None:
    participant = services.participant_join(experiment=experiment)
    _age(participant.room, 10_000)
    assert services.room_wait_deadline_fire(room_id=participant.room_id) == "early"


# --- Allow-list and codes ---------------------------------------------------------------------------------------


def test_only_external_ids_on_the_allow_list_may_join(cohort_experiment) -> None:
    Experiment.objects.filter(pk=cohort_experiment.pk).update(require_allow_list=True)
    cohort_experiment.refresh_from_db()
    assert research_services.allow_list_add(experiment=cohort_experiment, external_ids=["PID-1", " PID-2 ", "", "PID-1"]) == 2
    assert research_services.allow_list_add(experiment=cohort_experiment, external_ids=["PID-2"]) == 0
    assert services.participant_join(experiment=cohort_experiment, external_id="PID-1").external_id == "PID-1"
    for refused in ("PID-3", ""):
        with pytest.raises(services.JoinRefused, match="only to invited participants"):
            services.participant_join(experiment=cohort_experiment, external_id=refused)
    response = client_for(Participant(code="none")).post("/e/cohort/join/?PROLIFIC_PID=PID-9", {"consent": "yes"})
    assert response.status_code == 403 and "only to invited participants" in response.content.decode()
    assert Participant.objects.filter(room__experiment=cohort_experiment).count() == 1


def test_a_finished_participant_gets_the_experiments_code_and_redirect(cohort_experiment) -> None:
    members = [services.participant_join(experiment=cohort_experiment) for _ in range(2)]
    services.round_start(room=members[0].room)
    services.opinion_submit(participant=members[0], text=OPINIONS[0])
    round_ = Round.objects.get(room=members[0].room)
    Round.objects.filter(pk=round_.pk).update(phase_deadline=timezone.now() - timedelta(seconds=1))
    assert services.round_deadline_fire(round_id=round_.pk, phase=Round.Phase.OPINIONS) == "abandoned"
    page = client_for(members[0]).get(f"/p/{members[0].code}/").content.decode()
    assert "DONE-123" in page and "https://panel.example/complete?cc=DONE" in page
    assert Participant.objects.get(pk=members[1].pk).dropout_reason == "no opinion before the deadline"


# --- Timings ------------------------------------------------------------------------------------------------------


def test_each_screen_a_participant_is_shown_is_recorded_once(cohort_experiment) -> None:
    participant = services.participant_join(experiment=cohort_experiment)
    client = client_for(participant)
    client.get(f"/p/{participant.code}/")
    client.get(f"/p/{participant.code}/")
    services.participant_join(experiment=cohort_experiment)
    services.round_start(room=participant.room)
    client.get(f"/p/{participant.code}/")
    client.post(f"/p/{participant.code}/opinion/", {"text": OPINIONS[0]})
    client.get(f"/p/{participant.code}/")
    views = list(PageView.objects.filter(participant=participant).values_list("view", "phase"))
    assert views == [("waiting", "waiting"), ("opinions", "opinions"), ("opinion_sent", "opinions")]
    stamps = list(PageView.objects.filter(participant=participant).values_list("shown_at", flat=True))
    assert stamps == sorted(stamps)


# --- The cohort monitor -------------------------------------------------------------------------------------------


def test_the_cohort_monitor_shows_every_room_to_its_owner_only(client, cohort_experiment, researcher, outsider_researcher) -> None:
    for _ in range(5):
        services.participant_join(experiment=cohort_experiment)  # one full room of 4, one forming
    url = "/researcher/experiments/cohort/cohort/"
    assert client.get(url).status_code == 302  # to the login page
    client.force_login(outsider_researcher)
    assert client.get(url).status_code == 404
    client.force_login(researcher)
    page = client.get(url).content.decode()
    assert page.count('data-room="') == 2
    assert 'data-phase="opinions"' in page and 'data-phase="waiting"' in page
    assert "5 participants" in page
    partial = client.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert partial.lstrip().startswith('<section id="cohort"') and "<html" not in partial


def test_the_researcher_pauses_and_resumes_the_study(client, cohort_experiment, researcher, outsider_researcher) -> None:
    url = "/researcher/experiments/cohort/pause/"
    client.force_login(outsider_researcher)
    assert client.post(url, {"action": "pause"}).status_code == 404
    client.force_login(researcher)
    assert client.post(url, {"action": "pause"}).status_code == 302
    assert Experiment.objects.get(pk=cohort_experiment.pk).status == Experiment.Status.PAUSED
    with pytest.raises(services.JoinRefused, match="not accepting"):
        services.participant_join(experiment=cohort_experiment)
    assert "Resume the study" in client.get("/researcher/experiments/cohort/cohort/").content.decode()
    client.post(url, {"action": "resume"})
    assert Experiment.objects.get(pk=cohort_experiment.pk).status == Experiment.Status.ACTIVE
    services.participant_join(experiment=cohort_experiment)


def test_participants_cannot_open_researcher_pages(group) -> None:
    participant = group[0]
    for url in ("/researcher/experiments/study/cohort/", "/researcher/experiments/study/analytics/", "/researcher/experiments/study/exports/"):
        response = participant.client.get(url)
        assert response.status_code == 302 and "/accounts/login/" in response["Location"]


# --- Done when: a cohort from start to finish (real models) ----------------------------------------------------

HM_BANK = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hm_questions.json"
_FORM = {
    "candidate": re.compile(r'data-candidate="(\d+)"'),
    "pair": re.compile(r'name="candidate_a" value="(\d+)"><input type="hidden" name="candidate_b" value="(\d+)"'),
    "opinion": re.compile(r'id="opinion-(\d+)"'),
    "attention": re.compile(r"please choose “[^”]+” \((\d)\)"),
    "rank": re.compile(r'name="rank_(\d+)"'),
    "view": re.compile(r'data-view="([a-z_]+)"'),
}


class Simulated:
    """A participant in a browser session of their own, acting only through the pages and forms they are shown."""

    def __init__(self, slug: str, pid: str) -> None:
        self.client = Client()
        response = self.client.get(f"/e/{slug}/join/?PROLIFIC_PID={pid}")
        assert response.status_code == 200 and "consent" in response.content.decode()
        response = self.client.post(f"/e/{slug}/join/?PROLIFIC_PID={pid}", {"consent": "yes"})
        assert response.status_code == 302, response.content[:300]
        self.url = response["Location"]
        self.participant = Participant.objects.get(code=self.url.strip("/").split("/")[-1])

    def page(self) -> str:
        response = self.client.get(self.url)
        assert response.status_code == 200
        return response.content.decode()

    def view(self) -> str:
        return _FORM["view"].search(self.page()).group(1)

    def write(self, text: str) -> None:
        assert self.view() == "opinions"
        assert self.client.post(f"{self.url}opinion/", {"text": text}).status_code == 302

    def rate_everything(self, rng: random.Random) -> None:
        page = self.page()
        assert _FORM["view"].search(page).group(1) == "rating"
        for candidate_id in _FORM["candidate"].findall(page):
            self._post(f"rate/{candidate_id}/", {"agreement": rng.randint(1, 7), "quality": rng.randint(1, 7)})
        page = self.page()
        for first, second in _FORM["pair"].findall(page):
            self._post("prefer/", {"candidate_a": first, "candidate_b": second, "preferred": rng.choice([first, second])})
        for opinion_id in _FORM["opinion"].findall(page):
            self._post(f"opinion-rating/{opinion_id}/", {"agreement": rng.randint(1, 7)})
        attention = _FORM["attention"].search(page)
        if attention:
            self._post("attention/", {"answer": attention.group(1)})
        page = self.page()
        ranked = _FORM["rank"].findall(page)
        assert ranked, "the ranking form appears once everything else is answered"
        rng.shuffle(ranked)
        self._post("rank/", {f"rank_{cid}": position for position, cid in enumerate(ranked, start=1)})

    def _post(self, path: str, data: dict) -> None:
        response = self.client.post(f"{self.url}{path}", data)
        assert response.status_code == 302, (path, response.content.decode()[:500])


def test_a_cohort_from_start_to_finish(tmp_path: Path, researcher, client) -> None:
    # 1. Questions are imported: the out-of-distribution split of the Habermas Machine bank.
    out = StringIO()
    call_command("import_questions", str(HM_BANK), "--split", "ood_test", stdout=out)
    assert "created 580" in out.getvalue()

    # 2. An experiment with two arms (head-to-head with each other) and an exclusion arm.
    experiment = Experiment.objects.create(
        slug="cohort-study", name="Cohort study", owner=researcher, group_size=3, question_split="ood_test",
        rate_opinions=True, attention_check=True, completion_code="COHORT-OK", assignment_seed=2024,
    )
    rawlsian = Arm.objects.create(experiment=experiment, name="rawlsian", welfare_method="rawlsian", n_candidates=4, k_shown=2)
    Arm.objects.create(experiment=experiment, name="utilitarian", welfare_method="utilitarian", n_candidates=4, k_shown=2, compare_with=rawlsian)
    Arm.objects.create(experiment=experiment, name="exclusion", welfare_method="utilitarian", n_candidates=4, k_shown=2, exclude_one_opinion=True)

    # 3. Nine simulated participants arrive; groups form by arrival and run through the real flow.
    people = [Simulated("cohort-study", f"PROLIFIC-{i}") for i in range(9)]
    rooms = sorted({p.participant.room_id for p in people})
    assert len(rooms) == 3
    assert {Room.objects.get(pk=r).arm.name for r in rooms} == {"rawlsian", "utilitarian", "exclusion"}
    assert {Room.objects.get(pk=r).question.split for r in rooms} == {"ood_test"}
    rng = random.Random(5)
    for person, text in zip(people, OPINIONS * 2):
        person.write(text)
    for room_id in rooms:
        round_ = Round.objects.get(room_id=room_id)
        assert round_.phase == Round.Phase.MEDIATING
        assert mediate_round.apply(args=[round_.pk]).get() == "stored"
    for person in people:
        person.rate_everything(rng)
    for person in people:
        page = person.page()
        assert 'data-view="done"' in page and "COHORT-OK" in page
    assert set(Round.objects.filter(room_id__in=rooms).values_list("outcome", flat=True)) == {Round.Outcome.COMPLETED}
    head_to_head = Round.objects.get(room__arm__name="utilitarian")
    assert set(head_to_head.candidates.values_list("source_arm__name", flat=True)) == {"utilitarian", "rawlsian"}
    excluded_round = Round.objects.get(room__arm__name="exclusion")
    assert excluded_round.excluded_participant_id is not None

    # 4. The export has every table, and every column appears in the data dictionary.
    call_command("export_dataset", "--experiment", "cohort-study", "--format", "csv", "--out", str(tmp_path), "--as-user", experiment.owner.username, stdout=StringIO())
    export = DatasetExport.objects.get(experiment=experiment)
    tables, package, readme = read_export_zip(Path(export.path), "csv")
    assert {r["name"] for r in package["resources"]} == {
        "experiment", "questions", "arms", "groups", "participants", "opinions", "candidates", "predicted_agreement", "presentations",
        "agreement_ratings", "quality_ratings", "opinion_ratings", "rankings", "pairwise_preferences", "attention_checks", "timings",
        "protocol_rounds", "critiques", "positions", "final_preferences", "human_statements",
        "exclusions", "generator_versions",
    }
    for resource in package["resources"]:
        columns = [field["name"] for field in resource["schema"]["fields"]]
        assert tables[resource["name"] + ":header"] == columns
        section = readme.split(f"### {resource['name']}", 1)[1]
        assert all(f"| `{column}` |" in section for column in columns), resource["name"]
        # This cohort does not use the Habermas Machine protocol, so its tables are empty (test_export_protocol.py fills them).
        protocol = resource["name"] in {table.name for table in PROTOCOL_TABLES}
        assert bool(tables[resource["name"]]) != protocol, f"{resource['name']} is {'not ' if protocol else ''}empty"
    assert len(tables["participants"]) == 9 and "PROLIFIC" not in str(tables)
    # The questions the groups discussed (drawn from the bank by split; none were attached).
    assert sorted(row["question_id"] for row in tables["questions"]) == sorted(Room.objects.filter(pk__in=rooms).values_list("question__external_id", flat=True))
    assert {row["split"] for row in tables["questions"]} == {"ood_test"}
    assert any(row["event"].startswith("page:") for row in tables["timings"])

    # 5. The analytics page shows every figure, computed from those rows and checked by hand.
    client.force_login(researcher)
    html = client.get("/researcher/experiments/cohort-study/analytics/").content.decode()
    shown = {
        (metric, arm): float(value)
        for metric, arm, value in re.findall(r'data-metric="([a-z_]+)" data-arm="([^"]+)" data-value="([-0-9.]+)"', html)
    }
    required = {
        "utilitarian": {"mean_agreement", "worst_off_agreement", "divisiveness", "win_rate_vs_best_opinion", "head_to_head_win_rate", "reward_model_mae"},
        "rawlsian": {"mean_agreement", "worst_off_agreement", "divisiveness", "win_rate_vs_best_opinion", "head_to_head_win_rate", "reward_model_mae"},
        "exclusion": {"mean_agreement", "worst_off_agreement", "divisiveness", "win_rate_vs_best_opinion", "exclusion_effect", "reward_model_mae"},
    }
    for arm in Arm.objects.filter(experiment=experiment):
        hand = hand_computed_figures(arm)
        assert required[arm.name] <= set(hand), arm.name
        for metric, value in hand.items():
            assert shown[(metric, arm.name)] == pytest.approx(value, abs=5e-5), (arm.name, metric)
    assert html.count("<svg") >= 3


def test_the_admin_adds_pasted_external_ids_to_the_allow_list(client, cohort_experiment, researcher) -> None:
    researcher.is_staff = researcher.is_superuser = True
    researcher.save()
    client.force_login(researcher)
    url = f"/admin/deliberation/experiment/{cohort_experiment.pk}/change/"
    page = client.get(url)
    assert page.status_code == 200 and "add_allowed_external_ids" in page.content.decode()
    form = page.context["adminform"].form
    data = {key: value for key, value in form.initial.items() if value is not None and key != "questions"}
    data.update({
        "owner": researcher.pk, "status": "active", "questions": list(cohort_experiment.questions.values_list("pk", flat=True)),
        "require_allow_list": "on", "add_allowed_external_ids": "PID-A\nPID-B, PID-C\n\nPID-A",
        "arms-TOTAL_FORMS": "0", "arms-INITIAL_FORMS": "0", "allowed_external_ids-TOTAL_FORMS": "0", "allowed_external_ids-INITIAL_FORMS": "0",
        "collaborations-TOTAL_FORMS": "0", "collaborations-INITIAL_FORMS": "0",
    })
    for arm in cohort_experiment.arms.all():
        data["arms-TOTAL_FORMS"] = data["arms-INITIAL_FORMS"] = "1"
        data.update({f"arms-0-{f}": getattr(arm, f) for f in ("name", "welfare_method", "welfare_alpha", "welfare_tie_break", "n_candidates", "k_shown", "weight")})
        data.update({"arms-0-id": arm.pk, "arms-0-experiment": cohort_experiment.pk})
    response = client.post(url, {k: v for k, v in data.items() if v is not None})
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else response
    assert sorted(cohort_experiment.allowed_external_ids.values_list("external_id", flat=True)) == ["PID-A", "PID-B", "PID-C"]


def test_a_closed_study_stays_closed_and_the_actions_are_explicit(client, cohort_experiment, researcher) -> None:
    url = "/researcher/experiments/cohort/pause/"
    client.force_login(researcher)
    for body in ({}, {"action": ""}, {"action": "open"}, {"action": "RESUME"}):
        assert client.post(url, body).status_code == 400, body
    Experiment.objects.filter(pk=cohort_experiment.pk).update(status=Experiment.Status.PAUSED)
    assert client.post(url, {}).status_code == 400
    assert Experiment.objects.get(pk=cohort_experiment.pk).status == Experiment.Status.PAUSED  # a POST without action resumes nothing
    Experiment.objects.filter(pk=cohort_experiment.pk).update(status=Experiment.Status.CLOSED)
    page = client.get("/researcher/experiments/cohort/cohort/").content.decode()
    assert "Resume the study" not in page and "cannot be resumed" in page
    for action in ("resume", "pause"):
        response = client.post(url, {"action": action}, follow=True)
        assert response.status_code == 200 and "closed" in response.content.decode()
        assert Experiment.objects.get(pk=cohort_experiment.pk).status == Experiment.Status.CLOSED
    with pytest.raises(services.InvalidInput):
        research_services.experiment_pause(experiment=cohort_experiment, paused=False)
    with pytest.raises(services.JoinRefused):
        services.participant_join(experiment=cohort_experiment)
