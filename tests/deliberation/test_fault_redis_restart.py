"""Fault: Redis restarts during a round. Clients reconnect and render the current state, and the round completes.

Redis holds the channel layer (every socket's group membership, every event in flight), the
Celery broker (queues, the bindings that route a task to its queue, unacknowledged messages)
and the rate-limit counters. It is configured without persistence, so a restart loses all of
it. The database holds everything a participant submitted, so nothing submitted may be lost.

The site here: one daphne and one Celery worker (solo pool, the real default generator), on
the pytest-django test database and on a Redis server of this test's own, on a free port.
Only that private server is killed and restarted, never the machine's shared Redis. The rate
limits are on, as in production. Three members join and open their sockets. Their clients
behave like concord.js: when the server closes a socket (or the connection drops), they
reconnect with backoff and expect the full current state as the first thing the server sends.

1. Member 1 writes an opinion; everyone sees "1 of 3".
2. Redis is killed (SIGKILL). During the outage member 2 writes an opinion: the request must
   succeed (the database is up), though its event cannot be delivered and the rate limiter
   cannot count it.
3. A fresh, empty Redis starts on the same port. Every member must come to show "2 of 3":
   a socket that stayed open but lost its group membership would never be told.
4. Redis is killed again, and member 3 writes the last opinion during the outage. The write
   commits and the round moves to mediation, but the mediate_round task cannot be enqueued.
   The request must still succeed, and once Redis is back the round must not stay in
   mediation forever: the worker's recovery sweep re-enqueues it.
5. Every member is shown the statements, rates and ranks them, and reaches the end.

Then the database must hold every acknowledged submission (3 opinions, 6 ratings,
3 rankings), the round must be completed with one mediation, the worker must still be
running (it reconnects rather than exits), and once the members leave nobody may still be
shown as online (a consumer that crashed without running its disconnect would leave its
presence counted forever).

Before the fixes this test was written for, in order: the consumers crashed on the failed
Redis read (daphne closed with 1011, presence was never given back); with the rate limits on,
every submission in the outage was a 500; the worker exited ("Unrecoverable error", Celery
5.7); and the last opinion's request was a 500 although it had committed, leaving the round
in mediation with no task.

Needs a PostgreSQL DATABASE_URL (the processes share only the database and Redis) and a
redis-server binary. Process logs are printed at teardown, which pytest shows when the test
fails. The bounds below only stop a stuck run; nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from deliberation import services
from deliberation.models import Candidate, Opinion, Participant, Ranking, Rating, Room, Round
from tests.conftest import OPINIONS
from tests.deliberation.processes import (
    STARTUP_TIMEOUT_S,
    daphne_command,
    free_port,
    process_env,
    process_logs,
    start_process,
    stop_processes,
    wait_for_workers,
    wait_until_serving,
    worker_command,
)
from tests.factories import ExperimentFactory

DATABASE_URL = os.environ.get("DATABASE_URL", "")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
# Loading the model, generating 4 short candidates and ranking them takes ~15 s on two idle
# cores; a busy CI machine can be many times slower. The bounds only stop a stuck run.
MEDIATION_TIMEOUT_S = 300.0
# Reconnecting after a restart includes the clients' backoff (up to RECONNECT_MAX_DELAY_S).
PHASE_TIMEOUT_S = 60.0
RECONNECT_MAX_DELAY_S = 4.0
# How often the worker sweeps for lost work, and how long a mediation may go without progress
# before it counts as lost: short here, so the test does not wait minutes for the recovery.
RECOVERY_INTERVAL_S = 1
MEDIATION_STALL_S = 5

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.celery_worker,
    pytest.mark.skipif(
        not DATABASE_URL.startswith(("postgres://", "postgresql://")),
        reason="needs a PostgreSQL DATABASE_URL (`make test` starts one): the processes share only Redis and PostgreSQL",
    ),
    pytest.mark.skipif(not os.access(REDIS_SERVER, os.X_OK), reason="needs a redis-server binary to start and restart"),
]

_VIEW_RE = re.compile(r'<section id="main"[^>]*data-view="(?P<view>[a-z_]+)"')
_CANDIDATE_RE = re.compile(r'data-candidate="(?P<id>\d+)"')
_MEDIATION_SUCCEEDED_RE = re.compile(r"Task deliberation\.tasks\.mediate_round\[[^\]]+\] succeeded")


@dataclass
class PrivateRedis:
    """A redis-server of this test's own, without persistence: a restart starts it empty."""

    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self._wait_until_answering()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save; every client's connection is cut."""
        assert self.process is not None and self.process.poll() is None, "Redis is not running"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def restart_empty(self) -> None:
        self.start()
        self.restarts += 1
        # Nothing survived: no queues, no bindings, no groups.
        assert self._client().dbsize() == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def _client(self):  # noqa: ANN202 - redis.Redis, imported lazily like the settings do
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def _wait_until_answering(self) -> None:
        import redis

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, f"redis-server exited: {self.log_path.read_text(errors='replace')[-2000:]}"
            client = self._client()
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
            finally:
                client.close()
        raise AssertionError(f"redis-server on port {self.port} did not answer within {STARTUP_TIMEOUT_S:.0f} s")


