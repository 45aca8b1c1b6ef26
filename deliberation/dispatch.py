"""Where tasks run: on Celery workers when Redis is configured, else in-process.

The embedded default (no REDIS_URL) runs tasks on the ASGI server's own event
loop, in a worker thread, after an optional countdown. That keeps generation off
the request path, and lets tasks reach the in-memory channel layer safely: it
is bound to the server's loop, and asgiref routes async_to_sync calls from a
thread started by that loop back onto it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from enum import StrEnum
from typing import Any

from asgiref.sync import sync_to_async
from celery import Task, current_app
from django.conf import settings
from django.db import close_old_connections

logger = logging.getLogger(__name__)

_server_loop: asyncio.AbstractEventLoop | None = None
_fallback_lock = threading.Lock()


class TaskName(StrEnum):
    """Every task, by the name it is registered and queued under (each task's decorator names it).

    Writers queue work by name, so no service imports a task module (and tasks, which call services,
    close no import cycle). The name is the task's module path, which also tells the in-process
    runner where to find it; config.settings routes mediate_round to the gpu queue by this name.
    """

    MEDIATE_ROUND = "deliberation.tasks.mediate_round"
    ROUND_DEADLINE = "deliberation.tasks.round_deadline"
    ROOM_WAIT_DEADLINE = "deliberation.tasks.room_wait_deadline"
    EXPORT_DATASET = "research.tasks.export_dataset"
    TRAIN_MODEL = "research.tasks.train_model"


def task_named(name: str) -> Task:
    """The registered task of that name, importing its module first (the in-process runner needs the object)."""
    module, _, _ = name.rpartition(".")
    importlib.import_module(module)
    return current_app.tasks[name]


def remember_server_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Called by the ASGI application, so in-process tasks run on the server's loop."""
    global _server_loop
    _server_loop = loop


def enqueue(name: str, *, args: list[Any], countdown: float = 0.0) -> bool:
    """Run the task called `name` with `args` later: call only from transaction.on_commit callbacks.

    Returns whether the task was handed on. A broker that is down (Redis restarting) must not
    turn the write that committed just before into an error for the person who made it, so a
    failed enqueue is logged, not raised: the database still says what should happen, and
    deliberation.recovery.rounds_recover (run periodically) enqueues it again.
    """
    if settings.USE_CELERY:
        try:
            current_app.send_task(str(name), args=args, countdown=countdown if countdown > 0 else None)
        except Exception:  # kombu's OperationalError, redis-py's errors, OSError: all mean "not sent"
            logger.exception("Could not enqueue %s%r; the recovery sweep will redo it", name, tuple(args))
            return False
        return True
    task = task_named(str(name))
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
        result = task.apply(args=tuple(args))
        if result.failed():
            logger.error("In-process task %s%r failed: %s", task.name, tuple(args), result.result)
    finally:
        close_old_connections()


async def _run_in_process(task: Task, args: list[Any], countdown: float) -> None:
    if countdown > 0:
        await asyncio.sleep(countdown)
    await sync_to_async(_apply_now, thread_sensitive=False)(task, args)
