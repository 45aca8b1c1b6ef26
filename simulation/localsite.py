"""Start the site on this machine for a while: daphne, plus a Celery worker when Redis is configured.

Used by simulate_cohort and by tests that need real server processes. The processes
get the database this process really uses (under pytest, the test database).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.core.management.base import CommandError

ROOT = Path(settings.BASE_DIR)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def database_url_in_use() -> str:
    """The database this process really uses (under tests, the test database), as a URL."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    if db["ENGINE"].endswith("postgresql"):
        credentials = quote(db.get("USER") or "") + (f":{quote(db['PASSWORD'])}" if db.get("PASSWORD") else "")
        host = f"{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
        return f"postgres://{credentials}@{host}/{db['NAME']}"
    raise CommandError(f"Cannot start a local site for database engine {db['ENGINE']}; pass --url.")


@contextlib.contextmanager
def local_site(*, log_dir: Path) -> Iterator[str]:
    """daphne (and a Celery worker if Redis is configured) on this machine, for the duration."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DATABASE_URL": database_url_in_use()}
    env.setdefault("SECRET_KEY", settings.SECRET_KEY)
    env.setdefault("ALLOWED_HOSTS", "127.0.0.1,localhost")
    bin_dir = Path(sys.executable).parent
    processes: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        commands = [[str(bin_dir / "daphne"), "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"]]
        if settings.USE_CELERY:
            commands.append(
                [str(bin_dir / "celery"), "-A", "config", "worker", "-Q", "gpu,default", "--pool", "solo", "--loglevel", "WARNING"]
            )
        for index, command in enumerate(commands):
            log = open(log_dir / f"process-{index}.log", "wb")
            logs.append(log)
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        base_url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            if processes[0].poll() is not None:
                raise CommandError(f"daphne exited; see {log_dir / 'process-0.log'}")
            try:
                with urllib.request.urlopen(base_url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise CommandError("the site did not come up within 120 s") from None
                time.sleep(0.3)
        yield base_url
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()


