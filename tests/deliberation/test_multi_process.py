"""More than one machine: 2 daphne processes and 2 Celery workers that share only Redis and PostgreSQL.

A room of three: two members are connected to daphne A, one to daphne B. A whole round
runs with the real default generator on whichever worker takes the task, and every
member, on either daphne, receives the mediator's progress, the statements and the end.
Nothing in one process can reach a socket of another except through the Redis channel
layer, so this is the same as running them on separate machines.

Needs REDIS_URL and a PostgreSQL DATABASE_URL (`make test` starts both). The subprocesses use the
test database (pytest-django's, committed with transaction=True) and a Redis database
number of their own, flushed before and after. Their logs are printed at teardown, which
pytest shows when the test fails.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from deliberation import services
from deliberation.models import Candidate, Participant, Ranking, Rating, Room, Round
from tests.conftest import OPINIONS
from tests.deliberation.processes import (
    daphne_command,
    flush_redis,
    free_port,
    process_env,
    process_logs,
    redis_url_with_db,
    start_process,
    stop_processes,
    wait_for_workers,
    wait_until_serving,
    worker_command,
)
from tests.factories import ExperimentFactory

REDIS_URL = os.environ.get("REDIS_URL", "")
DATABASE_URL = os.environ.get("DATABASE_URL", "")
# A Redis database of its own: the workers' queues and the channel layer start empty, and
# nothing another test (or a developer's site on db 0) enqueues can reach these workers.
MULTI_PROCESS_REDIS_DB = 14
# Loading the model, generating 4 short candidates and ranking them: ~15 s on two idle cores. The bound
# is generous because a busy CI machine can be many times slower; it only stops a stuck run.
MEDIATION_TIMEOUT_S = 300.0
PHASE_TIMEOUT_S = 30.0

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.celery_worker,
    pytest.mark.skipif(
        not REDIS_URL or not DATABASE_URL.startswith(("postgres://", "postgresql://")),
        reason="needs REDIS_URL and a PostgreSQL DATABASE_URL (`make test` starts both): processes share only Redis and PostgreSQL",
    ),
]

_VIEW_RE = re.compile(r'<section id="main"[^>]*data-view="(?P<view>[a-z_]+)"')
_CANDIDATE_RE = re.compile(r'data-candidate="(?P<id>\d+)"')
_MEDIATION_SUCCEEDED_RE = re.compile(r"Task deliberation\.tasks\.mediate_round\[[^\]]+\] succeeded")
MEDIATOR_AT_WORK = ("The mediator is writing statements", "Ranking the statements")


@dataclass
class Site:
    """Two daphne processes (A, B) and two Celery workers, as separate OS processes."""

    daphne_urls: list[str]
    redis_url: str
    log_paths: dict[str, Path]
    processes: dict[str, subprocess.Popen[bytes]]

    def logs(self) -> str:
        return process_logs(self.log_paths, self.processes, tail=6000)


@pytest.fixture
def site(transactional_db, tmp_path: Path) -> Iterator[Site]:
    """Started after the test database exists; stopped before it is flushed (fixture order)."""
    redis_url = redis_url_with_db(REDIS_URL, MULTI_PROCESS_REDIS_DB)
    flush_redis(redis_url)
    env = process_env(redis_url, {
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        # All clients share 127.0.0.1.
        "RATE_LIMIT_JOIN_PER_IP": "0",
        "RATE_LIMIT_SUBMIT_PER_PARTICIPANT": "0",
    })
    ports = [free_port(), free_port()]
    commands = {
        "daphne-a": daphne_command(ports[0]),
        "daphne-b": daphne_command(ports[1]),
        "worker-a": worker_command("multi-a"),
        "worker-b": worker_command("multi-b"),
    }
    log_paths = {name: tmp_path / f"{name}.log" for name in commands}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    site_ = Site(daphne_urls=[f"http://127.0.0.1:{port}/" for port in ports], redis_url=redis_url,
                 log_paths=log_paths, processes=processes)
    try:
        for name, command in commands.items():
            processes[name] = start_process(command, env, log_paths[name])
        for url, name in zip(site_.daphne_urls, ("daphne-a", "daphne-b")):
            wait_until_serving(url, processes[name])
        # Both workers answer a ping through the shared broker, so both could take the task.
        wait_for_workers(redis_url, ["multi-a", "multi-b"])
        yield site_
    finally:
        stop_processes(processes.values())
        # Shown by pytest only when the test fails.
        print(site_.logs())
        flush_redis(redis_url)


@dataclass
class Member:
    """One participant's browser, connected to one daphne."""

    base_url: str
    label: str
    session: aiohttp.ClientSession = field(default_factory=lambda: aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)))
    code: str = ""
    socket: aiohttp.ClientWebSocketResponse | None = None
    received: list[str] = field(default_factory=list)
    main_html: str = ""

    def _csrf(self) -> str:
        return next(cookie.value for cookie in self.session.cookie_jar if cookie.key == "csrftoken")

    async def join(self, join_path: str) -> None:
        url = f"{self.base_url}{join_path}?participant_label={self.label}"
        async with self.session.get(url) as response:
            assert response.status == 200, f"{self.label}: invite link -> {response.status}"
        headers = {"X-CSRFToken": self._csrf(), "Referer": url}
        async with self.session.post(url, data={"consent": "yes"}, headers=headers) as response:
            assert response.status == 200 and "/p/" in response.url.path, f"{self.label}: join -> {response.status}"
            self.code = response.url.path.rstrip("/").rsplit("/", 1)[-1]
        self.socket = await self.session.ws_connect(
            f"{self.base_url.replace('http://', 'ws://')}ws/p/{self.code}/", origin=self.base_url.rstrip("/")
        )

    async def post(self, path: str, data: dict[str, str]) -> None:
        headers = {"X-CSRFToken": self._csrf(), "HX-Request": "true", "Referer": self.base_url}
        async with self.session.post(f"{self.base_url}p/{self.code}/{path}", data=data, headers=headers) as response:
            body = await response.text()
            assert response.status == 200 and 'class="error"' not in body, f"{self.label}: POST {path} -> {response.status}: {body[:300]}"

    def view(self) -> str:
        match = _VIEW_RE.search(self.main_html)
        return match.group("view") if match else ""

    async def wait_until(self, reached: Callable[[], bool], what: str, *, timeout: float) -> None:
        """Read this member's socket until `reached()` holds; bounded by `timeout`."""
        assert self.socket is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not reached():
            remaining = deadline - loop.time()
            assert remaining > 0, f"{self.label} ({self.base_url}): no {what} within {timeout:.0f} s; at {self.view()!r}"
            message = await self.socket.receive(timeout=remaining)
            assert message.type == aiohttp.WSMsgType.TEXT, f"{self.label}: socket closed ({message.type.name}) before {what}"
            self.received.append(message.data)
            start = message.data.find('<section id="main"')
            if start >= 0:
                self.main_html = message.data[start:]

    async def wait_for_view(self, view: str, *, timeout: float) -> None:
        await self.wait_until(lambda: self.view() == view, f"view {view!r}", timeout=timeout)

    async def wait_for_text(self, text: str, *, timeout: float) -> None:
        await self.wait_until(lambda: self.saw(text), repr(text), timeout=timeout)

    def saw(self, text: str) -> bool:
        return any(text in message for message in self.received)

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        await self.session.close()


