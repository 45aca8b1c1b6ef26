"""Where tasks run: on Celery workers when Redis is configured, else in-process.

The embedded default (no REDIS_URL) runs tasks on the ASGI server's own event
loop, in a worker thread, after an optional countdown. That keeps generation off
the request path, and lets tasks reach the in-memory channel layer safely: it
is bound to the server's loop, and asgiref routes async_to_sync calls from a
thread started by that loop back onto it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from asgiref.sync import sync_to_async
from celery import Task
from django.conf import settings
from django.db import close_old_connections

logger = logging.getLogger(__name__)

_server_loop: asyncio.AbstractEventLoop | None = None
_fallback_lock = threading.Lock()


def remember_server_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Called by the ASGI application, so in-process tasks run on the server's loop."""
    global _server_loop
    _server_loop = loop


def enqueue(task: Task, *, args: list[Any], countdown: float = 0.0) -> bool:
    """Run `task(*args)` later: call only from transaction.on_commit callbacks.

    Returns whether the task was handed on. A broker that is down (Redis restarting) must not
    turn the write that committed just before into an error for the person who made it, so a
    failed enqueue is logged, not raised: the database still says what should happen, and
    services.rounds_recover (run periodically, see deliberation.recovery) enqueues it again.
    """
    if settings.USE_CELERY:
        try:
            task.apply_async(args=args, countdown=countdown if countdown > 0 else None)
        except Exception:  # kombu's OperationalError, redis-py's errors, OSError: all mean "not sent"
            logger.exception("Could not enqueue %s%r; the recovery sweep will redo it", task.name, tuple(args))
            return False
        return True
    loop = _server_loop
    coroutine = _run_in_process(task, args, countdown)
    if loop is not None and loop.is_running() and not loop.is_closed():
        asyncio.run_coroutine_threadsafe(coroutine, loop)
    else:
        # No server running (a management command, say): a daemon thread with its own loop.
        threading.Thread(target=asyncio.run, args=(coroutine,), daemon=True, name=f"task-{task.name}").start()
    return True


def _apply_now(task: Task, args: list[Any]) -> None:
    close_old_connections()
    try:
        result = task.apply(args=args)
        if result.failed():
            logger.error("In-process task %s%r failed: %s", task.name, tuple(args), result.result)
    finally:
        close_old_connections()


async def _run_in_process(task: Task, args: list[Any], countdown: float) -> None:
    if countdown > 0:
        await asyncio.sleep(countdown)
    await sync_to_async(_apply_now, thread_sensitive=False)(task, args)
