"""The recovery sweep: periodically redo work whose task was lost (services.rounds_recover).

It needs no Celery beat, and no message survives in the broker to keep it going: the loop
lives in each process that runs tasks, and only reads and writes the database.

- With Celery (REDIS_URL set), each worker runs it on a daemon thread from the moment it is
  ready (config.celery connects worker_ready), so a worker that starts after an outage or a
  crash at once picks up what was lost. Several workers sweep safely together.
- In the embedded default (no REDIS_URL), tasks run on the ASGI server's own loop and are
  lost when the server stops; the server sweeps on that loop (config.asgi starts it with the
  first connection), so the tasks it re-enqueues, and the events they send, stay on it.

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
from collections.abc import Iterator
from datetime import timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection

from . import services

logger = logging.getLogger(__name__)


def sweep_once() -> services.RecoveryReport | None:
    """One sweep; never raises (the database may be down too: the next sweep tries again)."""
    close_old_connections()
    try:
        report = services.rounds_recover(stalled_after=timedelta(seconds=settings.CONCORD_MEDIATION_STALL_SECONDS))
    except Exception:
        logger.exception("Recovery sweep failed; trying again in %s s", settings.CONCORD_RECOVERY_INTERVAL_SECONDS)
        return None
    finally:
        close_old_connections()
    if report:
        logger.warning("Recovered lost work: %s", report)
    return report


@contextlib.contextmanager
def heartbeat(*, round_id: int) -> Iterator[None]:
    """While the block runs (a mediation), mark the round alive every third of the stall time."""
    stop = threading.Event()
    interval = max(1.0, settings.CONCORD_MEDIATION_STALL_SECONDS / 3)

    def beat() -> None:
        try:
            while not stop.wait(interval):
                try:
                    services.mediation_heartbeat(round_id=round_id)
                except Exception:  # a missed beat only risks a duplicate task, which finds nothing to do
                    logger.warning("Heartbeat of round %s failed", round_id, exc_info=True)
        finally:
            connection.close()  # this thread's own connection

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-round-{round_id}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


_started = False
_start_lock = threading.Lock()
# Set by stop(); the sweep of this process ends at its next wake-up.
_stopping = threading.Event()
_thread: threading.Thread | None = None
_loop_task: tuple[asyncio.AbstractEventLoop, "asyncio.Task[None]"] | None = None


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
