"""The recovery sweep: periodically redo work whose task was lost (rounds_recover, below).

It needs no Celery beat, and no message survives in the broker to keep it going: the loop
lives in each process that runs tasks, and only reads and writes the database.

- With Celery (REDIS_URL set), each worker runs it on a daemon thread from the moment it is
  ready (config.celery connects worker_ready), so a worker that starts after an outage or a
  crash at once picks up what was lost. Several workers sweep safely together.
- In the embedded default (no REDIS_URL), tasks run on the ASGI server's own loop and are
  lost when the server stops; the server sweeps on that loop (config.asgi starts it with the
  first connection), so the tasks it re-enqueues, and the events they send, stay on it.

Layers above deliberation sweep for their own lost work in the same loop without deliberation
importing them: each registers a check by name (recovery_check_register; research registers
its stalled training runs from its AppConfig.ready), and every sweep calls them after its own.

CONCORD_RECOVERY_INTERVAL_SECONDS sets the period (0: off; off under pytest unless a test
turns it on) and CONCORD_MEDIATION_STALL_SECONDS when a mediation counts as lost. A running
mediation beats (heartbeat, below) well within that time, however long its model takes to
load, so only a mediation whose task is gone (or whose worker died) is taken for lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.db.models import Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from . import dispatch, events, services
from .dispatch import TaskName
from .models import Candidate, Room, Round

logger = logging.getLogger(__name__)

# A phase timer gets this long past its deadline to fire by itself before rounds_recover fires it.
DEADLINE_GRACE = timedelta(seconds=5)


@dataclass
class RecoveryReport:
    """What one rounds_recover sweep redid; empty (false) when nothing was lost."""

    requeued: list[int] = field(default_factory=list)  # rounds whose mediation was enqueued again
    failed: list[int] = field(default_factory=list)  # rounds that ran out of mediation attempts
    deadlines: dict[int, str] = field(default_factory=dict)  # round id: what its overdue phase deadline did
    waits: dict[int, str] = field(default_factory=dict)  # room id: what its overdue wait for a group did
    checks: dict[str, object] = field(default_factory=dict)  # registered check's name: what it redid (when anything)

    def __bool__(self) -> bool:
        return bool(self.requeued or self.failed or self.deadlines or self.waits or self.checks)


# A check of another layer's lost work: called with the sweep's time, returns what it redid (falsy: nothing).
RecoveryCheck = Callable[[datetime], object]
_checks: dict[str, RecoveryCheck] = {}


def recovery_check_register(*, name: str, check: RecoveryCheck) -> None:
    """Have every sweep also call `check` (idempotent per name: registering again replaces it)."""
    _checks[name] = check


def registered_checks() -> dict[str, RecoveryCheck]:
    return dict(_checks)


def rounds_recover(*, stalled_after: timedelta, now: datetime | None = None) -> RecoveryReport:
    """Redo work whose task was lost, so that no round waits forever.

    Tasks travel through the broker (Redis), which can lose them: a restart without persistence
    empties the queues and forgets unacknowledged and scheduled messages, and an enqueue while it
    is down fails after the write it belonged to has committed. The database still says what
    should be happening, so this sweep reads it and acts:

    - a round in mediation, without model-written candidates (a head-to-head round may already hold its human
      mediator's statement), that showed no sign of progress for
      `stalled_after` gets its mediate_round task again (or, once it has used up
      MAX_MEDIATION_ATTEMPTS, ends as failed rather than keep its group waiting);
    - an opinion or rating phase (or the closing questions after the last round) whose deadline passed
      DEADLINE_GRACE ago fires it;
    - a forming group whose maximum wait ran out fires that.

    Idempotent, and safe from any number of processes at once: each row is rechecked under its
    lock, a requeue restarts the stall clock, the deadline services check the database, and
    mediation_claim and candidates_store do nothing twice. A false alarm (a task still queued
    behind others, or a very slow model load) costs at most a duplicate message that finds
    nothing to do.
    """
    now = now or timezone.now()
    report = RecoveryReport()
    cutoff = now - stalled_after
    stalled = (
        # A human mediator's round has no task to lose (its writing timer is an ordinary deadline, below), unless a
        # model writes beside the mediator (head-to-head): then the human statement may already be in while the
        # model's task was lost, so "no statement yet" means no model-written one.
        Round.objects.filter(phase=Round.Phase.MEDIATING)
        .exclude(pk__in=Candidate.objects.filter(author__isnull=True).values("round_id"))
        .filter(Q(mediator__isnull=True) | Q(room__arm__compare_with__isnull=False))
        .annotate(last_sign=Coalesce("progress_at", "mediation_started_at"))
        .filter(last_sign__lt=cutoff)
        .values_list("pk", flat=True)
        .distinct()
    )
    for round_id in list(stalled):
        outcome = _mediation_recover(round_id=round_id, cutoff=cutoff, now=now)
        if outcome == "requeued":
            report.requeued.append(round_id)
        elif outcome == "failed":
            report.failed.append(round_id)
    overdue = Round.objects.filter(
        # DONE: the closing questions' timer after the last round (phases._closing_timer_start).
        Q(phase__in=[Round.Phase.OPINIONS, Round.Phase.RATING, Round.Phase.DONE]) | Q(phase=Round.Phase.MEDIATING, mediator__isnull=False),
        phase_deadline__lt=now - DEADLINE_GRACE,
    ).values_list("pk", "phase")
    for round_id, phase in list(overdue):
        report.deadlines[round_id] = services.round_deadline_fire(round_id=round_id, phase=phase)
    forming = Room.objects.filter(
        status=Room.Status.OPEN, experiment__max_wait_seconds__gt=0, rounds__index=0, rounds__phase=Round.Phase.WAITING
    ).values_list("pk", "created_at", "experiment__max_wait_seconds")
    for room_id, created_at, max_wait_seconds in list(forming):
        if created_at + timedelta(seconds=max_wait_seconds) + DEADLINE_GRACE < now:
            report.waits[room_id] = services.room_wait_deadline_fire(room_id=room_id)
    return report


def _mediation_recover(*, round_id: int, cutoff: datetime, now: datetime) -> str:
    with transaction.atomic():
        # A row locked by someone else (a worker claiming it right now) is moving: leave it.
        round_ = Round.objects.select_for_update(skip_locked=True).filter(pk=round_id).first()
        if round_ is None:
            return "busy"
        last_sign = round_.progress_at or round_.mediation_started_at
        model_written = round_.candidates.filter(author__isnull=True).exists()  # a human mediator's statement is no model's
        if round_.phase != Round.Phase.MEDIATING or model_written or last_sign is None or last_sign >= cutoff:
            return "moved"
        round_.progress_at = now
        if not round_.mediation_attempts_left():
            round_.mediation_error = (round_.mediation_error + "\n" if round_.mediation_error else "") + (
                f"no progress since {last_sign.isoformat()} after {round_.mediation_attempts} attempts"
            )
            round_.progress_stage = Round.Stage.FAILED
            round_.save(update_fields=["progress_at", "progress_stage", "mediation_error"])
            services.round_finish(round_=round_, outcome=Round.Outcome.FAILED)
            return "failed"
        round_.progress_stage = Round.Stage.QUEUED
        round_.progress_done = 0
        round_.save(update_fields=["progress_at", "progress_stage", "progress_done"])
        events.send_on_commit(
            events.MediationProgress(room_id=round_.room_id, round_id=round_.pk, stage=Round.Stage.QUEUED, done=0, total=round_.progress_total)
        )
        transaction.on_commit(lambda: dispatch.enqueue(TaskName.MEDIATE_ROUND, args=[round_id]))
    return "requeued"


def sweep_once() -> RecoveryReport | None:
    """One sweep; never raises (the database may be down too: the next sweep tries again)."""
    close_old_connections()
    try:
        report = rounds_recover(stalled_after=timedelta(seconds=settings.CONCORD_MEDIATION_STALL_SECONDS))
        now = timezone.now()
        for name, check in registered_checks().items():
            try:
                outcome = check(now)
            except Exception:  # one layer's failing check must not stop the others (nor the rooms' sweep)
                logger.exception("Recovery check %s failed", name)
                continue
            if outcome:
                report.checks[name] = outcome
    except Exception:
        logger.exception("Recovery sweep failed; trying again in %s s", settings.CONCORD_RECOVERY_INTERVAL_SECONDS)
        return None
    finally:
        close_old_connections()
    if report:
        logger.warning("Recovered lost work: %s", report)
    return report


@contextlib.contextmanager
def heartbeat_thread(*, beat: Callable[[], object], interval: float, name: str) -> Iterator[None]:
    """While the block runs, call `beat` every `interval` seconds on a thread of its own (with its own
    database connection, closed at the end), so that long work is not taken for lost by a sweep. A
    failing beat is logged and the next one tried: a missed beat only risks a false alarm."""
    stop = threading.Event()

    def run() -> None:
        try:
            while not stop.wait(interval):
                try:
                    beat()
                except Exception:
                    logger.warning("Heartbeat %s failed", name, exc_info=True)
        finally:
            connection.close()  # this thread's own connection

    thread = threading.Thread(target=run, daemon=True, name=f"heartbeat-{name}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def heartbeat(*, round_id: int) -> contextlib.AbstractContextManager[None]:
    """While the block runs (a mediation), mark the round alive every third of the stall time (a missed
    beat only risks a duplicate task, which finds nothing to do)."""
    return heartbeat_thread(
        beat=lambda: services.mediation_heartbeat(round_id=round_id),
        interval=max(1.0, settings.CONCORD_MEDIATION_STALL_SECONDS / 3),
        name=f"round-{round_id}",
    )


_started = False
_start_lock = threading.Lock()
# Set by stop(); the sweep of this process ends at its next wake-up.
_stopping = threading.Event()
_thread: threading.Thread | None = None
_loop_task: tuple[asyncio.AbstractEventLoop, asyncio.Task[None]] | None = None


def _claim_start() -> bool:
    """True once per process (until stop()), and only when the sweep is on."""
    global _started
    if settings.CONCORD_RECOVERY_INTERVAL_SECONDS <= 0:
        return False
    with _start_lock:
        if _started:
            return False
        _started = True
        _stopping.clear()
    return True


def start_in_thread() -> bool:
    """Sweep now and then every interval on a daemon thread (Celery workers). Idempotent."""
    global _thread
    if not _claim_start():
        return False
    interval = settings.CONCORD_RECOVERY_INTERVAL_SECONDS

    def sweep_forever() -> None:
        while not _stopping.is_set():
            sweep_once()
            _stopping.wait(interval)

    _thread = threading.Thread(target=sweep_forever, daemon=True, name="concord-recovery")
    _thread.start()
    logger.info("Recovery sweep every %s s", interval)
    return True


def start_on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Sweep now and then every interval as a task of the server's loop (embedded mode). Idempotent.

    Each sweep runs on a thread started from the loop, like in-process tasks (deliberation.dispatch),
    so the events it sends reach the in-memory channel layer on its own loop.
    """
    if not _claim_start():
        return False
    interval = settings.CONCORD_RECOVERY_INTERVAL_SECONDS

    async def sweep_forever() -> None:
        while not _stopping.is_set():
            await sync_to_async(sweep_once, thread_sensitive=False)()
            await asyncio.sleep(interval)

    def create() -> None:
        global _loop_task
        _loop_task = (loop, loop.create_task(sweep_forever(), name="concord-recovery"))

    loop.call_soon_threadsafe(create)
    logger.info("Recovery sweep every %s s", interval)
    return True


def stop() -> None:
    """End this process's sweep and allow a new start (for tests; processes simply exit)."""
    global _started, _thread, _loop_task
    _stopping.set()
    if _thread is not None:
        _thread.join(timeout=30)
        _thread = None
    if _loop_task is not None:
        loop, task = _loop_task
        if not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
        _loop_task = None
    with _start_lock:
        _started = False