def _make_room() -> Room:
    # n=4 candidates, k=2 shown (the factory's arm); the generator is the site default.
    experiment = ExperimentFactory(slug="multi-process", group_size=3)
    return services.room_create(experiment=experiment)


async def test_events_from_a_task_reach_members_on_either_daphne(site: Site) -> None:
    room = await sync_to_async(_make_room)()
    join_path = f"e/multi-process/r/{room.code}/join/"
    daphne_a, daphne_b = site.daphne_urls
    on_b, on_a_1, on_a_2 = members = [Member(daphne_b, "on-b"), Member(daphne_a, "on-a-1"), Member(daphne_a, "on-a-2")]
    try:
        for member in members:
            await member.join(join_path)
        await asyncio.gather(*(m.wait_for_view("opinions", timeout=PHASE_TIMEOUT_S) for m in members))

        # Each opinion goes to its author's daphne; before the next one, the new count must have
        # reached the others, so each wait below is a delivery across processes (B to A, then A to B).
        for count, (author, text) in enumerate(zip(members[:2], OPINIONS), start=1):
            await author.post("opinion/", {"text": text})
            others = [m for m in members if m is not author]
            await asyncio.gather(*(m.wait_for_text(f"<p>{count} of 3 opinions are in.</p>", timeout=PHASE_TIMEOUT_S) for m in others))
        await on_a_2.post("opinion/", {"text": OPINIONS[2]})

        # The task, on whichever worker takes it, reports progress and stores the statements.
        await asyncio.gather(*(m.wait_for_view("rating", timeout=MEDIATION_TIMEOUT_S) for m in members))
        for member in members:
            statement_ids = [int(match.group("id")) for match in _CANDIDATE_RE.finditer(member.main_html)]
            assert len(statement_ids) == 2, f"{member.label} was shown {statement_ids}"
            for candidate_id in statement_ids:
                await member.post(f"rate/{candidate_id}/", {"agreement": "5", "quality": "6"})
            await member.post("rank/", {f"rank_{cid}": str(position + 1) for position, cid in enumerate(statement_ids)})
        await asyncio.gather(*(m.wait_for_view("done", timeout=PHASE_TIMEOUT_S) for m in members))
    finally:
        await asyncio.gather(*(m.close() for m in members), return_exceptions=True)

    for member in members:
        assert any(member.saw(text) for text in MEDIATOR_AT_WORK), f"{member.label} on {member.base_url} saw no progress"
        assert member.saw("data-candidate="), f"{member.label} never received the statements"
        assert member.saw('class="completion-code"'), f"{member.label} never received the end"

    round_ = await sync_to_async(Round.objects.get)(room=room)
    assert round_.phase == Round.Phase.DONE and round_.outcome == Round.Outcome.COMPLETED
    assert round_.mediation_attempts == 1
    assert await sync_to_async(Candidate.objects.filter(round=round_).count)() == 4
    assert await sync_to_async(Rating.objects.filter(candidate__round=round_).count)() == 3 * 2
    assert await sync_to_async(Ranking.objects.filter(round=round_).count)() == 3
    assert await sync_to_async(Participant.objects.filter(room=room, finished_at__isnull=False).count)() == 3
    # One shared queue: the mediation ran exactly once, on one of the two workers.
    runs = {name: len(_MEDIATION_SUCCEEDED_RE.findall(path.read_text(errors="replace")))
            for name, path in site.log_paths.items() if name.startswith("worker")}
    assert sum(runs.values()) == 1, f"mediate_round succeeded {runs}"
    # The ORM calls above ran in asgiref's thread; its connection must not outlive the test database.
    await sync_to_async(connections.close_all)()
