"""Helpers for the tests that run the site as real OS processes: daphne, Celery workers, redis-server.

Shared by test_multi_process, test_fault_worker_killed and test_fault_redis_restart. The
processes get the test database (pytest-django's; those tests commit with transaction=True)
and a Redis of the test's choosing, so they see what the test wrote and nothing else.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings

from simulation.localsite import database_url_in_use

ROOT = Path(settings.BASE_DIR)
# A process starts in seconds on idle cores; a busy CI machine can be many times slower. The bound
# only stops a stuck start.
STARTUP_TIMEOUT_S = 60.0
_BIN_DIR = Path(sys.executable).parent


def redis_url_with_db(url: str, db: int) -> str:
    """`url` with its database number replaced by `db`.

    A Redis database of its own per test, so its queues, unacknowledged messages and channel
    groups do not leak into (or from) another test or a developer's site on db 0.
    """
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def flush_redis(url: str) -> None:
    """Empty the Redis database of `url`: before a test, so it starts clean; after it, so it leaves nothing behind."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, so that concurrent runs do not collide on a fixed one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_env(redis_url: str, extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a daphne or worker: this process's, on the test database and `redis_url`.

    The database is the one this process really uses (the test database), so the processes see
    what the test committed. The generator is the real default, kept short and on the CPU;
    `extra` holds what a test sets beyond that.
    """
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": database_url_in_use(),
        "REDIS_URL": redis_url,
        "SECRET_KEY": settings.SECRET_KEY,
        "CONCORD_MAX_NEW_TOKENS": "40",
        "CONCORD_DEVICE": "cpu",
        "LOG_LEVEL": "INFO",
        **extra,
    }
    env.pop("CONCORD_GENERATOR_BACKEND", None)  # the real default generator
    return env


def daphne_command(port: int) -> list[str]:
    """The project's ASGI application under daphne on 127.0.0.1:`port`, as in production."""
    return [str(_BIN_DIR / "daphne"), "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"]


def worker_command(name: str) -> list[str]:
    """A Celery worker named `name` on both queues, solo pool (one task at a time, as a GPU worker)."""
    return [str(_BIN_DIR / "celery"), "-A", "config", "worker", "-Q", "gpu,default", "--pool", "solo",
            "--loglevel", "INFO", "-n", f"{name}@%h"]


def start_process(command: list[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `command` in the project root with its output in `log_path`, to be printed at teardown."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until_serving(url: str, process: subprocess.Popen[bytes]) -> None:
    """Until daphne answers HTTP at `url`; fails at once if it exits, rather than at the deadline."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"daphne at {url} exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"daphne at {url} did not answer within {STARTUP_TIMEOUT_S:.0f} s")


def wait_for_workers(
    broker_url: str, names: Iterable[str], *, processes: Mapping[str, subprocess.Popen[bytes]] | None = None
) -> None:
    """Until every named worker answers a ping through the broker, so it consumes from its queues (and declared them).

    A worker in `processes` that exits fails the wait at once. The probe app is not made current:
    shared tasks (mediate_round) published later in the session resolve to the current app, and
    this one knows neither the project's settings nor its routes, and its broker may be a Redis
    that is gone after the test.
    """
    from celery import Celery

    wanted = set(names)
    answered: set[str] = set()
    probe = Celery("process-test-probe", broker=broker_url, set_as_current=False)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while time.monotonic() < deadline and not wanted <= answered:
            for name, process in (processes or {}).items():
                assert process.poll() is None, f"worker {name} exited with {process.returncode}"
            for reply in probe.control.ping(timeout=1.0) or []:
                answered.update(worker.split("@", 1)[0] for worker in reply)
    finally:
        probe.close()
    assert wanted <= answered, f"workers {sorted(wanted - answered)} did not answer a ping within {STARTUP_TIMEOUT_S:.0f} s"


def stop_processes(processes: Iterable[subprocess.Popen[bytes]]) -> None:
    """Terminate all (a warm shutdown, in parallel), then kill any that has not exited 20 s later."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def process_logs(log_paths: Mapping[str, Path], processes: Mapping[str, subprocess.Popen[bytes]], *, tail: int) -> str:
    """Each process's exit status and the last `tail` characters of its log, for the print at teardown.

    pytest shows that print only when the test fails. A process that never started shows `exit -`.
    """
    def exit_status(name: str) -> int | str | None:
        return processes[name].poll() if name in processes else "-"

    return "\n".join(
        f"----- {name} (exit {exit_status(name)}) -----\n{path.read_text(errors='replace')[-tail:] if path.exists() else ''}"
        for name, path in log_paths.items()
    )
