"""The researcher's pages in a real browser: cohort monitor (live), pause and resume, analytics, exports.

Uses the stack and browser fixtures of conftest.py. The study is an experiment of its own
(never the demo, which test_round.py fills), set up with the project's own commands: the
question bank is imported with import_questions, exactly as a researcher would.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import zipfile
from pathlib import Path

from playwright.sync_api import expect

from .helpers import Person
from .server import PYTHON, REPO, Stack

SLUG = "e2e-research"
HM_BANK = REPO.parent / "shared" / "data" / "hm_questions.json"
SETUP = f"""
from django.contrib.auth import get_user_model
from deliberation.models import Arm, Experiment
User = get_user_model()
owner = User.objects.get(username="researcher")
outsider, _ = User.objects.get_or_create(username="outsider")
outsider.set_password("outsider-pw"); outsider.save()
experiment, _ = Experiment.objects.get_or_create(slug="{SLUG}", defaults=dict(
    name="Browser research study", owner=owner, group_size=3, min_group_size=2, question_split="iid_test",
    completion_code="E2E-DONE"))
Arm.objects.get_or_create(experiment=experiment, name="utilitarian-arm", defaults=dict(n_candidates=4, k_shown=2))
Arm.objects.get_or_create(experiment=experiment, name="rawlsian-arm", defaults=dict(n_candidates=4, k_shown=2, welfare_method="rawlsian"))
"""


def _manage(stack: Stack, *args: str) -> str:
    result = subprocess.run([str(PYTHON), "manage.py", *args], cwd=REPO, env=stack.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _sign_in(stack: Stack, person: Person, username: str, password: str) -> None:
    page = person.page
    page.goto(stack.url("/accounts/login/"))
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(stack.url("/researcher/"))


def _join(stack: Stack, person: Person, pid: str) -> None:
    page = person.page
    page.goto(stack.url(f"/e/{SLUG}/join/?PROLIFIC_PID={pid}"))
    page.get_by_label("I have read this and agree to take part.").check()
    page.get_by_role("button", name="Join the discussion").click()


def test_a_researcher_runs_a_cohort_from_the_browser(stack: Stack, new_person, tmp_path: Path) -> None:
    _manage(stack, "shell", "-c", SETUP)
    imported = _manage(stack, "import_questions", str(HM_BANK), "--split", "iid_test", "--experiment", SLUG, "--as-user", "researcher")
    assert "Attached 565 questions" in imported

    researcher = new_person("researcher-pages")
    page = researcher.page
    _sign_in(stack, researcher, "researcher", "concord-demo")
    page.get_by_role("link", name="Browser research study").click()
    page.get_by_role("link", name="Cohort monitor").click()
    expect(page.get_by_role("heading", name="Cohort monitor")).to_be_visible()
    cohort = page.locator("#cohort")
    expect(cohort).to_contain_text("No rooms yet")
    researcher.screenshot("21-cohort-empty")

    # A participant arrives: the monitor shows the forming room without a reload (it polls).
    first = new_person("cohort-participant-1")
    _join(stack, first, "PID-E2E-1")
    expect(first.page.locator("#main")).to_have_attribute("data-view", "waiting")
    row = cohort.locator("tbody tr[data-room]")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("1 / 3")
    expect(row).to_have_attribute("data-phase", "waiting")
    # The arm is the researcher's to see, never the participant's.
    arm_name = row.locator("td").nth(1).inner_text()
    assert arm_name in {"utilitarian-arm", "rawlsian-arm"}
    assert arm_name not in first.page.content()

    # Pause: nobody new can join; resume: they can again.
    page.get_by_role("button", name="Pause the study").click()
    expect(cohort).to_have_attribute("data-status", "paused")
    second = new_person("cohort-participant-2")
    _join(stack, second, "PID-E2E-2")
    expect(second.page.get_by_role("alert")).to_contain_text("not accepting participants")
    researcher.screenshot("22-cohort-paused")
    page.get_by_role("button", name="Resume the study").click()
    expect(cohort).to_have_attribute("data-status", "active")
    _join(stack, second, "PID-E2E-2")
    expect(second.page.locator("#main")).to_have_attribute("data-view", "waiting")
    expect(row).to_contain_text("2 / 3")
    researcher.screenshot("23-cohort-two-waiting")

    # Analytics: the table, the plots (inline SVG) and the CSV.
    page.goto(stack.url(f"/researcher/experiments/{SLUG}/analytics/"))
    expect(page.get_by_role("heading", name="Analytics")).to_be_visible()
    expect(page.locator("table.analytics thead")).to_contain_text("utilitarian-arm")
    expect(page.locator("table.analytics thead")).to_contain_text("rawlsian-arm")
    expect(page.locator("svg.chart").first).to_be_visible()
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download as CSV").click()
    rows = list(csv.DictReader(io.StringIO(Path(download_info.value.path()).read_text())))
    assert {row["arm"] for row in rows} == {"utilitarian-arm", "rawlsian-arm"}
    assert {"mean_agreement", "worst_off_agreement", "divisiveness", "win_rate_vs_best_opinion", "head_to_head_win_rate", "exclusion_effect"} <= {row["metric"] for row in rows}
    researcher.screenshot("24-analytics")

    # Export: requested in the page, written by the task, followed live, downloaded as one zip.
    page.goto(stack.url(f"/researcher/experiments/{SLUG}/exports/"))
    page.locator("#export-format").select_option("csv")
    page.get_by_role("button", name="Export").click()
    done = page.locator("tr[data-export][data-status='done']")
    expect(done).to_have_count(1, timeout=60_000)
    researcher.screenshot("25-exports")
    with page.expect_download() as download_info:
        done.get_by_role("link", name="Download zip").click()
    with zipfile.ZipFile(download_info.value.path()) as archive:
        names = archive.namelist()
        package = json.loads(archive.read(next(n for n in names if n.endswith("datapackage.json"))))
        participants = archive.read(next(n for n in names if n.endswith("participants.csv"))).decode()
    assert {r["name"] for r in package["resources"]} >= {"questions", "groups", "participants", "timings", "pairwise_preferences"}
    assert len(participants.strip().splitlines()) == 1 + 2 and "PID-E2E" not in participants

    # Another researcher cannot see any of it.
    outsider = new_person("outsider-researcher")
    _sign_in(stack, outsider, "outsider", "outsider-pw")
    expect(outsider.page.locator("body")).not_to_contain_text("Browser research study")
    for path in ("cohort/", "analytics/", "exports/"):
        response = outsider.page.goto(stack.url(f"/researcher/experiments/{SLUG}/{path}"))
        assert response is not None and response.status == 404
    # A participant cannot either: researcher pages want a researcher login.
    first.page.goto(stack.url(f"/researcher/experiments/{SLUG}/cohort/"))
    expect(first.page).to_have_url(re.compile(r"/accounts/login/"))

    for person in (researcher, first, second, outsider):
        assert not person.page_errors, person.page_errors
        assert not person.csp_violations(), person.csp_violations()
