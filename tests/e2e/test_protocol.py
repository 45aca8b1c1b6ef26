"""The Habermas Machine protocol in real browsers (docs/habermas-protocol.md).

Two studies of their own (never the demo): a model-mediated one where two members give their position,
write opinions, rate and rank, critique the winning statement, rate and rank the revised statements, say
which statement they prefer and give their position again; and a human-mediator one where a third member,
drawn as mediator, writes the group statement in the browser and the others rate it. Every change of screen
after joining arrives over the websocket. The model arm uses the stand-in generator, so this test is about
the pages, not the model.
"""

from __future__ import annotations

import re
import subprocess

from playwright.sync_api import expect

from .helpers import MEDIATION_TIMEOUT_MS, Person
from .server import PYTHON, REPO, Stack

SETUP = """
from django.contrib.auth import get_user_model
from deliberation.models import Arm, Experiment
owner = get_user_model().objects.get(username="researcher")
questions = Experiment.objects.get(slug="demo").questions.all()
model, _ = Experiment.objects.get_or_create(slug="e2e-protocol", defaults=dict(
    name="Browser protocol study", owner=owner, group_size=2, min_group_size=2, critique_rounds=1, ask_positions=True))
model.questions.add(*questions)
Arm.objects.get_or_create(experiment=model, name="protocol-model", defaults=dict(generator_backend="stand-in", n_candidates=3, k_shown=2))
human, _ = Experiment.objects.get_or_create(slug="e2e-human", defaults=dict(
    name="Browser human mediator study", owner=owner, group_size=3, min_group_size=2, critique_rounds=1))
human.questions.add(*questions)
Arm.objects.get_or_create(experiment=human, name="protocol-human", defaults=dict(human_mediator=True))
"""

OPINIONS = [
    "Rules should be decided together and written down plainly, so that everyone knows where they stand.",
    "Change is fine if it is gradual, because people need time to adjust and to plan for it.",
]
CRITIQUES = [
    "It should say who reviews the rules, and how often, or nobody will trust them.",
    "It reads as if we all want quick change; please say that some of us want it gradual.",
]


def _manage(stack: Stack, *args: str) -> None:
    result = subprocess.run([str(PYTHON), "manage.py", *args], cwd=REPO, env=stack.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _position(person: Person, position: int, strength: int) -> None:
    form = person.page.locator("form").filter(has=person.page.locator('input[name="position"]'))
    form.locator(f'input[name="position"][value="{position}"]').check()
    form.locator(f'input[name="strength"][value="{strength}"]').check()


def _write(person: Person, text: str, button: str, suffix: str) -> None:
    person.page.locator("#opinion-text").fill(text)
    with person.page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith(suffix)) as answer:
        person.page.get_by_role("button", name=button).click()
    assert answer.value.status == 200, f"{person.name}: {suffix} answered {answer.value.status}"


def _rate_and_rank(person: Person, *, reverse: bool = False) -> None:
    expect(person.main).to_have_attribute("data-view", "rating", timeout=MEDIATION_TIMEOUT_MS)
    ids = person.statement_ids()
    assert ids
    for index, candidate_id in enumerate(ids):
        person.rate(candidate_id, 5 - index, 4)
    ranking = person.page.locator("form.ranking")
    for position, candidate_id in enumerate(sorted(ids, reverse=reverse), start=1):
        ranking.locator(f'select[name="rank_{candidate_id}"]').select_option(str(position))
    with person.page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/rank/")) as answer:
        ranking.get_by_role("button", name="Submit my ranking").click()
    assert answer.value.status == 200