@dataclass
class Site:
    daphne_url: str
    redis: PrivateRedis
    log_paths: dict[str, Path]
    processes: dict[str, subprocess.Popen[bytes]]

    def logs(self) -> str:
        return process_logs(self.log_paths, self.processes, tail=8000)

    def worker_log(self) -> str:
        return self.log_paths["worker"].read_text(errors="replace")


@pytest.fixture
def site(transactional_db, tmp_path: Path) -> Iterator[Site]:
    """Started after the test database exists; stopped before it is flushed (fixture order)."""
    redis = PrivateRedis(port=free_port(), log_path=tmp_path / "redis.log")
    env = process_env(redis.url, {
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        # The production limits, on: their counters live in the Redis that restarts, and a limiter
        # that cannot count must not refuse submissions. Three members stay far below them.
        "RATE_LIMIT_JOIN_PER_IP": "60",
        "RATE_LIMIT_SUBMIT_PER_PARTICIPANT": "60",
        "CONCORD_RECOVERY_INTERVAL_SECONDS": str(RECOVERY_INTERVAL_S),
        "CONCORD_MEDIATION_STALL_SECONDS": str(MEDIATION_STALL_S),
    })
    port = free_port()
    commands = {"daphne": daphne_command(port), "worker": worker_command("redis-restart")}
    log_paths = {"redis": redis.log_path, **{name: tmp_path / f"{name}.log" for name in commands}}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    site_ = Site(daphne_url=f"http://127.0.0.1:{port}/", redis=redis, log_paths=log_paths, processes=processes)
    try:
        redis.start()
        for name, command in commands.items():
            processes[name] = start_process(command, env, log_paths[name])
        wait_until_serving(site_.daphne_url, processes["daphne"])
        wait_for_workers(redis.url, ["redis-restart"])
        yield site_
    finally:
        stop_processes(processes.values())
        redis.stop()
        # Shown by pytest only when the test fails.
        print(site_.logs())


