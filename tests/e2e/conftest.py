"""Fixtures of the browser test: the real server stack, Chromium, and one browser context per person.

Run on their own (`make test-e2e`): pytest -p no:asyncio -o addopts="" tests/e2e
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from .helpers import CHROMIUM_ARGS, OBSERVER_SCRIPT, STEP_TIMEOUT_MS, Person
from .server import REPO, Stack, chromium_path, start_stack

# The running stack, so a failing test's report can carry the server logs.
_ACTIVE: dict[str, Stack] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    stack = _ACTIVE.get("stack")
    if report.failed and stack is not None:
        report.sections.append((f"Concord server logs ({stack.mode}, in {stack.tmp})", stack.log_report()))


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("concord-e2e"))
    _ACTIVE["stack"] = running
    print(f"\n[e2e] {running.mode} stack at {running.base_url}; logs in {running.tmp}")
    try:
        yield running
    finally:
        _ACTIVE.pop("stack", None)
        running.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    if executable is None:
        pytest.fail("Browser tests need Debian's Chromium at /usr/bin/chromium (apt-get install chromium).")
    expect.set_options(timeout=STEP_TIMEOUT_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def shots(stack: Stack) -> Path:
    """Screenshots of every key step, under test-results/ (gitignored), one folder per mode."""
    folder = REPO / "test-results" / "e2e" / stack.mode
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def new_person(browser: Browser, shots: Path) -> Iterator[Callable[..., Person]]:
    """Make a person with a browser context of their own (separate cookies, separate session)."""
    people: list[Person] = []

    def make(name: str, **context_options) -> Person:
        context = browser.new_context(**context_options)
        context.set_default_timeout(STEP_TIMEOUT_MS)
        context.add_init_script(OBSERVER_SCRIPT)
        page = context.new_page()
        person = Person(name=name, context=context, page=page, shots=shots)
        page.on("pageerror", lambda error: person.page_errors.append(str(error)))
        page.on("console", lambda message: person.console_errors.append(message.text) if message.type == "error" else None)
        people.append(person)
        return person

    yield make
    for person in people:
        if person.console_errors:
            print(f"[e2e] console errors in {person.name}'s browser: {person.console_errors}")
        person.context.close()
