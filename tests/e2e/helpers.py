"""Browser-side helpers: one Person per browser context, and what the pages let them do."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import BrowserContext, Page, Response, expect

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Generous by design: the machine has two cores shared by daphne, a worker and Chromium.
STEP_TIMEOUT_MS = 20_000
# First generation includes loading (and, on a fresh machine, converting) the model.
# 90-110 s measured with the cores shared (load 4-8); 150-230 s at load 8-12. Generous, so a
# busy CI machine is slow rather than red; a real hang still fails.
MEDIATION_TIMEOUT_MS = int(float(os.environ.get("CONCORD_E2E_MEDIATION_TIMEOUT_S", "420")) * 1000)

# Runs before any page script on every navigation. It records what the page showed
# while nobody was looking: a MutationObserver sees a progress bar even if it lived
# for a second between two of our checks, and stamps when the statements appeared,
# so the test asserts on facts instead of racing the server.
OBSERVER_SCRIPT = """
(() => {
  const s = window.__e2e = {
    mainPushes: 0, statusPushes: 0, wsOpens: 0,
    sawProgress: false, sawWriting: false, phases: [], ratingAt: null, progressTexts: [],
  };
  // Mirrored into attributes of <html>, so Python waits on them with expect(): the site's
  // Content-Security-Policy forbids eval, which page.wait_for_function would need.
  const mirror = () => {
    const root = document.documentElement;
    root.dataset.e2eMainPushes = String(s.mainPushes);
    root.dataset.e2eWsOpens = String(s.wsOpens);
  };
  document.addEventListener("htmx:wsOpen", () => { s.wsOpens++; mirror(); });
  document.addEventListener("htmx:wsAfterMessage", (event) => {
    const message = (event.detail && event.detail.message) || "";
    if (message.includes('id="main"')) s.mainPushes++;
    if (message.includes('id="status"')) s.statusPushes++;
    mirror();
  });
  const look = () => {
    const status = document.getElementById("status");
    if (status) {
      if (status.dataset.phase === "mediating") {
        if (status.querySelector("progress")) s.sawProgress = true;
        if (/writing statements/i.test(status.textContent)) s.sawWriting = true;
        const said = status.querySelector(".progress p");
        const text = said ? said.textContent.trim() : "";
        if (text && !s.progressTexts.includes(text)) s.progressTexts.push(text);
      }
      const phase = status.dataset.phase;
      if (phase && s.phases[s.phases.length - 1] !== phase) s.phases.push(phase);
    }
    if (s.ratingAt === null && document.querySelector('#main[data-view="rating"]')) s.ratingAt = Date.now();
  };
  new MutationObserver(look).observe(document, {
    childList: true, subtree: true, attributes: true, attributeFilter: ["data-phase", "data-view"],
  });
  document.addEventListener("DOMContentLoaded", look);
})();
"""


@dataclass
class Person:
    """A participant (or the researcher): one browser context, so one cookie jar, one page."""

    name: str
    context: BrowserContext
    page: Page
    shots: Path
    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    label: str = ""  # "Participant A", as the room shows it
    code: str = ""  # from the participant URL /p/<code>/

    # --- generic -----------------------------------------------------------------

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def state(self, key: str):
        return self.page.evaluate(f"window.__e2e && window.__e2e.{key}")

    @property
    def main(self):
        return self.page.locator("#main")

    @property
    def status(self):
        return self.page.locator("#status")

    def wait_for_live_connection(self) -> None:
        """Wait until the websocket is open and its first full render has landed.

        On every connect the server pushes the whole form area; typing into the page
        before that push would be overwritten (see the report on the own-echo race).
        """
        expect(self.page.locator("html")).to_have_attribute("data-e2e-main-pushes", re.compile(r"^[1-9]\d*$"))
        expect(self.page.locator("body")).to_have_attribute("data-ws", "open")

    def reload(self) -> None:
        self.page.reload()
        self.wait_for_live_connection()

    def csp_violations(self) -> list[str]:
        return [text for text in self.console_errors if "Content Security Policy" in text]

    def xss_fired(self) -> bool:
        return self.page.evaluate("typeof window.__xss !== 'undefined'")

    # --- participant steps ------------------------------------------------------------

    def join(self, join_url: str) -> None:
        self.page.goto(join_url)
        expect(self.page.get_by_role("heading", name="Before you start")).to_be_visible()
        self.page.get_by_label("I have read this and agree to take part.").check()
        self.page.get_by_role("button", name="Join the discussion").click()
        expect(self.page).to_have_url(re.compile(r"/p/[^/]+/$"))
        self.code = self.page.url.rstrip("/").rsplit("/", 1)[-1]
        self.label = re.sub(r"^You are\s+", "", self.page.locator(".topbar nav").inner_text().strip())
        assert self.label.startswith("Participant "), self.label
        self.wait_for_live_connection()

    def _is_post(self, suffix: str):
        return lambda response: response.request.method == "POST" and response.url.endswith(suffix)

    def type_draft(self, text: str) -> Response:
        """Type into the opinion box and wait for the autosave (hx-trigger: input changed delay:800ms)."""
        textarea = self.page.locator("#opinion-text")
        with self.page.expect_response(self._is_post("/draft/"), timeout=STEP_TIMEOUT_MS) as saved:
            textarea.fill(text)
        return saved.value

    def submit_opinion(self, text: str) -> int:
        """Submit an opinion; return the page's clock (Date.now(), ms) just before the click."""
        textarea = self.page.locator("#opinion-text")
        textarea.fill(text)
        expect(self.page.locator("#opinion-count")).to_have_text(str(len(text)))
        button = self.page.get_by_role("button", name="Submit my opinion")
        expect(button).to_be_enabled()
        with self.page.expect_response(self._is_post("/opinion/")) as answer:
            clicked_at = self.page.evaluate("Date.now()")
            button.click()
        assert answer.value.status == 200, f"{self.name}: opinion POST answered {answer.value.status}"
        return clicked_at

    def statement_ids(self) -> list[int]:
        forms = self.page.locator("form.statement")
        return [int(forms.nth(i).get_attribute("data-candidate")) for i in range(forms.count())]

    def statement_form(self, candidate_id: int):
        return self.page.locator(f'form.statement[data-candidate="{candidate_id}"]')

    def rate(self, candidate_id: int, agreement: int, quality: int) -> None:
        form = self.statement_form(candidate_id)
        pushes_before = self.state("mainPushes")
        form.locator(f'input[name="agreement"][value="{agreement}"]').check()
        form.locator(f'input[name="quality"][value="{quality}"]').check()
        # Marks this form element: the response swaps in a new one, which does not carry the mark.
        form.evaluate("el => { el.dataset.e2eBeforeSave = '1'; }")
        with self.page.expect_response(self._is_post(f"/rate/{candidate_id}/")) as answer:
            form.get_by_role("button", name=re.compile(r"^(Save|Update) rating$")).click()
        assert answer.value.status == 200, f"{self.name}: rating POST answered {answer.value.status}"
        # The response, swapped in by htmx, is the one render a rating causes: the server does not
        # echo a participant's own rating over the websocket (it would repeat the response). Wait
        # for the swap before ticking the next statement's radios.
        expect(self.statement_form(candidate_id)).not_to_have_attribute("data-e2e-before-save", "1")
        self.expect_rating(candidate_id, agreement, quality)
        assert self.state("mainPushes") == pushes_before, f"{self.name}: a rating was echoed over the websocket"

    def expect_rating(self, candidate_id: int, agreement: int, quality: int) -> None:
        form = self.statement_form(candidate_id)
        expect(form.locator(f'input[name="agreement"][value="{agreement}"]')).to_be_checked()
        expect(form.locator(f'input[name="quality"][value="{quality}"]')).to_be_checked()
        expect(form.locator(".saved")).to_have_text("Saved")
        expect(form.get_by_role("button", name="Update rating")).to_be_visible()

    def rank(self, order: list[int]) -> str:
        """Rank statements (candidate ids, best first), submit, and return the completion code."""
        ranking = self.page.locator("form.ranking")
        expect(ranking).to_be_visible()
        for position, candidate_id in enumerate(order, start=1):
            ranking.locator(f'select[name="rank_{candidate_id}"]').select_option(str(position))
        with self.page.expect_response(self._is_post("/rank/")) as answer:
            ranking.get_by_role("button", name="Submit my ranking").click()
        assert answer.value.status == 200, f"{self.name}: ranking POST answered {answer.value.status}"
        expect(self.main).to_have_attribute("data-view", "done")
        code = self.page.locator(".completion-code")
        expect(code).to_have_text(re.compile(r"^\S{4,}$"))
        return code.inner_text().strip()