def test_two_members_play_the_two_round_protocol_with_positions(stack: Stack, new_person) -> None:
    _manage(stack, "shell", "-c", SETUP)
    join_url = stack.url("/e/e2e-protocol/join/")
    people = [new_person("protocol member 1"), new_person("protocol member 2")]
    for person in people:
        person.join(join_url)

    # Position before the opinion, on the question's own statements.
    for index, person in enumerate(people):
        expect(person.main).to_have_attribute("data-view", "position_before")
        if index == 0:
            person.screenshot("protocol-01-position-before")
        _position(person, 2 + 3 * index, 6)
        with person.page.expect_response(lambda r: r.url.endswith("/position/")):
            person.page.get_by_role("button", name="Continue").click()
        expect(person.main).to_have_attribute("data-view", "opinions")
        _write(person, OPINIONS[index], "Submit my opinion", "/opinion/")

    # First round: rate and rank; the first to finish waits (a critique round follows).
    _rate_and_rank(people[0])
    expect(people[0].main).to_have_attribute("data-view", "ranked")
    _rate_and_rank(people[1], reverse=True)

    # Critique round: the winning statement, a critique form with a draft that survives a reload.
    for person in people:
        expect(person.main.locator("#previous-statement")).to_be_visible()
        expect(person.main.get_by_text("Your critique")).to_be_visible()
    people[0].type_draft(CRITIQUES[0][:30])
    people[0].reload()
    expect(people[0].page.locator("#opinion-text")).to_have_value(CRITIQUES[0][:30])
    people[0].screenshot("protocol-02-critique")
    for index, person in enumerate(people):
        _write(person, CRITIQUES[index], "Submit my critique", "/opinion/")

    # Revised statements, rated and ranked in the same form.
    for person in people:
        _rate_and_rank(person)

    # Closing: the first or the revised statement, and the position after; then the completion code.
    for index, person in enumerate(people):
        expect(person.main).to_have_attribute("data-view", "closing")
        choices = person.page.locator('input[name="preferred"]')
        expect(choices).to_have_count(2)
        if index == 0:
            person.screenshot("protocol-03-closing")
        choices.nth(index).check()
        _position(person, 4, 5)
        with person.page.expect_response(lambda r: r.url.endswith("/closing/")):
            person.page.get_by_role("button", name="Finish").click()
        expect(person.main).to_have_attribute("data-view", "done")
        expect(person.page.locator(".completion-code")).to_have_text(re.compile(r"^\S{4,}$"))
    for person in people:
        assert not person.page_errors and not person.csp_violations(), (person.page_errors, person.csp_violations())


def test_a_member_mediates_in_the_browser_and_the_others_rate_it(stack: Stack, new_person) -> None:
    _manage(stack, "shell", "-c", SETUP)
    join_url = stack.url("/e/e2e-human/join/")
    people = [new_person(f"human arm member {n}") for n in (1, 2, 3)]
    for person in people:
        person.join(join_url)
    for person in people:
        expect(person.main).to_have_attribute("data-view", re.compile("^(opinions|mediator)$"))
    mediators = [p for p in people if p.main.get_attribute("data-view") == "mediator"]
    assert len(mediators) == 1
    mediator = mediators[0]
    writers = [p for p in people if p is not mediator]
    for index, person in enumerate(writers):
        _write(person, OPINIONS[index], "Submit my opinion", "/opinion/")

    statement = "We agree that rules should be written down plainly, and we differ on how quickly they should change."
    expect(mediator.page.locator("#mediator-form")).to_be_visible()
    for opinion in OPINIONS:
        expect(mediator.main.get_by_text(opinion)).to_be_visible()
    mediator.screenshot("protocol-04-mediator")
    _write(mediator, statement, "Submit the statement", "/statement/")
    for person in writers:
        expect(person.main).to_have_attribute("data-view", "rating")
        expect(person.main.get_by_text(statement)).to_be_visible()
        _rate_and_rank(person)

    # The critique round: the mediator sees the critiques beside the opinions and revises.
    for index, person in enumerate(writers):
        expect(person.main.locator("#previous-statement")).to_have_text(statement)
        _write(person, CRITIQUES[index], "Submit my critique", "/opinion/")
    expect(mediator.page.locator("#mediator-form")).to_be_visible()
    for critique in CRITIQUES:
        expect(mediator.main.get_by_text(critique)).to_be_visible()
    _write(mediator, statement + " We will review them every year.", "Submit the statement", "/statement/")
    for person in writers:
        _rate_and_rank(person)
    # The closing questions open once every member has ranked (the round ends then).
    for person in writers:
        expect(person.main).to_have_attribute("data-view", "closing")
        person.page.locator('input[name="preferred"]').first.check()
        with person.page.expect_response(lambda r: r.url.endswith("/closing/")):
            person.page.get_by_role("button", name="Finish").click()
        expect(person.main).to_have_attribute("data-view", "done")
    expect(mediator.main).to_have_attribute("data-view", "done")
