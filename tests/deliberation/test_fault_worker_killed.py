"""Fault: the Celery worker is killed in the middle of generation.

Worker A (a real `celery worker` process, solo pool, the real default generator) takes a
round's `mediate_round` task. As soon as the round reports that statements are being
generated, and before any candidate exists, A is killed with SIGKILL: no warm shutdown, no
chance to reject or requeue the message, exactly like an OOM kill or a lost machine. The
message stays in Redis unacknowledged (the task is `acks_late`). Worker B is then started, as
a supervisor would restart a crashed worker. Once the message is older than the visibility
timeout (10 s here), B's restore sweep (every 10 s, see CELERY_BROKER_TRANSPORT_OPTIONS) puts
it back on the queue and B runs it again: the round is claimed a second time, completes once,
and has exactly the arm's candidates, each index once, each shown statement presented once to
each member.

Needs REDIS_URL and a PostgreSQL DATABASE_URL (`make test` starts both), like test_multi_process: the
workers use the test database (committed with transaction=True) and a Redis database of
their own, flushed before and after. Worker logs are printed at teardown, which pytest shows
when the test fails. Bounds below only stop a stuck run; nothing asserts on speed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from deliberation import dispatch, services
from deliberation.models import Candidate, Participant, PredictedAgreement, Presentation, Room, Round
from tests.conftest import OPINIONS
from tests.deliberation.processes import (
    STARTUP_TIMEOUT_S,
    flush_redis,
    process_env,
    process_logs,
    redis_url_with_db,
    start_process,
    stop_processes,
    wait_for_workers,
    worker_command,
)
from tests.factories import ExperimentFactory

REDIS_URL = os.environ.get("REDIS_URL", "")
DATABASE_URL = os.environ.get("DATABASE_URL", "")
# A Redis database of its own (test_multi_process uses 14): the queues start empty, and no other
# test's or developer's worker can take the task or restore its unacknowledged message.
FAULT_REDIS_DB = 13
# The smallest the settings allow: the killed worker's task comes back after 10 s, not 15 minutes.
VISIBILITY_TIMEOUT_S = 10
# Loading the model takes seconds on idle cores; a busy CI machine can be many times slower.
GENERATION_START_TIMEOUT_S = 300.0
# Redelivery (visibility timeout plus the transport's restore sweep), then a whole mediation.
REDELIVERY_AND_MEDIATION_TIMEOUT_S = 300.0
POLL_S = 0.05

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.celery_worker,
    pytest.mark.skipif(
        not REDIS_URL or not DATABASE_URL.startswith(("postgres://", "postgresql://")),
        reason="needs REDIS_URL and a PostgreSQL DATABASE_URL (`make test` starts both): the workers are separate processes",
    ),
]

_RECEIVED_RE = re.compile(r"Task deliberation\.tasks\.mediate_round\[(?P<id>[^\]]+)\] received")
_SUCCEEDED_RE = re.compile(r"Task deliberation\.tasks\.mediate_round\[(?P<id>[^\]]+)\] succeeded in [^:]+: (?P<value>.*)")
# Kombu's Redis transport (ack emulation): a delivered, unacknowledged message is kept in this hash
# (and indexed by delivery time in "unacked_index") until it is acknowledged or restored to its queue.
UNACKED_KEY = "unacked"
GPU_QUEUE = "gpu"
MEDIATE_ROUND = "deliberation.tasks.mediate_round"


def _wait_for(condition: Callable[[], bool], what: str, *, timeout: float, alive: Callable[[], None] = lambda: None) -> None:
    """Poll `condition` until it holds; `alive` raises if a process we depend on has died."""
    deadline = time.monotonic() + timeout
    while not condition():
        alive()
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(POLL_S)


@dataclass
class FaultSite:
    """Celery workers started one at a time against the test database and Redis db 13."""

    redis_url: str
    env: dict[str, str]
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        process = start_process(worker_command(name), self.env, self.log_path(name))
        self.processes[name] = process
        wait_for_workers(self.redis_url, [name], processes={name: process})
        return process

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def logs(self) -> str:
        return process_logs({name: self.log_path(name) for name in self.processes}, self.processes, tail=8000)

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url)

    def mediations_in_redis(self) -> tuple[int, int]:
        """(unacknowledged, queued) mediate_round messages. Only these: the phase timers
        (round_deadline, countdown tasks) are held unacknowledged by whichever worker has them too."""
        client = self.redis()
        try:
            unacked = [json.loads(raw)[0] for raw in client.hvals(UNACKED_KEY)]
            queued = [json.loads(raw) for raw in client.lrange(GPU_QUEUE, 0, -1)]
        finally:
            client.close()

        def count(payloads: list[dict[str, Any]]) -> int:
            return sum(payload["headers"].get("task") == MEDIATE_ROUND for payload in payloads)

        return count(unacked), count(queued)


@pytest.fixture
def fault_site(transactional_db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultSite]:
    """Started after the test database exists; workers stopped before it is flushed (fixture order)."""
    redis_url = redis_url_with_db(REDIS_URL, FAULT_REDIS_DB)
    env = process_env(redis_url, {
        "CELERY_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT_S),
        # Under test is the broker's redelivery alone: the workers' periodic recovery sweep (which
        # re-enqueues a mediation stalled for minutes) stays off, so it cannot add a delivery.
        "CONCORD_RECOVERY_INTERVAL_SECONDS": "0",
    })
    site = FaultSite(redis_url=redis_url, env=env, log_dir=tmp_path)
    flush_redis(redis_url)

    # This process's Celery app publishes to REDIS_URL's database; the round's tasks must reach the
    # workers' database instead. The project's app (its settings and routes: mediate_round -> "gpu"),
    # named explicitly, since a shared task follows whichever app an earlier test made current.
    from config.celery import app

    def enqueue(name: str, *, args: list[Any], countdown: float = 0.0) -> bool:
        with app.connection_for_write(redis_url) as connection:
            dispatch.task_named(name).apply_async(args=args, countdown=countdown if countdown > 0 else None, connection=connection)
        return True

    monkeypatch.setattr(dispatch, "enqueue", enqueue)
    try:
        yield site
    finally:
        stop_processes(site.processes.values())
        # Shown by pytest only when the test fails.
        print(site.logs())
        flush_redis(redis_url)


def _round_in_mediation() -> Round:
    """A room of three whose opinions are all in: committing the last one enqueues mediate_round."""
    experiment = ExperimentFactory(slug="worker-killed", group_size=3)
    room = services.room_create(experiment=experiment)
    members = [services.participant_join(experiment=experiment, room=room, external_id=f"pid-{i}") for i in range(3)]
    for member, text in zip(members, OPINIONS):
        services.opinion_submit(participant=member, text=text)
    round_ = Round.objects.get(room=room)
    assert round_.phase == Round.Phase.MEDIATING
    return round_


def test_a_worker_killed_mid_generation_is_redelivered_and_the_round_completes_once(fault_site: FaultSite) -> None:
    worker_a = fault_site.start_worker("fault-a")
    round_ = _round_in_mediation()
    room: Room = round_.room
    arm = room.arm

    def a_alive() -> None:
        assert worker_a.poll() is None, f"worker A exited on its own ({worker_a.returncode})"

    # Kill inside generation: the model is loaded and writing ("generating" is reported by the
    # pipeline as it starts, then per finished statement), nothing is ranked or stored yet. Any
    # later stage also ends the wait, so a run that somehow missed the window fails below, fast.
    _wait_for(lambda: Round.objects.get(pk=round_.pk).progress_stage not in ("queued", "starting"),
              "generation on worker A", timeout=GENERATION_START_TIMEOUT_S, alive=a_alive)
    os.kill(worker_a.pid, signal.SIGKILL)
    worker_a.wait(timeout=30)
    assert worker_a.returncode == -signal.SIGKILL

    at_kill = Round.objects.get(pk=round_.pk)
    # Checked after the kill, so nothing can have been stored between the check and the kill.
    assert at_kill.phase == Round.Phase.MEDIATING and at_kill.progress_stage == "generating", (
        f"killed too late: {at_kill.phase} / {at_kill.progress_stage}"
    )
    print(f"worker A killed while generating, {at_kill.progress_done} of {at_kill.progress_total} statements written")
    assert not Candidate.objects.filter(round=round_).exists()
    assert at_kill.mediation_attempts == 1
    # The message is neither acknowledged nor back on the queue: it waits for the visibility timeout.
    assert fault_site.mediations_in_redis() == (1, 0)
    received_by_a = _RECEIVED_RE.findall(fault_site.log("fault-a"))
    assert len(received_by_a) == 1 and not _SUCCEEDED_RE.search(fault_site.log("fault-a"))

    # A restarted worker. It restores the message once it is older than the visibility timeout
    # (kombu's restore sweep), then takes it from the queue like any other.
    worker_b = fault_site.start_worker("fault-b")

    def b_alive() -> None:
        assert worker_b.poll() is None, f"worker B exited ({worker_b.returncode})"

    _wait_for(lambda: Round.objects.get(pk=round_.pk).phase != Round.Phase.MEDIATING, "end of mediation on worker B",
              timeout=REDELIVERY_AND_MEDIATION_TIMEOUT_S, alive=b_alive)
    # The success line and the acknowledgement follow the commit of the candidates by a moment.
    _wait_for(lambda: _SUCCEEDED_RE.search(fault_site.log("fault-b")) is not None and fault_site.mediations_in_redis() == (0, 0),
              "acknowledged success on worker B", timeout=STARTUP_TIMEOUT_S, alive=b_alive)

    round_.refresh_from_db()
    assert round_.phase == Round.Phase.RATING, f"{round_.phase} ({round_.outcome}): {round_.mediation_error}"
    assert round_.outcome == Round.Outcome.PENDING and round_.mediation_error == ""  # open for rating, not failed
    assert round_.progress_stage == "ready"
    # One claim per delivery: A's, then B's of the redelivered message (not a Celery retry).
    assert round_.mediation_attempts == 2

    # Exactly one set of candidates: n, indexes 0..n-1 once each (the database also refuses a
    # second (round, index): constraint candidate_unique_index), k shown.
    candidates = list(Candidate.objects.filter(round=round_).order_by("index"))
    assert len(candidates) == arm.n_candidates
    assert [c.index for c in candidates] == list(range(arm.n_candidates))
    assert sum(c.shown for c in candidates) == arm.k_shown
    assert PredictedAgreement.objects.filter(candidate__round=round_).count() == arm.n_candidates * 3
    shown_ids = {c.pk for c in candidates if c.shown}
    participants = list(Participant.objects.filter(room=room))
    assert len(participants) == 3
    for participant in participants:
        presented = list(Presentation.objects.filter(participant=participant).order_by("position"))
        assert [p.position for p in presented] == list(range(arm.k_shown)), participant
        assert {p.candidate_id for p in presented} == shown_ids, participant

    # The same message, redelivered: B received the task id A was killed in, and ran it to success once.
    log_b = fault_site.log("fault-b")
    assert _RECEIVED_RE.findall(log_b) == received_by_a
    successes = _SUCCEEDED_RE.findall(log_b)
    assert successes == [(received_by_a[0], "'stored'")], successes
    # Nothing is left to deliver a third time.
    assert fault_site.mediations_in_redis() == (0, 0)