@dataclass
class Member:
    """One participant's browser: like concord.js, it reconnects with backoff whenever its socket closes."""

    base_url: str
    label: str
    session: aiohttp.ClientSession = field(default_factory=lambda: aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)))
    code: str = ""
    socket: aiohttp.ClientWebSocketResponse | None = None
    received: list[str] = field(default_factory=list)
    main_html: str = ""
    # What happened to this member's sockets: the close codes seen and how many times it connected.
    close_codes: list[int | None] = field(default_factory=list)
    connects: int = 0
    # Every submission the server acknowledged (200), to be found in the database at the end.
    acknowledged: list[tuple[str, dict[str, str]]] = field(default_factory=list)

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
        await self.connect(timeout=PHASE_TIMEOUT_S)

    async def connect(self, *, timeout: float) -> None:
        """Open the socket; while the server refuses or is unreachable, retry with jittered backoff (as concord.js)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.25
        url = f"{self.base_url.replace('http://', 'ws://')}ws/p/{self.code}/"
        while True:
            try:
                self.socket = await self.session.ws_connect(url, origin=self.base_url.rstrip("/"), timeout=aiohttp.ClientWSTimeout(ws_close=5))
                self.connects += 1
                return
            except (TimeoutError, aiohttp.WSServerHandshakeError, aiohttp.ClientConnectionError) as error:
                assert loop.time() + delay < deadline, f"{self.label}: could not reconnect within {timeout:.0f} s ({error!r})"
                await asyncio.sleep(delay / 2 + random.random() * delay / 2)
                delay = min(RECONNECT_MAX_DELAY_S, delay * 2)

    async def post(self, path: str, data: dict[str, str]) -> None:
        headers = {"X-CSRFToken": self._csrf(), "HX-Request": "true", "Referer": self.base_url}
        async with self.session.post(f"{self.base_url}p/{self.code}/{path}", data=data, headers=headers) as response:
            body = await response.text()
            assert response.status == 200 and 'class="error"' not in body, f"{self.label}: POST {path} -> {response.status}: {body[:300]}"
        self.acknowledged.append((path, data))

    def view(self) -> str:
        match = _VIEW_RE.search(self.main_html)
        return match.group("view") if match else ""

    async def wait_until(self, reached: Callable[[], bool], what: str, *, timeout: float) -> None:
        """Read this member's socket until `reached()` holds, reconnecting whenever it closes; bounded by `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not reached():
            remaining = deadline - loop.time()
            assert remaining > 0, f"{self.label}: no {what} within {timeout:.0f} s; at {self.view()!r}; closes {self.close_codes}"
            assert self.socket is not None
            try:
                # Not receive(timeout=...): aiohttp starts that timeout again after each ping it
                # answers, and daphne pings every 20 s, so it would never run out.
                message = await asyncio.wait_for(self.socket.receive(), timeout=remaining)
            except TimeoutError:
                continue  # the assertion above reports it
            if message.type == aiohttp.WSMsgType.TEXT:
                self.received.append(message.data)
                start = message.data.find('<section id="main"')
                if start >= 0:
                    self.main_html = message.data[start:]
                continue
            # Closed by the server, or the connection dropped: the browser reconnects, and the
            # server's first message on the new socket is the whole current state.
            self.close_codes.append(self.socket.close_code)
            await self.socket.close()
            await self.connect(timeout=max(1.0, deadline - loop.time()))

    async def wait_for_view(self, view: str, *, timeout: float) -> None:
        await self.wait_until(lambda: self.view() == view, f"view {view!r}", timeout=timeout)

    async def wait_for_text_after(self, mark: int, text: str, *, timeout: float) -> None:
        """Wait until a message received after the first `mark` messages contains `text`."""
        await self.wait_until(lambda: any(text in message for message in self.received[mark:]), repr(text), timeout=timeout)

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        await self.session.close()


async def _each(*waits: Awaitable[None]) -> None:
    """Wait for every member; the first failure cancels the other waits and is the one reported."""
    try:
        async with asyncio.TaskGroup() as group:
            for wait in waits:
                group.create_task(wait)
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None


def _make_room() -> Room:
    # n=4 candidates, k=2 shown (the factory's arm); the generator is the site default.
    experiment = ExperimentFactory(slug="redis-restart", group_size=3)
    return services.room_create(experiment=experiment)


def _opinions_in(count: int) -> str:
    return f"<p>{count} of 3 opinions are in.</p>"


def _round_state(room_id: int) -> Round:
    return Round.objects.get(room_id=room_id)


def _connections(room_id: int) -> dict[str, int]:
    return dict(Participant.objects.filter(room_id=room_id).values_list("label", "connections"))


async def _wait_for_round(room_id: int, reached: Callable[[Round], bool], what: str, *, timeout: float) -> Round:
    deadline = time.monotonic() + timeout
    while True:
        round_ = await sync_to_async(_round_state)(room_id)
        if reached(round_):
            return round_
        assert time.monotonic() < deadline, f"round did not reach {what} within {timeout:.0f} s: {round_.phase}/{round_.progress_stage}"
        await asyncio.sleep(0.2)


async def test_redis_restart_during_a_round_loses_nothing_and_the_round_completes(site: Site) -> None:
    try:
        await _run_round_through_two_restarts(site)
    finally:
        # The ORM calls ran in asgiref's thread; its connection must not outlive the test database.
        await sync_to_async(connections.close_all)()


