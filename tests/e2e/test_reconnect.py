"""A websocket drops: the page reconnects with backoff and renders the current state.

Uses the stack and browser fixtures of conftest.py, on an experiment of its own (never the
demo, which test_round.py fills). Participant 1's socket runs through Playwright's
`route_web_socket`, so the test decides what each connection attempt meets: the real
server, a refusal, or a server that accepts and then fails. To the page these are real
WebSocket events (close codes included), and every reconnect attempt is made by htmx's ws
extension or concord.js, unaided. While participant 1 is cut off another participant
submits an opinion, so the new count can reach participant 1 only through the full-state
render of the reconnect.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

from playwright.sync_api import Route, WebSocketRoute, expect

from .helpers import Person
from .server import PYTHON, REPO, Stack

SLUG = "e2e-reconnect"
GROUP = 3
SETUP = f"""
from django.contrib.auth import get_user_model
from deliberation.models import Arm, Experiment
owner = get_user_model().objects.get(username="researcher")
experiment, _ = Experiment.objects.get_or_create(slug="{SLUG}", defaults=dict(
    name="Browser reconnect study", owner=owner, group_size={GROUP}, min_group_size=2))
experiment.questions.add(*Experiment.objects.get(slug="demo").questions.all())
Arm.objects.get_or_create(experiment=experiment, name="reconnect-arm", defaults=dict(n_candidates=2, k_shown=1))
"""

SAVED_PART = "Rules should be written down plainly,"
# Typed while the network is down: the autosave fails, so only this page holds it.
UNSAVED_PART = " and reviewed by everyone they affect every year"
SECOND_OPINION = "Everyone deserves a fair hearing before anything is decided for the group."
THIRD_OPINION = "Change is fine if it is gradual, so people have time to adjust and to plan."
# How long the page may take to get back once the server answers again: a hang guard, not a
# timing claim. Each attempt refused while cut off doubles the next wait (up to 15-30 s), and how
# many were refused depends on how fast the steps in between ran.
RECONNECT_TIMEOUT_MS = 90_000

# Records every socket event with the page's monotonic clock (performance.now()); the counts
# are mirrored into attributes of <html> so expect() can wait on them (CSP forbids eval).
RECORDER_SCRIPT = """
(() => {
  const log = window.__reconnect = { events: [] };
  const add = (type, extra) => {
    log.events.push(Object.assign({ type, t: performance.now() }, extra || {}));
    const root = document.documentElement;
    for (const kind of ["connecting", "open", "close", "message"]) {
      root.setAttribute("data-e2e-ws-" + kind, String(log.events.filter((e) => e.type === kind).length));
    }
  };
  document.addEventListener("htmx:wsConnecting", () => add("connecting"));
  document.addEventListener("htmx:wsOpen", () => add("open"));
  document.addEventListener("htmx:wsClose", (event) => add("close", { code: event.detail.event.code }));
  document.addEventListener("htmx:wsAfterMessage", () => add("message"));
})();
"""


@dataclass
class SocketSwitch:
    """What participant 1's next websocket meets. Handlers run on Playwright's dispatcher, between
    the test's own calls (greenlets: never concurrently with the test's code)."""

    cut_off: bool = False  # refuse every attempt, as a server that is down does
    fail_after_accept: int = 0  # then accept this many and fail them before the first render (1011)
    live: tuple[WebSocketRoute, WebSocketRoute] | None = None
    met: list[str] = field(default_factory=list)

    def handle(self, ws: WebSocketRoute) -> None:
        if self.cut_off:
            self.met.append("refused")
            # Closed before it opened, as a refused connection looks to a page.
            ws.close(code=1006, reason="connection refused")
            return
        server = ws.connect_to_server()
        if self.fail_after_accept:
            self.fail_after_accept -= 1
            self.met.append("accepted, then failed")
            failed = []

            def fail(message: str | bytes) -> None:
                # The server accepted and rendered; the page gets a 1011 instead of the render,
                # as when the consumer raises after accepting (daphne sends 1011).
                if not failed:
                    failed.append(True)
                    ws.close(code=1011, reason="internal error")
                    server.close()

            server.on_message(fail)
            server.on_close(lambda code, reason: None)
            return
        self.met.append("connected")
        self.live = (ws, server)

    def drop(self, code: int) -> None:
        """Drop the live connection, both sides: the page sees `code`, the server a closed socket."""
        assert self.live is not None, "no live connection to drop"
        ws, server = self.live
        self.live = None
        ws.on_close(lambda code, reason: None)  # the page's side is closed by hand, below
        server.on_close(lambda code, reason: None)
        ws.close(code=code, reason="dropped by the test")
        server.close()


def _manage(stack: Stack, *args: str) -> None:
    result = subprocess.run([str(PYTHON), "manage.py", *args], cwd=REPO, env=stack.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _screenshot(person: Person, name: str) -> None:
    # caret="initial": hiding the caret (the default) leaves style="" on the focused textarea,
    # which htmx's settle then copies onto the re-rendered one, and the CSP rightly blocks that.
    person.page.screenshot(path=str(person.shots / f"{name}.png"), full_page=True, caret="initial")


def _events(person: Person) -> list[dict]:
    return person.page.evaluate("window.__reconnect.events")


def test_a_dropped_websocket_reconnects_with_backoff_and_renders_the_current_state(stack: Stack, new_person, capsys) -> None:
    _manage(stack, "shell", "-c", SETUP)
    join_url = stack.url(f"/e/{SLUG}/join/")
    p1, p2, p3 = (new_person(f"reconnect participant {n}") for n in (1, 2, 3))
    switch = SocketSwitch()
    p1.context.add_init_script(RECORDER_SCRIPT)
    p1.page.route_web_socket(re.compile(r"/ws/p/"), switch.handle)

    for person in (p1, p2, p3):
        person.join(join_url)
    for person in (p1, p2, p3):
        expect(person.main).to_have_attribute("data-view", "opinions")
    assert switch.met == ["connected"], switch.met

    # Live before the drop: participant 2's opinion reaches participant 1 over the socket.
    p2.submit_opinion(SECOND_OPINION)
    expect(p1.status).to_contain_text(f"1 of {GROUP} opinions are in")
    # Half an opinion, autosaved.
    saved = p1.type_draft(SAVED_PART)
    assert saved.status == 204, f"draft autosave answered {saved.status}"

    # The drop: a server going away (1001, as daphne sends when it restarts), and the network with
    # it: every reconnect attempt is refused and so is the draft autosave, until the test says.
    connection = p1.page.locator("#connection")
    body = p1.page.locator("body")
    switch.cut_off = True

    def network_down(route: Route) -> None:
        route.abort("internetdisconnected")

    p1.page.route(re.compile(r"/draft/$"), network_down)
    switch.drop(1001)
    expect(connection).to_have_attribute("data-state", "reconnecting")
    expect(connection).to_have_text(re.compile(r"reconnecting", re.I))
    expect(body).to_have_attribute("data-ws", "closed")
    _screenshot(p1, "31-reconnect-cut-off")

    # Participant 1 keeps typing; the autosave fails, so the text lives only in this page.
    textarea = p1.page.locator("#opinion-text")
    with p1.page.expect_event("requestfailed", lambda request: request.url.endswith("/draft/")):
        textarea.fill(SAVED_PART + UNSAVED_PART)

    # Meanwhile the room moves on: participant 3 submits. Participant 2, connected, sees it live;
    # participant 1, cut off, still shows the old count.
    p3.submit_opinion(THIRD_OPINION)
    expect(p3.main).to_have_attribute("data-view", "opinion_sent")
    expect(p2.status).to_contain_text(f"2 of {GROUP} opinions are in")
    expect(p1.status).to_contain_text(f"1 of {GROUP} opinions are in")

    # At least two reconnect attempts refused (the drop's close, then two refusals).
    html = p1.page.locator("html")
    expect(html).to_have_attribute("data-e2e-ws-close", re.compile(r"^([3-9]|\d\d+)$"))
    assert switch.met[1:] and set(switch.met[1:]) == {"refused"}, switch.met
    assert p1.state("wsOpens") == 1, "an attempt opened while every attempt was refused"

    # The server comes back, failing once after accepting (1011), then working; the network too.
    p1.page.unroute(re.compile(r"/draft/$"), network_down)
    with p1.page.expect_response(p1._is_post("/draft/"), timeout=RECONNECT_TIMEOUT_MS) as resaved:
        switch.fail_after_accept = 1
        switch.cut_off = False
        # The full-state render of the reconnect is the only way the new count can arrive.
        expect(p1.status).to_contain_text(f"2 of {GROUP} opinions are in", timeout=RECONNECT_TIMEOUT_MS)
        expect(connection).to_have_attribute("data-state", "open")
        expect(connection).to_have_text("")
        expect(body).to_have_attribute("data-ws", "open")
        expect(p1.main).to_have_attribute("data-view", "opinions")
        # Nothing typed is lost: the render brought the server's (older) draft, the page kept
        # the newer text, and autosaved it now that the network is back.
        expect(textarea).to_have_value(SAVED_PART + UNSAVED_PART)
        expect(p1.page.locator("#opinion-count")).to_have_text(str(len(SAVED_PART + UNSAVED_PART)))
    assert resaved.value.status == 204, f"draft autosave after the reconnect answered {resaved.value.status}"
    assert SAVED_PART + UNSAVED_PART in p1.context.request.get(stack.url(f"/p/{p1.code}/")).text()
    _screenshot(p1, "32-reconnected-current-state")

    # The backoff, from the page's own record. Every attempt after the drop, until a render
    # arrived, was a failure; concord.js waits at least 250 ms * 2^n after the n-th failure in a
    # row (n from 0), whoever schedules the attempt (concord.js for 1001, htmx for 1006/1011).
    events = _events(p1)
    drop_at = next(i for i, e in enumerate(events) if e["type"] == "close")
    after = events[drop_at:]
    closes = [e for e in after if e["type"] == "close"]
    attempts = [e for e in after if e["type"] == "connecting"]
    codes = [e["code"] for e in closes]
    assert codes[0] == 1001 and codes[-1] == 1011 and set(codes[1:-1]) == {1006}, codes
    assert switch.met[-2:] == ["accepted, then failed", "connected"], switch.met
    # Every close but the current socket's was followed by exactly one attempt: no double sockets.
    assert len(attempts) == len(closes) >= 4, (len(attempts), len(closes))
    types = [e["type"] for e in events]
    assert types.count("connecting") == types.count("close") + 1, types
    last_open = max(i for i, e in enumerate(after) if e["type"] == "open")
    assert after[last_open - 1]["type"] == "connecting", [e["type"] for e in after]
    assert {e["type"] for e in after[last_open + 1:]} == {"message"}, [e["type"] for e in after]
    starts = [closes[0]["t"]] + [e["t"] for e in attempts]  # the drop, then each attempt
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    floors = [min(30000, 500 * 2**n) / 2 for n in range(len(gaps))]
    with capsys.disabled():
        print(f"\n[e2e {stack.mode}] reconnect attempts after the drop: {switch.met[1:]}; "
              f"ms between attempts: {[round(g) for g in gaps]} (at least {floors})")
    # Spaced, and ever more: the last attempt, after the accepted-then-failed one, waited at least
    # 2 s. Had that open started the backoff over, as htmx's own does, it could have come at once.
    for n, (gap, floor) in enumerate(zip(gaps, floors)):
        # 1 ms of slack: the page's clock is coarsened; timers do not fire early.
        assert gap >= floor - 1, f"attempt {n + 1} came {gap:.0f} ms after the previous, under the backoff's {floor:.0f} ms: {gaps}"

    for person in (p1, p2, p3):
        assert not person.page_errors, f"JavaScript errors in {person.name}'s browser: {person.page_errors}"
        assert not person.csp_violations(), person.csp_violations()
