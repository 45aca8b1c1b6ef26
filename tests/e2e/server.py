"""The real Concord stack for browser tests: a fresh database, daphne, and (with Redis) a Celery worker.

Everything runs as subprocesses started from the repository's virtual environment,
exactly as an operator would start them, so the browser test is black-box:

* embedded (no REDIS_URL): a fresh SQLite file, the in-memory channel layer, tasks
  run in-process inside daphne;
* production topology (REDIS_URL set, as in CI): PostgreSQL (a database of its own,
  dropped and created for the run), the Redis channel layer, and a Celery worker
  serving the gpu and default queues.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = VENV_BIN / "python" if (VENV_BIN / "python").exists() else Path(sys.executable)

# The e2e run never touches the databases of other runs (unit tests, `make run`).
E2E_DATABASE = os.environ.get("CONCORD_E2E_DATABASE", "concord_e2e")
# A Redis database number of its own, so neither Celery tasks nor channel-layer
# groups of other processes on the same server leak into (or out of) this run.
E2E_REDIS_DB = os.environ.get("CONCORD_E2E_REDIS_DB", "15")

GROUP_SIZE, N_CANDIDATES, K_SHOWN = 4, 4, 2
LOG_TAIL_LINES = 80


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(could not read {path}: {error})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_seconds: float = 15.0) -> None:
        """SIGTERM the whole process group (Celery forks a pool child), then SIGKILL if it lingers."""
        if not self.alive():
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=10)

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return tail(self.log_path, lines)


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]
    mode: str  # "embedded" or "postgres+redis+celery"
    base_url: str = ""
    processes: list[ManagedProcess] = field(default_factory=list)
    setup_logs: list[Path] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base_url + path

    def log_report(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = []
        for process in self.processes:
            state = "running" if process.alive() else f"exited with {process.popen.returncode}"
            parts.append(f"----- {process.name} ({state}), last {lines} lines of {process.log_path} -----\n{process.tail(lines)}")
        return "\n".join(parts)

    def log_matches(self, pattern: str) -> list[re.Match[str]]:
        """Every match of `pattern` in the server processes' logs (diagnostics only, never asserted)."""
        compiled = re.compile(pattern)
        return [
            match
            for process in self.processes
            for match in compiled.finditer(process.log_path.read_text(errors="replace"))
        ]

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def _e2e_database_url(database_url: str) -> str:
    parts = urllib.parse.urlsplit(database_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + E2E_DATABASE))


def _recreate_postgres_database(database_url: str) -> None:
    import psycopg2
    from psycopg2 import sql

    parts = urllib.parse.urlsplit(database_url)
    connection = psycopg2.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        user=urllib.parse.unquote(parts.username or "postgres"),
        password=urllib.parse.unquote(parts.password) if parts.password else None,
        dbname="postgres",
    )
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            # WITH (FORCE) ends sessions a crashed earlier run may have left behind (PostgreSQL 13+).
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(E2E_DATABASE)))
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(E2E_DATABASE)))
    finally:
        connection.close()


def _e2e_redis_url(redis_url: str) -> str:
    parts = urllib.parse.urlsplit(redis_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + E2E_REDIS_DB))