async def _run_round_through_two_restarts(site: Site) -> None:
    room = await sync_to_async(_make_room)()
    join_path = f"e/redis-restart/r/{room.code}/join/"
    members = [Member(site.daphne_url, f"member-{index}") for index in range(1, 4)]
    first, second, third = members
    try:
        for member in members:
            await member.join(join_path)
        await _each(*(m.wait_for_view("opinions", timeout=PHASE_TIMEOUT_S) for m in members))

        # 1. An opinion with Redis up reaches everyone.
        await first.post("opinion/", {"text": OPINIONS[0]})
        await _each(*(m.wait_for_text_after(0, _opinions_in(1), timeout=PHASE_TIMEOUT_S) for m in members))

        # 2. Redis dies. The database is up, so a submission must still be accepted.
        site.redis.kill()
        await second.post("opinion/", {"text": OPINIONS[1]})

        # 3. A fresh, empty Redis: every screen must come to show the opinion written in the
        # outage. Its event was never delivered, so only a re-render after the restart shows it.
        marks = [len(m.received) for m in members]
        site.redis.restart_empty()
        await _each(*(m.wait_for_text_after(mark, _opinions_in(2), timeout=PHASE_TIMEOUT_S) for m, mark in zip(members, marks)))

        # 4. Redis dies again, just as the last opinion moves the round to mediation: the task
        # cannot be enqueued. The opinion is committed, so the request must succeed.
        site.redis.kill()
        await third.post("opinion/", {"text": OPINIONS[2]})
        round_ = await sync_to_async(_round_state)(room.pk)
        assert round_.phase == Round.Phase.MEDIATING and round_.mediation_attempts == 0
        site.redis.restart_empty()

        # 5. Once Redis is back, the round is recovered, and every member is shown the statements.
        await _each(*(m.wait_for_view("rating", timeout=MEDIATION_TIMEOUT_S) for m in members))
        for member in members:
            statement_ids = [int(match.group("id")) for match in _CANDIDATE_RE.finditer(member.main_html)]
            assert len(statement_ids) == 2, f"{member.label} was shown {statement_ids}"
            for candidate_id in statement_ids:
                await member.post(f"rate/{candidate_id}/", {"agreement": "5", "quality": "6"})
            await member.post("rank/", {f"rank_{cid}": str(position + 1) for position, cid in enumerate(statement_ids)})
        await _each(*(m.wait_for_view("done", timeout=PHASE_TIMEOUT_S) for m in members))
    finally:
        for member in members:
            print(f"{member.label}: connected {member.connects} times, socket close codes {member.close_codes}")
        await asyncio.gather(*(m.close() for m in members), return_exceptions=True)

    for member in members:
        assert any("data-candidate=" in m for m in member.received), f"{member.label} never received the statements"
        assert any('class="completion-code"' in m for m in member.received), f"{member.label} never received the end"

    # Every acknowledged submission is in the database, as it was sent.
    round_ = await sync_to_async(_round_state)(room.pk)
    assert round_.phase == Round.Phase.DONE and round_.outcome == Round.Outcome.COMPLETED
    opinions = await sync_to_async(lambda: dict(Opinion.objects.filter(round=round_).values_list("participant__code", "text")))()
    assert opinions == {member.code: text for member, text in zip(members, OPINIONS)}
    assert await sync_to_async(Candidate.objects.filter(round=round_).count)() == 4
    for member in members:
        stored = await sync_to_async(
            lambda code=member.code: sorted(Rating.objects.filter(participant__code=code).values_list("candidate_id", "agreement", "quality"))
        )()
        acknowledged = sorted((int(path.split("/")[1]), 5, 6) for path, _ in member.acknowledged if path.startswith("rate/"))
        assert len(acknowledged) == 2 and stored == acknowledged, f"{member.label}: stored {stored}, acknowledged {acknowledged}"
    assert await sync_to_async(Ranking.objects.filter(round=round_).count)() == 3
    assert await sync_to_async(Participant.objects.filter(room=room, finished_at__isnull=False).count)() == 3
    # The lost task was enqueued again, and the mediation ran once.
    assert round_.mediation_attempts == 1
    assert len(_MEDIATION_SUCCEEDED_RE.findall(site.worker_log())) >= 1
    # The worker lived through both restarts (it reconnected rather than exited).
    assert site.processes["worker"].poll() is None, "the Celery worker exited when Redis went away"

    # Everyone left: nobody may still count as connected, including sockets cut by the outages.
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while any((counts := await sync_to_async(_connections)(room.pk)).values()):
        assert time.monotonic() < deadline, f"presence still counts connections after everyone left: {counts}"
        await asyncio.sleep(0.2)
