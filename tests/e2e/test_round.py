"""A whole round in real browsers, against the real server stack.

Four participants (four browser contexts, so four sessions) join through the demo
invite link, write opinions, watch the mediator work, rate and rank its statements;
a researcher follows the room on the monitor. Every update after joining arrives over
the websocket: no step reloads a page unless the test says so (to check restored state).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter

import pytest
from playwright.sync_api import expect

from modeling.welfare import WELFARE_METHODS

from .helpers import MEDIATION_TIMEOUT_MS, Person
from .server import GROUP_SIZE, K_SHOWN, N_CANDIDATES, Stack

pytestmark = pytest.mark.e2e

EXTERNAL_ID = "e2e-pid-1"
XSS = "<b>bold</b><script>window.__xss=1</script>"
OPINIONS = [
    "Everyone deserves a fair hearing, so the rules should be decided together and written down plainly.",
    f"I think {XSS} ideas should be judged on their merits, and nobody should be shouted down.",
    "Change is fine if it is gradual, because people need time to adjust and to plan for it.",
    "The people most affected should have the biggest say, and the decision should be reviewed every year.",
]
# What participant 4 has typed when the page is reloaded: plain text, so it is the same escaped or not.
DRAFT = "The people most affected should have the biggest say"


def _ratings_for(person_index: int, statement_index: int) -> tuple[int, int]:
    return 1 + (2 * person_index + statement_index) % 7, 7 - (person_index + 3 * statement_index) % 7


def test_a_group_of_four_deliberates_rates_and_is_monitored(stack: Stack, new_person, capsys) -> None:
    started = time.monotonic()
    join_url = stack.url("/e/demo/join/")
    people = [
        new_person("participant 1"),
        new_person("participant 2"),
        # One participant on a phone-sized screen, so the screenshots show the narrow layout too.
        new_person("participant 3", viewport={"width": 390, "height": 844}),
        new_person("participant 4"),
    ]
    p1, p2, p3, p4 = people
    researcher = new_person("researcher")

    # 1. Join: consent, the waiting room, then the opinion phase once the group is full.
    p1.page.goto(f"{join_url}?PROLIFIC_PID={EXTERNAL_ID}")
    p1.screenshot("01-consent")
    p1.join(f"{join_url}?PROLIFIC_PID={EXTERNAL_ID}")
    for person in (p2, p3):
        person.join(join_url)
    for person in (p1, p2, p3):
        expect(person.main).to_have_attribute("data-view", "waiting")
    # p1 joined first: "3 of 4" can only have reached it over the websocket.
    expect(p1.status).to_contain_text(f"3 of {GROUP_SIZE} have joined")
    expect(p1.status.locator(".presence li.online")).to_have_count(3)
    p1.screenshot("02-waiting-room")

    p4.join(join_url)
    for person in people:
        expect(person.main).to_have_attribute("data-view", "opinions")
        expect(person.status).to_have_attribute("data-phase", "opinions")
        expect(person.status.locator(".presence li.online")).to_have_count(GROUP_SIZE)
        expect(person.status.locator(".presence li", has_text="(you)")).to_have_text(re.compile(re.escape(person.label)))
    assert len({person.label for person in people}) == GROUP_SIZE, [person.label for person in people]
    assert len({person.code for person in people}) == GROUP_SIZE

    # The researcher signs in and opens the room's monitor, and keeps it open (it updates live).
    monitor = _open_monitor(stack, researcher)
    expect(monitor.locator(".phase")).to_have_text("Writing opinions")
    participants_table = monitor.locator("table").first
    expect(participants_table.locator("tbody tr")).to_have_count(GROUP_SIZE)
    expect(participants_table.locator("tbody tr", has_text=EXTERNAL_ID)).to_contain_text(p1.label)

    # 2. Opinions: three submit; the fourth types, is autosaved, reloads, finds the text, submits.
    p1.page.locator("#opinion-text").fill(OPINIONS[0][:40])
    p1.screenshot("03-opinion-typing")
    for index, person in enumerate((p1, p2, p3)):
        person.submit_opinion(OPINIONS[index])
        expect(person.main).to_have_attribute("data-view", "opinion_sent")
        expect(person.main.locator("blockquote.opinion")).to_have_text(OPINIONS[index])
    expect(p4.status).to_contain_text(f"3 of {GROUP_SIZE} opinions are in")
    # Escaping: the opinion shows as the literal text; no <b> element, no script ran.
    expect(p2.main.locator("blockquote.opinion b")).to_have_count(0)
    p2.screenshot("04-opinion-sent-escaped")

    saved = p4.type_draft(DRAFT)
    assert saved.status == 204, f"draft autosave answered {saved.status}"
    p4.reload()
    expect(p4.page.locator("#opinion-text")).to_have_value(DRAFT)
    expect(p4.page.locator("#opinion-count")).to_have_text(str(len(DRAFT)))
    # Not the browser restoring the form: the server itself renders the draft.
    assert DRAFT in p4.context.request.get(stack.url(f"/p/{p4.code}/")).text()
    p4.screenshot("05-draft-restored-after-reload")

    # 3. The last opinion starts mediation: live progress, then statements, all without a reload.
    for person in people:
        person.page.evaluate("window.__e2eSamePage = true")
    last_opinion_at = p4.submit_opinion(OPINIONS[3])
    p1.page.locator('#status[data-phase="mediating"] progress, #main[data-view="rating"]').first.wait_for(
        timeout=MEDIATION_TIMEOUT_MS
    )
    p1.screenshot("06-mediating-progress")
    for person in people:
        expect(person.main).to_have_attribute("data-view", "rating", timeout=MEDIATION_TIMEOUT_MS)
    shown_after_ms = {person.name: person.state("ratingAt") - last_opinion_at for person in people}
    for person in people:
        assert person.page.evaluate("window.__e2eSamePage === true"), f"{person.name}'s page was reloaded"
        assert person.state("sawProgress"), f"{person.name} never saw the progress bar: {person.state('phases')}"
        assert person.state("sawWriting"), f"{person.name} never saw 'writing statements': {person.state('phases')}"
        assert "mediating" in person.state("phases"), person.state("phases")
    seconds = sorted(ms / 1000 for ms in shown_after_ms.values())
    # For the figure only: how much of that the mediation task itself took, per the server log.
    task_seconds = [float(m.group(1)) for m in stack.log_matches(r"mediate_round\[[^\]]+\] succeeded in ([\d.]+)s")]
    sampling_rounds = len(stack.log_matches(r"cleaning: Round \d+ left")) + 1
    _report(capsys, stack, "last opinion submitted -> statements visible",
            f"first browser {seconds[0]:.1f}s, last browser {seconds[-1]:.1f}s "
            f"(N={N_CANDIDATES}, K={K_SHOWN}, 40 new tokens; mediate_round task {', '.join(f'{t:.1f}' for t in task_seconds) or '?'} s, "
            f"{sampling_rounds} sampling round(s); load average {os.getloadavg()[0]:.1f})")
    _report(capsys, stack, "what participant 1's status area said while mediating", " | ".join(p1.state("progressTexts")))
    _record(stack, {
        "last_opinion_to_statements_s": {k: round(v / 1000, 2) for k, v in shown_after_ms.items()},
        "mediate_round_task_s": task_seconds,
        "sampling_rounds": sampling_rounds,
        "load_average_1min": round(os.getloadavg()[0], 2),
    })
    p3.screenshot("07-rating-phone")

    # 4. Rate every statement (participant 4 reloads mid-way), rank, finish.
    entered: dict[str, list[str]] = {}
    codes = []
    for person_index, person in enumerate(people):
        ids = person.statement_ids()
        assert len(ids) == K_SHOWN, f"{person.name} sees {len(ids)} statements"
        for candidate_id in ids:
            expect(person.statement_form(candidate_id).locator("blockquote")).not_to_be_empty()
        entered[person.label] = []
        for statement_index, candidate_id in enumerate(ids):
            agreement, quality = _ratings_for(person_index, statement_index)
            if person is p1 and statement_index == 0:
                # Choices ticked on the next statement but not saved yet must survive the
                # re-render that saving this one causes (response and websocket push alike).
                later = p1.statement_form(ids[1])
                later_agreement, later_quality = _ratings_for(person_index, 1)
                later.locator(f'input[name="agreement"][value="{later_agreement}"]').check()
                later.locator(f'input[name="quality"][value="{later_quality}"]').check()
            person.rate(candidate_id, agreement, quality)
            if person is p1 and statement_index == 0:
                expect(later.locator(f'input[name="agreement"][value="{later_agreement}"]')).to_be_checked()
                expect(later.locator(f'input[name="quality"][value="{later_quality}"]')).to_be_checked()
                expect(later.locator(".saved")).to_have_count(0)
            entered[person.label].append(f"{agreement} / {quality}")
            if person is p4 and statement_index == 0:
                p4.reload()
                expect(p4.main).to_have_attribute("data-view", "rating")
                p4.expect_rating(candidate_id, agreement, quality)
                expect(p4.statement_form(ids[1]).locator(".saved")).to_have_count(0)
                p4.screenshot("08-rating-restored-after-reload")
        if person is p1:
            p1.screenshot("09-ranking")
        codes.append(person.rank(list(reversed(ids))))
    assert len(set(codes)) == GROUP_SIZE, codes
    for person in people:
        expect(person.main).to_have_attribute("data-view", "done")
        expect(person.status).to_have_attribute("data-phase", "done")
    p1.screenshot("10-done")

    # 5. The monitor followed along live: phase, participants, candidates, predictions, ratings.
    _check_final_monitor(researcher, people, entered)
    researcher.screenshot("13-monitor-final")
    researcher.page.reload()  # and once more as the server renders it, without the websocket
    _check_final_monitor(researcher, people, entered)

    # 6. Escaping, everywhere: no script from an opinion ever ran, nothing threw.
    for person in [*people, researcher]:
        assert not person.xss_fired(), f"an opinion's script ran in {person.name}'s browser"
        assert not person.page_errors, f"JavaScript errors in {person.name}'s browser: {person.page_errors}"
        # Nothing on the site needs what the policy forbids (inline scripts or styles, eval).
        assert not person.csp_violations(), f"CSP violations in {person.name}'s browser: {person.csp_violations()}"
    _report(capsys, stack, "whole scenario", f"{time.monotonic() - started:.1f}s")


def _open_monitor(stack: Stack, researcher: Person):
    page = researcher.page
    page.goto(stack.url("/accounts/login/"))
    page.get_by_label("Username").fill("researcher")
    page.get_by_label("Password").fill("concord-demo")
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(stack.url("/researcher/"))
    expect(page.get_by_role("heading", name="Your experiments")).to_be_visible()
    researcher.screenshot("11-researcher-home")
    page.get_by_role("link", name="Concord demo").click()
    expect(page.locator(".join-url")).to_have_text(stack.url("/e/demo/join/"))
    rooms = page.locator("table tbody tr")
    expect(rooms).to_have_count(1)
    expect(rooms).to_contain_text(f"{GROUP_SIZE} / {GROUP_SIZE}")
    researcher.screenshot("12-experiment")
    rooms.get_by_role("link", name="Monitor", exact=True).click()
    monitor = page.locator("#monitor")
    expect(monitor).to_be_visible()
    # The monitor's own websocket pushes the whole section on connect.
    expect(page.locator("html")).to_have_attribute("data-e2e-ws-opens", re.compile(r"^[1-9]\d*$"))
    return monitor


def _check_final_monitor(researcher: Person, people: list[Person], entered: dict[str, list[str]]) -> None:
    page = researcher.page
    monitor = page.locator("#monitor")
    expect(monitor).to_have_attribute("data-phase", "done", timeout=MEDIATION_TIMEOUT_MS)
    expect(monitor.locator(".phase")).to_have_text("Done")
    participants = monitor.locator("table").first
    expect(participants.locator("tbody tr")).to_have_count(GROUP_SIZE)
    expect(participants.locator("tbody tr", has_text=EXTERNAL_ID)).to_contain_text(people[0].label)
    for person in people:
        expect(participants.locator("tbody tr", has_text=person.label)).to_contain_text("finished")
    # The opinion with markup shows as text: no element made from it, no script.
    expect(participants).to_contain_text(XSS)
    expect(monitor.locator("td b, td script")).to_have_count(0)

    candidates = monitor.locator("table.candidates tbody tr")
    expect(candidates).to_have_count(N_CANDIDATES)
    expect(monitor.locator("table.candidates tbody tr.shown")).to_have_count(K_SHOWN)
    number = re.compile(r"^-?\d+(\.\d+)?$")
    for row in range(N_CANDIDATES):
        cells = candidates.nth(row).locator("td")
        # rank, #, statement, predictions…, the arm's welfare, welfare under each registered function, shown
        expect(cells).to_have_count(3 + GROUP_SIZE + 1 + len(WELFARE_METHODS) + 1)
        expect(cells.nth(0)).to_have_text(str(row + 1))  # ordered by welfare rank
        for column in range(3, 3 + GROUP_SIZE + 1):  # each predicted agreement, then welfare
            expect(cells.nth(column)).to_have_text(number)
    expect(monitor.locator(".why")).to_contain_text("won on")

    # Ratings: columns follow the participants' order; each column holds what that person entered.
    headers = monitor.locator("table.ratings thead th")
    labels = [text.split(" (")[0] for text in headers.all_inner_texts()[1:]]
    assert sorted(labels) == sorted(entered), labels
    rows = monitor.locator("table.ratings tbody tr")
    expect(rows).to_have_count(K_SHOWN)
    expect(monitor).to_contain_text(f"Ratings ({GROUP_SIZE * K_SHOWN})")
    seen: dict[str, list[str]] = {label: [] for label in labels}
    for row in range(K_SHOWN):
        cells = rows.nth(row).locator("td").all_inner_texts()[1:]
        for label, cell in zip(labels, cells):
            seen[label].append(cell.strip())
    for label in labels:
        assert Counter(seen[label]) == Counter(entered[label]), (label, seen[label], entered[label])
    expect(monitor.locator("h2", has_text="Rankings").locator("xpath=following-sibling::ul[1]/li")).to_have_count(GROUP_SIZE)


def _report(capsys, stack: Stack, what: str, value: str) -> None:
    with capsys.disabled():
        print(f"\n[e2e {stack.mode}] {what}: {value}")


def _record(stack: Stack, values: dict) -> None:
    from .server import REPO

    path = REPO / "test-results" / "e2e" / stack.mode / "timings.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing.update(values)
    path.write_text(json.dumps(existing, indent=2))