def _flush_redis(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()  # stale tasks (a countdown timer, a redelivery) of an earlier run
    finally:
        client.close()


def _environment(tmp: Path) -> tuple[dict[str, str], str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        PYTHONUNBUFFERED="1",
        SECRET_KEY="e2e",
        DEBUG="0",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        CONCORD_MAX_NEW_TOKENS="40",
        CONCORD_VAR_DIR=str(tmp / "var"),
        # Shared with every run (and `make run`): the converted model is written once and reused.
        CONCORD_MODEL_STORE=str(REPO / "var" / "models"),
        LOG_LEVEL=os.environ.get("LOG_LEVEL", "INFO"),
    )
    database_url = os.environ.get("DATABASE_URL", "").strip()
    if database_url:
        _recreate_postgres_database(database_url)
        env["DATABASE_URL"] = _e2e_database_url(database_url)
    else:
        env["DATABASE_URL"] = f"sqlite:///{tmp / 'e2e.sqlite3'}"
    redis_url = os.environ.get("REDIS_URL", "").strip()
    if redis_url:
        env["REDIS_URL"] = _e2e_redis_url(redis_url)
        _flush_redis(env["REDIS_URL"])
        mode = "postgres+redis+celery" if database_url else "sqlite+redis+celery"
    else:
        env.pop("REDIS_URL", None)
        mode = "embedded" if not database_url else "postgres+in-process"
    return env, mode


def _manage(stack: Stack, *args: str, timeout: float = 300) -> None:
    log_path = stack.tmp / f"manage-{args[0]}.log"
    stack.setup_logs.append(log_path)
    with open(log_path, "wb") as log:
        result = subprocess.run(
            [str(PYTHON), "manage.py", *args], cwd=REPO, env=stack.env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
        )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed ({result.returncode}):\n{tail(log_path)}")


def _spawn(stack: Stack, name: str, argv: list[str]) -> ManagedProcess:
    log_path = stack.tmp / f"{name}.log"
    log = open(log_path, "wb")
    try:
        popen = subprocess.Popen(
            argv, cwd=REPO, env=stack.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so stop() reaches forked children too
        )
    finally:
        log.close()  # the child holds its own descriptor
    process = ManagedProcess(name=name, popen=popen, log_path=log_path)
    stack.processes.append(process)
    return process


def _wait_for_http(stack: Stack, process: ManagedProcess, timeout: float = 90) -> None:
    # The home page proves Django and the database answer; the script proves daphne serves static files.
    probes = [stack.url("/"), stack.url("/static/concord/concord.js")]
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")
        try:
            for probe in probes:
                with urllib.request.urlopen(probe, timeout=5) as response:
                    if response.status != 200:
                        raise urllib.error.URLError(f"{probe}: HTTP {response.status}")
            return
        except urllib.error.HTTPError as error:
            # The server is up but broken (a missing migration, a template error): no point waiting.
            raise RuntimeError(f"{process.name} answered {error.code} for {error.url}:\n{process.tail()}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
            last_error = str(error)
        time.sleep(0.25)  # polling interval, not synchronisation
    raise RuntimeError(f"{process.name} did not answer within {timeout:.0f}s ({last_error}):\n{process.tail()}")


def _wait_for_log(process: ManagedProcess, needle: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")
        if needle in process.log_path.read_text(errors="replace"):
            return
        time.sleep(0.25)  # polling interval, not synchronisation
    raise RuntimeError(f"{process.name} did not log {needle!r} within {timeout:.0f}s:\n{process.tail()}")


def start_stack(tmp: Path) -> Stack:
    tmp.mkdir(parents=True, exist_ok=True)
    env, mode = _environment(tmp)
    stack = Stack(tmp=tmp, env=env, mode=mode)
    try:
        _manage(stack, "migrate", "--noinput")
        _manage(stack, "seed_demo", "--group-size", str(GROUP_SIZE), "--n", str(N_CANDIDATES), "--k", str(K_SHOWN))
        if "REDIS_URL" in env:
            worker = _spawn(
                stack,
                "celery",
                [
                    str(VENV_BIN / "celery"), "-A", "config", "worker", "-Q", "gpu,default", "--concurrency", "1",
                    "--loglevel", "INFO", "--hostname", f"e2e-{os.getpid()}@%h", "--without-gossip", "--without-mingle",
                ],
            )
            _wait_for_log(worker, " ready.")
        port = free_port()
        stack.base_url = f"http://127.0.0.1:{port}"
        daphne = _spawn(stack, "daphne", [str(VENV_BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"])
        _wait_for_http(stack, daphne)
    except BaseException:
        stack.stop()
        raise
    return stack


def chromium_path() -> str | None:
    candidate = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    return candidate if Path(candidate).exists() else shutil.which("chromium")
