"""Load benchmark: R rooms x 5 participants as real websocket clients against the production topology.

    .venv/bin/python bench/load.py                 # 100 rooms x 5 = 500 sockets (part of `make bench`)
    .venv/bin/python bench/load.py --rooms 10      # a quick look

What runs: daphne (one or more processes) with the Redis channel layer, PostgreSQL,
and a Celery worker on the gpu and default queues, all on this machine and loopback
only. The benchmark gets its own database (dropped and created fresh, then migrated)
and its own Redis database number, so it never touches development or test data.

The generator is the **stand-in** backend (modeling/generation/standin.py): it writes
statements instantly, so what is measured is the web tier, not the model. The reward
model is the real similarity model. Rate limits are turned off for the run
(RATE_LIMIT_*=0), because every simulated participant comes from 127.0.0.1.

Every participant is an aiohttp client with its own cookie jar that does what a
browser does (simulation/bots.py is the model): it opens its room's invite link,
consents with the CSRF token, opens its websocket, waits until every client's socket
is open, writes its opinion at a random moment of the opinion window, waits for the
statements to be pushed, rates each, ranks them, and waits for the end.

Fan-out latency is measured per (submitter, other member) pair: from just before the
submitter's POST to the moment the other member's socket delivers a status that shows
the opinion count the submission produced (or a later phase). Within a room opinions
are written under the round's row lock, so the order of their ids is the order in
which the counts rose: the k-th opinion of a room produced the count k. All times
come from this process's monotonic clock.

Lost submissions compare what the server acknowledged (2xx, no error in the page)
with the rows in the database. Everything is bounded: each wait has a timeout, the
whole run has a time limit, and the processes it starts are stopped when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS_PATH = ROOT / "bench" / "results" / "load.json"
DOCS_PATH = ROOT / "docs" / "benchmarks.md"
DOCS_BEGIN, DOCS_END = "<!-- load:begin -->", "<!-- load:end -->"
# Two paces for the same 500 sockets. "stress" squeezes the cohort's opinions into a fifth of the
# 300 s opinion phase and gives each statement 5-15 s of reading. "paced" is the default round as
# people live it: opinions spread over the whole opinion phase (Experiment.opinion_seconds, 300 s)
# and 20-40 s per statement (Experiment.rating_seconds allows 600 s for the 4). Each profile has
# its results file and its part of docs/benchmarks.md; explicit flags override a profile.
PACE_LABELS = {"stress": "stress pace", "paced": "people's pace"}
PROFILES: dict[str, dict[str, Any]] = {
    "stress": {"opinion_window": 60.0, "rating_pause": (5.0, 15.0), "phase_timeout": 240.0, "time_limit": 900.0,
               "output": RESULTS_PATH, "markers": (DOCS_BEGIN, DOCS_END)},
    "paced": {"opinion_window": 300.0, "rating_pause": (20.0, 40.0), "phase_timeout": 600.0, "time_limit": 1500.0,
              "output": RESULTS_PATH.with_name("load_paced.json"), "markers": ("<!-- load-paced:begin -->", "<!-- load-paced:end -->")},
}
LOG_DIR = ROOT / "var" / "bench-load"
POSTGRES_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/postgres"
BENCH_SECRET_KEY = "bench-load-not-a-secret-loopback-only"
# The lowest priority: in production the worker runs on other machines, so here its reward model
# (torch on CPU) may only use what the web tier leaves.
WORKER_NICENESS = 19



_STATUS_PHASE_RE = re.compile(r'<section id="status"[^>]*data-phase="(?P<phase>[a-z_]+)"')
_OPINION_COUNT_RE = re.compile(r"<p>(?P<count>\d+) of (?P<expected>\d+) opinions are in\.</p>")
_MAIN_VIEW_RE = re.compile(r'<section id="main"[^>]*data-view="(?P<view>[a-z_]+)"')
_CANDIDATE_RE = re.compile(r'data-candidate="(?P<id>\d+)"')
_ERROR_RE = re.compile(r'<p class="error"[^>]*>(?P<message>.*?)</p>', re.DOTALL)
PHASES_AFTER_OPINIONS = ("mediating", "rating", "done")

OPINION_TEMPLATES = [
    "I think we should {verb} this, because it affects {who} more than anyone admits. Room {room}, member {member}.",
    "My view is that we should not {verb} it yet: the costs for {who} are unclear. Room {room}, member {member}.",
    "A careful middle way is best; {who} deserve a say before we {verb} anything. Room {room}, member {member}.",
    "Honestly I am unsure, but I lean towards trying to {verb} it for {who}. Room {room}, member {member}.",
]
VERBS = ["change", "fund", "regulate", "expand", "limit"]
WHO = ["young people", "families", "workers", "older people", "small towns"]


# --- Configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadConfig:
    profile: str = "stress"
    rooms: int = 100
    group_size: int = 5
    # Opinions are spread uniformly over this many seconds, once every socket is open.
    # 100 rooms that start together, with a 300 s opinion phase: a 60 s window puts the whole cohort's
    # opinions in a fifth of it. --opinion-window 30 is a harsher stress test.
    opinion_window_s: float = 60.0
    # After the last socket opens, the renders its joining caused are let finish before the window opens,
    # so the window measures the steady state with every socket open, not the tail of the joins.
    settle_s: float = 5.0
    # Before each rating a participant reads the statement: a pause drawn from this range (seconds).
    # People take longer; bots with no pause (--rating-pause 0 3) make a stress test instead.
    rating_pause_s: tuple[float, float] = (5.0, 15.0)
    # 8 candidates, not the default 16: the worker embeds every one with the real reward model on this
    # machine's CPU, and the benchmark is about the web tier. Each participant still rates 4 and ranks them.
    n_candidates: int = 8
    # The real reward model, run by the worker on this machine's CPU (in production: GPU workers on other
    # machines). "none", the constant model, takes the worker out of the picture, but then every room
    # reaches its rating phase at once: the worker's pace is part of what a real round looks like.
    reward_model: str = "similarity"
    k_shown: int = 4
    # One daphne per core, as docs/deploy.md advises: each has its own event loop and GIL.
    daphne_processes: int = 2
    join_concurrency: int = 20
    database: str = "concord_load"
    redis_db: int = 3
    # DB_CONN_MAX_AGE of the servers. 0, as Django advises under ASGI: daphne runs each request in a
    # thread of its own, so kept connections are never reused and pile up (60 exhausted PostgreSQL's 100).
    db_conn_max_age: int = 0
    phase_timeout_s: float = 240.0
    time_limit_s: float = 900.0
    seed: int = 7

    @property
    def participants(self) -> int:
        return self.rooms * self.group_size

    @property
    def database_url(self) -> str:
        return f"postgres://postgres@127.0.0.1:5432/{self.database}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:6379/{self.redis_db}"


def parse_args(argv: list[str] | None = None) -> tuple[LoadConfig, argparse.Namespace]:
    defaults = LoadConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rooms", type=int, default=defaults.rooms)
    parser.add_argument("--group-size", type=int, default=defaults.group_size)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="stress", help="the pace of the simulated participants (see PROFILES)")
    parser.add_argument("--opinion-window", type=float, default=None, help="seconds over which opinions arrive")
    parser.add_argument("--settle", type=float, default=defaults.settle_s, help="seconds between the last socket opening and the window")
    parser.add_argument("--rating-pause", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                        help="seconds of reading before each rating, drawn uniformly from [MIN, MAX]")
    parser.add_argument("--reward-model", default=defaults.reward_model, choices=("none", "similarity"),
                        help="the arm's reward model; the worker runs it on this machine's CPU")
    parser.add_argument("--n", type=int, default=defaults.n_candidates, help="candidates per round")
    parser.add_argument("--k", type=int, default=defaults.k_shown, help="candidates shown to each participant")
    parser.add_argument("--daphne-processes", type=int, default=defaults.daphne_processes)
    parser.add_argument("--join-concurrency", type=int, default=defaults.join_concurrency)
    parser.add_argument("--database", default=defaults.database, help="dropped and recreated: never point it at real data")
    parser.add_argument("--redis-db", type=int, default=defaults.redis_db, help="flushed before the run")
    parser.add_argument("--db-conn-max-age", type=int, default=defaults.db_conn_max_age)
    parser.add_argument("--phase-timeout", type=float, default=None)
    parser.add_argument("--time-limit", type=float, default=None)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--no-docs", action="store_true", help="do not update the Load section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    for name, value in PROFILES[args.profile].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.rooms < 1 or not 2 <= args.group_size <= 8 or args.daphne_processes < 1 or args.k > args.n:
        parser.error("need --rooms >= 1, 2 <= --group-size <= 8, --daphne-processes >= 1 and --k <= --n")
    if args.database in {"postgres", "concord", "template0", "template1"}:
        parser.error(f"--database {args.database} would drop a database that is not the benchmark's own")
    config = LoadConfig(
        profile=args.profile,
        rooms=args.rooms,
        group_size=args.group_size,
        opinion_window_s=args.opinion_window,
        settle_s=args.settle,
        rating_pause_s=(min(args.rating_pause), max(args.rating_pause)),
        n_candidates=args.n,
        reward_model=args.reward_model,
        k_shown=args.k,
        daphne_processes=args.daphne_processes,
        join_concurrency=args.join_concurrency,
        database=args.database,
        redis_db=args.redis_db,
        db_conn_max_age=args.db_conn_max_age,
        phase_timeout_s=args.phase_timeout,
        time_limit_s=args.time_limit,
        seed=args.seed,
    )
    return config, args


def server_environment(config: LoadConfig) -> dict[str, str]:
    """The environment of every process of the run, this one included (it reads the same database)."""
    return {
        "DATABASE_URL": config.database_url,
        "REDIS_URL": config.redis_url,
        "DB_CONN_MAX_AGE": str(config.db_conn_max_age),
        "SECRET_KEY": BENCH_SECRET_KEY,
        "DEBUG": "0",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        # Every simulated participant shares 127.0.0.1, so per-address and per-participant limits are off.
        "RATE_LIMIT_JOIN_PER_IP": "0",
        "RATE_LIMIT_SUBMIT_PER_PARTICIPANT": "0",
        "RATE_LIMIT_DRAFT_PER_PARTICIPANT": "0",
        "CONCORD_DEVICE": "cpu",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }


# --- Database and Redis: fresh for every run --------------------------------------------------


def recreate_database(name: str) -> None:
    import psycopg2

    connection = psycopg2.connect(POSTGRES_ADMIN_URL)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


@dataclass
class Fixture:
    experiment_slug: str
    room_codes: list[str]
    room_ids: list[int]


def create_fixture(config: LoadConfig) -> Fixture:
    """One experiment with one stand-in arm and R rooms, created through the services like a researcher's would be."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from deliberation import services
    from deliberation.models import Arm, Experiment, Question

    call_command("migrate", verbosity=0, interactive=False)
    owner = get_user_model().objects.create_user(username="load-owner", password=BENCH_SECRET_KEY)
    demo_questions = json.loads((ROOT / "research" / "demo_questions.json").read_text())
    questions = [
        Question.objects.create(
            external_id=f"load-{row['id']}",
            text=row["question"],
            affirming_statement=row["affirming_statement"],
            negating_statement=row["negating_statement"],
            topic=row["topic"],
            split=row["split"],
            source="Concord demo set",
        )
        for row in demo_questions
    ]
    experiment = Experiment.objects.create(
        slug="load",
        name="Load benchmark",
        owner=owner,
        group_size=config.group_size,
        # Long timers: no phase may end by its deadline during the measurement.
        opinion_seconds=3600,
        rating_seconds=3600,
        completion_code="LOADDONE",
    )
    experiment.questions.add(*questions)
    arm = Arm.objects.create(
        experiment=experiment,
        name="stand-in",
        generator_backend="stand-in",
        generator_model="stand-in-v1",
        reward_model=config.reward_model,
        n_candidates=config.n_candidates,
        k_shown=config.k_shown,
    )
    rooms = [services.room_create(experiment=experiment, arm=arm, question=questions[i % len(questions)]) for i in range(config.rooms)]
    return Fixture(experiment_slug=experiment.slug, room_codes=[room.code for room in rooms], room_ids=[room.pk for room in rooms])


# --- The servers --------------------------------------------------------------------------------


@dataclass
class Site:
    base_urls: list[str]
    daphnes: list[subprocess.Popen[bytes]]
    worker: subprocess.Popen[bytes]
    log_dir: Path


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(url: str, process: subprocess.Popen[bytes], log: Path, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s; see {log}")


@contextlib.contextmanager
def running_site(config: LoadConfig, env: dict[str, str]) -> Iterator[Site]:
    """daphne x P and one Celery worker, on loopback, stopped (terminate, then kill) on the way out."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    process_env = {**os.environ, **env}
    processes: list[subprocess.Popen[bytes]] = []
    logs = []

    def start(name: str, command: list[str], *, extra_env: dict[str, str] | None = None, niceness: int = 0) -> subprocess.Popen[bytes]:
        log = open(LOG_DIR / f"{name}.log", "wb")
        logs.append(log)
        process = subprocess.Popen(
            command, cwd=ROOT, env={**process_env, **(extra_env or {})}, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.nice(niceness)) if niceness else None,
            # Linux shares CPU between sessions ("autogroups") before it looks at nice values, so a
            # deprioritised process gets a session of its own, with that session's niceness lowered too.
            start_new_session=bool(niceness),
        )
        if niceness:
            with contextlib.suppress(OSError):
                Path(f"/proc/{process.pid}/autogroup").write_text(str(niceness))
        processes.append(process)
        return process

    try:
        ports = [_free_port() for _ in range(config.daphne_processes)]
        daphnes = [
            start(f"daphne-{index}", [str(bin_dir / "daphne"), "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"])
            for index, port in enumerate(ports)
        ]
        # In production the GPU workers run on other machines. Here the worker's reward model (torch on CPU)
        # would otherwise spin on both cores and starve the web tier this benchmark measures, so it gets one
        # thread and a lower CPU priority; its CPU use is still reported.
        worker = start(
            "worker",
            [str(bin_dir / "celery"), "-A", "config", "worker", "-Q", "gpu,default", "--pool", "solo",
             "--loglevel", "WARNING", "-n", "load-worker@%h"],
            extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
            niceness=WORKER_NICENESS,
        )
        base_urls = [f"http://127.0.0.1:{port}/" for port in ports]
        for index, (url, daphne) in enumerate(zip(base_urls, daphnes)):
            _wait_until_serving(url, daphne, LOG_DIR / f"daphne-{index}.log", timeout_s=120)
        yield Site(base_urls=base_urls, daphnes=daphnes, worker=worker, log_dir=LOG_DIR)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for log in logs:
            log.close()


class ResourceSampler:
    """Peak RSS of each watched process and peak PostgreSQL connections to the benchmark's database,
    sampled on a thread every 0.2 s until stopped."""

    INTERVAL_S = 0.2

    def __init__(self, processes: dict[str, int], *, database: str) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in processes.items()}
        # CPU is also followed for PostgreSQL (with its backends) and Redis.
        self.cpu_processes = self.processes | shared_services()
        self.peak_rss: dict[str, int] = {name: 0 for name in processes}
        self.database = database
        self.peak_db_connections = 0
        # (monotonic time, machine CPU busy %, {process: % of one core}) about once a second.
        self.cpu_timeline: list[tuple[float, float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _cpu_seconds_by_process(self) -> dict[str, float]:
        seconds = {}
        for name, process in self.cpu_processes.items():
            with contextlib.suppress(psutil.Error):
                seconds[name] = CpuWindow.cpu_seconds(process)
        return seconds

    def __enter__(self) -> ResourceSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg2

        admin = psycopg2.connect(POSTGRES_ADMIN_URL)
        admin.autocommit = True
        psutil.cpu_percent(None)
        last_at = time.monotonic()
        last_cpu = self._cpu_seconds_by_process()
        try:
            while not self._stop.wait(self.INTERVAL_S):
                now = time.monotonic()
                if now - last_at >= 1.0:
                    cpu = self._cpu_seconds_by_process()
                    per_process = {
                        name: round(100.0 * (cpu[name] - last_cpu[name]) / (now - last_at), 1) for name in cpu if name in last_cpu
                    }
                    self.cpu_timeline.append((now, psutil.cpu_percent(None), per_process))
                    last_at, last_cpu = now, cpu
                for name, process in self.processes.items():
                    with contextlib.suppress(psutil.Error):
                        self.peak_rss[name] = max(self.peak_rss[name], process.memory_info().rss)
                with admin.cursor() as cursor:
                    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [self.database])
                    self.peak_db_connections = max(self.peak_db_connections, cursor.fetchone()[0])
        finally:
            admin.close()


def shared_services() -> dict[str, psutil.Process]:
    """The PostgreSQL postmaster and the Redis server on this machine (shared with anything else using them)."""
    found: dict[str, psutil.Process] = {}
    for process in psutil.process_iter(["name", "ppid"]):
        with contextlib.suppress(psutil.Error):
            name = process.info["name"] or ""
            if name == "redis-server":
                found.setdefault("redis", process)
            elif name in {"postgres", "postmaster"} and psutil.Process(process.info["ppid"]).name() not in {"postgres", "postmaster"}:
                found.setdefault("postgres", process)
    return found


@dataclass
class CpuWindow:
    """CPU seconds each process (and the whole machine) used between start() and stop().

    For the PostgreSQL postmaster, its backends count too: the ones still running and the ones
    that exited (the kernel adds a reaped child's time to its parent's children times).
    """

    processes: dict[str, psutil.Process]
    started_at: float = 0.0
    wall_s: float = 0.0
    start_times: dict[str, float] = field(default_factory=dict)
    used_s: dict[str, float] = field(default_factory=dict)
    system_busy_percent: float = 0.0
    _system_start: Any = None

    @staticmethod
    def cpu_seconds(process: psutil.Process) -> float:
        times = process.cpu_times()
        total = times.user + times.system
        if process.name() in {"postgres", "postmaster"}:
            total += times.children_user + times.children_system
            for child in process.children():
                with contextlib.suppress(psutil.Error):
                    child_times = child.cpu_times()
                    total += child_times.user + child_times.system
        return total

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._system_start = psutil.cpu_times()
        self.start_times = {name: self.cpu_seconds(p) for name, p in self.processes.items()}

    def stop(self) -> None:
        self.wall_s = time.monotonic() - self.started_at
        end = psutil.cpu_times()
        for name, process in self.processes.items():
            with contextlib.suppress(psutil.Error):
                self.used_s[name] = self.cpu_seconds(process) - self.start_times[name]
        idle = (end.idle + getattr(end, "iowait", 0.0)) - (self._system_start.idle + getattr(self._system_start, "iowait", 0.0))
        total = sum(end) - sum(self._system_start)
        self.system_busy_percent = 100.0 * (1 - idle / total) if total > 0 else 0.0

    def percent(self) -> dict[str, float]:
        """Average CPU of each process over the window, in % of one core (200 % = both cores)."""
        return {name: round(100.0 * used / self.wall_s, 1) for name, used in self.used_s.items()} if self.wall_s else {}


# --- The simulated participants -----------------------------------------------------------------


@dataclass
class Recorder:
    """What every client saw and did, for the figures at the end."""

    total_clients: int
    connected: int = 0
    finished_connecting: int = 0
    peak_connected: int = 0
    all_connected: asyncio.Event = field(default_factory=asyncio.Event)
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    acknowledged: Counter[str] = field(default_factory=Counter)
    http_ms: dict[str, list[float]] = field(default_factory=dict)
    submit_times: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of acknowledged submissions

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.error_examples.setdefault(kind, detail[:300])

    def socket_settled(self, *, connected: bool) -> None:
        self.finished_connecting += 1
        if connected:
            self.connected += 1
            self.peak_connected = max(self.peak_connected, self.connected)
        if self.finished_connecting >= self.total_clients:
            self.all_connected.set()


class ClientFailed(RuntimeError):
    pass


class LoadClient:
    """One participant's browser: an HTTP session with its own cookies, and one websocket."""

    def __init__(self, *, room_index: int, member_index: int, base_url: str, join_path: str, recorder: Recorder,
                 rng: random.Random, config: LoadConfig) -> None:
        self.room_index = room_index
        self.member_index = member_index
        self.base_url = base_url
        self.join_path = join_path
        self.recorder = recorder
        self.rng = rng
        self.config = config
        self.code = ""
        self.session: aiohttp.ClientSession | None = None
        self.socket: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.changed = asyncio.Condition()
        self.view = ""
        self.main_html = ""
        self.socket_closed = False
        # First moment this client's socket delivered each opinion count, and each phase.
        self.count_seen_at: dict[int, float] = {}
        self.phase_seen_at: dict[str, float] = {}
        self.opinion_post_started_at: float | None = None
        self.statements_seen_at: float | None = None

    @property
    def label(self) -> str:
        return f"load-{self.room_index}-{self.member_index}"

    def fail(self, kind: str, detail: str) -> ClientFailed:
        """Record an error of this kind and return the exception that stops this client."""
        self.recorder.error(kind, f"{self.label}: {detail}")
        return ClientFailed(f"{self.label}: {kind}: {detail}")

    # --- HTTP ---

    def _csrf(self) -> str:
        assert self.session is not None
        for cookie in self.session.cookie_jar:
            if cookie.key == "csrftoken":
                return cookie.value
        raise self.fail("no CSRF cookie", "the server set no csrftoken cookie")

    async def _submit(self, kind: str, path: str, data: dict[str, str]) -> str:
        """POST like htmx does; an acknowledged submission is a 2xx page without an error message."""
        assert self.session is not None
        headers = {"X-CSRFToken": self._csrf(), "HX-Request": "true", "Referer": self.base_url}
        started = time.monotonic()
        try:
            async with self.session.post(self.base_url + path, data=data, headers=headers) as response:
                body = await response.text()
                status = response.status
        except (TimeoutError, aiohttp.ClientError) as error:
            raise self.fail(f"{kind}: connection", repr(error)) from error
        ended = time.monotonic()
        self.recorder.http_ms.setdefault(kind, []).append((ended - started) * 1000)
        if status >= 400:
            raise self.fail(f"{kind}: HTTP {status}", body[:300])
        refused = _ERROR_RE.search(body)
        if refused:
            raise self.fail(f"{kind}: refused", refused.group("message"))
        self.recorder.acknowledged[kind] += 1
        self.recorder.submit_times.append((started, ended))
        return body

    async def join_and_connect(self) -> None:
        try:
            await self.join()
        except (TimeoutError, aiohttp.ClientError) as error:
            raise self.fail(f"join: {type(error).__name__}", repr(error)) from error
        try:
            await self.connect()
        except (TimeoutError, aiohttp.ClientError) as error:
            raise self.fail(f"socket connect: {type(error).__name__}", repr(error)) from error

    async def join(self) -> None:
        self.session = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=aiohttp.ClientTimeout(total=self.config.phase_timeout_s)
        )
        url = f"{self.base_url}{self.join_path}?participant_label={self.label}"
        started = time.monotonic()
        async with self.session.get(url) as response:
            if response.status != 200:
                raise self.fail(f"join: HTTP {response.status}", f"GET {url}")
        headers = {"X-CSRFToken": self._csrf(), "Referer": url}
        async with self.session.post(url, data={"consent": "yes", "participant_label": self.label}, headers=headers) as response:
            await response.read()
            if response.status != 200 or "/p/" not in response.url.path:
                raise self.fail(f"join: HTTP {response.status}", f"ended at {response.url}")
            self.code = response.url.path.rstrip("/").rsplit("/", 1)[-1]
        self.recorder.http_ms.setdefault("join", []).append((time.monotonic() - started) * 1000)

    # --- websocket ---

    async def connect(self) -> None:
        assert self.session is not None
        ws_url = self.base_url.replace("http://", "ws://", 1) + f"ws/p/{self.code}/"
        self.socket = await self.session.ws_connect(ws_url, origin=self.base_url.rstrip("/"), heartbeat=30)
        self.reader = asyncio.create_task(self._read(), name=f"read-{self.label}")

    async def _read(self) -> None:
        assert self.socket is not None
        deadline = time.monotonic() + self.config.time_limit_s
        while time.monotonic() < deadline:
            try:
                message = await self.socket.receive(timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                break
            if message.type != aiohttp.WSMsgType.TEXT:
                if not self.socket_closed and message.type not in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    self.recorder.error("socket dropped", f"{self.label}: {message.type.name} {message.data!r}")
                self.socket_closed = True
                break
            self._observe(message.data, time.monotonic())
            async with self.changed:
                self.changed.notify_all()
        async with self.changed:
            self.changed.notify_all()

    def _observe(self, html: str, at: float) -> None:
        phase_match = _STATUS_PHASE_RE.search(html)
        if phase_match:
            self.phase_seen_at.setdefault(phase_match.group("phase"), at)
            count_match = _OPINION_COUNT_RE.search(html)
            if count_match:
                self.count_seen_at.setdefault(int(count_match.group("count")), at)
        main_at = html.find('<section id="main"')
        if main_at >= 0:
            self.main_html = html[main_at:]
            view_match = _MAIN_VIEW_RE.search(self.main_html)
            self.view = view_match.group("view") if view_match else ""

    async def wait_for_view(self, *views: str) -> str:
        async def reached() -> None:
            async with self.changed:
                await self.changed.wait_for(lambda: self.view in views or self.socket_closed)

        try:
            await asyncio.wait_for(reached(), timeout=self.config.phase_timeout_s)
        except TimeoutError:
            raise self.fail(f"timeout waiting for {'/'.join(views)}", f"still at {self.view!r}") from None
        if self.view not in views:
            raise self.fail("socket closed while waiting", f"waiting for {views} at {self.view!r}")
        return self.view

    # --- the participant's flow ---

    def opinion_text(self) -> str:
        template = OPINION_TEMPLATES[(self.room_index + self.member_index) % len(OPINION_TEMPLATES)]
        return template.format(verb=self.rng.choice(VERBS), who=self.rng.choice(WHO), room=self.room_index, member=self.member_index)

    async def run(self, join_slots: asyncio.Semaphore) -> None:
        connected = False
        try:
            async with join_slots:
                await self.join_and_connect()
                connected = True
        finally:
            self.recorder.socket_settled(connected=connected)
        # Nobody writes before every socket is open: the measurement runs at full load.
        await asyncio.wait_for(self.recorder.all_connected.wait(), timeout=self.config.time_limit_s)
        await self.wait_for_view("opinions")
        await asyncio.sleep(self.config.settle_s + self.rng.uniform(0, self.config.opinion_window_s))
        self.opinion_post_started_at = time.monotonic()
        await self._submit("opinion", f"p/{self.code}/opinion/", {"text": self.opinion_text()})

        if await self.wait_for_view("rating", "done", "not_rating") != "rating":
            raise self.fail("round ended without statements", f"view {self.view!r}")
        self.statements_seen_at = time.monotonic()
        candidate_ids = [int(match.group("id")) for match in _CANDIDATE_RE.finditer(self.main_html)]
        if not candidate_ids:
            raise self.fail("rating view without statements", self.main_html[:200])
        for candidate_id in candidate_ids:
            await asyncio.sleep(self.rng.uniform(*self.config.rating_pause_s))
            agreement, quality = self.rng.randint(1, 7), self.rng.randint(1, 7)
            await self._submit("rating", f"p/{self.code}/rate/{candidate_id}/", {"agreement": str(agreement), "quality": str(quality)})
        order = list(candidate_ids)
        self.rng.shuffle(order)
        await self._submit("ranking", f"p/{self.code}/rank/", {f"rank_{cid}": str(position + 1) for position, cid in enumerate(order)})
        await self.wait_for_view("done")

    async def close(self) -> None:
        self.socket_closed = True
        if self.socket is not None:
            with contextlib.suppress(Exception):
                await self.socket.close()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(BaseException):
                await self.reader
        if self.session is not None:
            await self.session.close()


async def run_clients(config: LoadConfig, fixture: Fixture, base_urls: list[str]) -> tuple[Recorder, list[LoadClient], float]:
    recorder = Recorder(total_clients=config.participants)
    master = random.Random(config.seed)
    clients = [
        LoadClient(
            room_index=room_index,
            member_index=member_index,
            # With several daphne processes, the members of one room are spread over them on purpose:
            # their events must cross processes through Redis.
            base_url=base_urls[(room_index * config.group_size + member_index) % len(base_urls)],
            join_path=f"e/{fixture.experiment_slug}/r/{room_code}/join/",
            recorder=recorder,
            rng=random.Random(master.getrandbits(32)),
            config=config,
        )
        for member_index in range(config.group_size)
        for room_index, room_code in enumerate(fixture.room_codes)
    ]
    join_slots = asyncio.Semaphore(config.join_concurrency)
    started = time.monotonic()
    tasks = [asyncio.create_task(client.run(join_slots), name=client.label) for client in clients]
    _, pending = await asyncio.wait(tasks, timeout=config.time_limit_s)
    for task in pending:
        task.cancel()
        recorder.error("time limit", f"{task.get_name()} still running after {config.time_limit_s:.0f} s")
    await asyncio.gather(*pending, return_exceptions=True)
    elapsed = time.monotonic() - started
    for client, task in zip(clients, tasks):
        outcome = None if task.cancelled() else task.exception()
        # ClientFailed was recorded where it was raised.
        if outcome is not None and not isinstance(outcome, ClientFailed):
            recorder.error(f"client crashed: {type(outcome).__name__}", f"{client.label}: {outcome!r}")
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    return recorder, clients, elapsed


# --- Figures ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, so a reported p95 is a latency that actually occurred."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def fanout_latencies(
    clients: list[LoadClient], opinion_order_by_room: dict[int, list[str]]
) -> tuple[list[tuple[float, float]], int]:
    """([(POST start, latency in ms)], pairs that never saw the submission) for every (submitter, other member) pair."""
    by_code = {client.code: client for client in clients if client.code}
    by_room: dict[int, list[LoadClient]] = {}
    for client in clients:
        by_room.setdefault(client.room_index, []).append(client)
    latencies: list[float] = []
    missed = 0
    for room_index, codes in opinion_order_by_room.items():
        for count, submitter_code in enumerate(codes, start=1):
            submitter = by_code.get(submitter_code)
            if submitter is None or submitter.opinion_post_started_at is None:
                continue
            for other in by_room.get(room_index, []):
                if other is submitter or not other.code:
                    continue
                seen = [at for shown, at in other.count_seen_at.items() if shown >= count]
                seen += [at for phase, at in other.phase_seen_at.items() if phase in PHASES_AFTER_OPINIONS]
                if not seen:
                    missed += 1
                    continue
                latencies.append((submitter.opinion_post_started_at, (min(seen) - submitter.opinion_post_started_at) * 1000))
    return latencies, missed


def database_counts(fixture: Fixture) -> tuple[dict[str, int], dict[int, list[str]], int]:
    """Rows per record type, each room's opinion authors in commit order, and completed rounds."""
    from deliberation.models import Opinion, Participant, Ranking, Rating, Round

    room_ids = fixture.room_ids
    index_of_room = {room_id: index for index, room_id in enumerate(room_ids)}
    order: dict[int, list[str]] = {}
    for room_id, code in Opinion.objects.filter(round__room_id__in=room_ids).order_by("id").values_list("round__room_id", "participant__code"):
        order.setdefault(index_of_room[room_id], []).append(code)
    counts = {
        "participants": Participant.objects.filter(room_id__in=room_ids).count(),
        "opinion": Opinion.objects.filter(round__room_id__in=room_ids).count(),
        "rating": Rating.objects.filter(candidate__round__room_id__in=room_ids).count(),
        "ranking": Ranking.objects.filter(round__room_id__in=room_ids).count(),
    }
    completed = Round.objects.filter(room_id__in=room_ids, phase=Round.Phase.DONE, outcome=Round.Outcome.COMPLETED).count()
    return counts, order, completed


def statements_push_seconds(clients: list[LoadClient]) -> list[float]:
    """From a room's last opinion POST to each member's statements arriving (queue wait + mediation + fan-out)."""
    by_room: dict[int, list[LoadClient]] = {}
    for client in clients:
        by_room.setdefault(client.room_index, []).append(client)
    seconds = []
    for members in by_room.values():
        posts = [m.opinion_post_started_at for m in members if m.opinion_post_started_at is not None]
        if len(posts) != len(members):
            continue
        seconds += [m.statements_seen_at - max(posts) for m in members if m.statements_seen_at is not None]
    return seconds


def cpu_in_bucket(sampler: ResourceSampler, *, start: float, length_s: float = 10.0) -> dict[str, float]:
    """Mean machine CPU (% busy) and per-process CPU (% of one core) over [start, start + length)."""
    samples = [(busy, per_process) for at, busy, per_process in sampler.cpu_timeline if start <= at < start + length_s]
    if not samples:
        return {}
    means = {"machine_cpu_busy_percent": round(statistics.fmean(busy for busy, _ in samples), 1)}
    for name in samples[0][1]:
        means[f"{name}_cpu_percent"] = round(statistics.fmean(per.get(name, 0.0) for _, per in samples), 1)
    return means


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def summarise(config: LoadConfig, recorder: Recorder, clients: list[LoadClient], fixture: Fixture, *, elapsed_s: float,
              sampler: ResourceSampler, cpu: CpuWindow, load_before: tuple[float, float, float]) -> dict[str, Any]:
    peak_rss = sampler.peak_rss
    rows, opinion_order, completed = database_counts(fixture)
    timed_latencies, missed = fanout_latencies(clients, opinion_order)
    latencies = [latency for _, latency in timed_latencies]
    # When in the opinion window the slow ones happened: 10 s buckets from the first opinion POST.
    first_post = min((at for at, _ in timed_latencies), default=0.0)
    buckets: dict[int, list[float]] = {}
    for at, latency in timed_latencies:
        buckets.setdefault(int((at - first_post) // 10), []).append(latency)
    lost = {kind: max(0, recorder.acknowledged[kind] - rows[kind]) for kind in ("opinion", "rating", "ranking")}
    submissions = sum(recorder.acknowledged[kind] for kind in ("opinion", "rating", "ranking"))
    if recorder.submit_times:
        span = max(end for _, end in recorder.submit_times) - min(start for start, _ in recorder.submit_times)
    else:
        span = 0.0
    opinion_posts = [c.opinion_post_started_at for c in clients if c.opinion_post_started_at is not None]
    opinion_span = (max(opinion_posts) - min(opinion_posts)) if len(opinion_posts) > 1 else 0.0
    daphne_rss = {name: rss for name, rss in peak_rss.items() if name.startswith("daphne")}
    push = statements_push_seconds(clients)
    return {
        "benchmark": "load",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": {
            "cpus": psutil.cpu_count(),
            # Anything else running on the machine competes for the same two cores: check this before comparing runs.
            "load_average_before": [round(value, 2) for value in load_before],
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
        },
        "config": asdict(config),
        "rooms": config.rooms,
        "participants": config.participants,
        "sockets": recorder.peak_connected,
        "p50_fanout_ms": _ms(percentile(latencies, 50)),
        "p95_fanout_ms": _ms(percentile(latencies, 95)),
        "p99_fanout_ms": _ms(percentile(latencies, 99)),
        "max_fanout_ms": _ms(max(latencies) if latencies else None),
        "fanout_samples": len(latencies),
        "fanout_by_10s": [
            {
                "from_s": bucket * 10,
                "samples": len(values),
                "p50_ms": _ms(percentile(values, 50)),
                "p95_ms": _ms(percentile(values, 95)),
                **cpu_in_bucket(sampler, start=first_post + bucket * 10),
            }
            for bucket, values in sorted(buckets.items())
        ],
        "fanout_missed": missed,
        "submissions": {kind: recorder.acknowledged[kind] for kind in ("opinion", "rating", "ranking")},
        "submissions_per_s": round(submissions / span, 1) if span else None,
        "opinion_submissions_per_s": round(len(opinion_posts) / opinion_span, 1) if opinion_span else None,
        "http_ms": {
            kind: {"p50": _ms(percentile(values, 50)), "p95": _ms(percentile(values, 95)), "count": len(values)}
            for kind, values in sorted(recorder.http_ms.items())
        },
        "errors": sum(recorder.errors.values()) + missed,
        "error_breakdown": dict(recorder.errors) | ({"fan-out never seen": missed} if missed else {}),
        "error_examples": recorder.error_examples,
        "lost_submissions": sum(lost.values()),
        "lost_breakdown": lost,
        "db_rows": rows,
        "rounds_completed": completed,
        "statements_push_s": {"p50": _ms(percentile(push, 50)), "p95": _ms(percentile(push, 95))},
        "peak_rss_mb": round(sum(daphne_rss.values()) / 2**20, 1),
        "peak_rss_mb_by_process": {name: round(rss / 2**20, 1) for name, rss in peak_rss.items()},
        "peak_db_connections": sampler.peak_db_connections,
        "cpu_percent_of_one_core": cpu.percent(),
        "system_cpu_busy_percent": round(cpu.system_busy_percent, 1),
        "wall_s": round(elapsed_s, 1),
        "goal": {"sockets": 500, "p95_fanout_ms_below": 250, "lost_submissions": 0},
        "notes": [
            "stand-in generator (modeling/generation/standin.py): statements are written instantly, so the figures "
            "measure the web tier (daphne, Redis channel layer, PostgreSQL, consumers), not the model",
            (
                "reward model: the constant stand-in ('none'), so the Celery worker costs almost no CPU: in production the "
                "reward model runs on GPU workers on other machines (bench/reward.py measures it)"
                if config.reward_model == "none"
                else "reward model: the real similarity model (MiniLM), on the Celery worker; in production GPU workers run on "
                "other machines, so here the worker gets one torch thread and nice 19: it uses only what the web tier leaves"
            ),
            "rate limits off for the run (RATE_LIMIT_JOIN_PER_IP=0, RATE_LIMIT_SUBMIT_PER_PARTICIPANT=0, "
            "RATE_LIMIT_DRAFT_PER_PARTICIPANT=0): every client shares 127.0.0.1",
            "clients, servers, PostgreSQL and Redis share this machine's cores with anything else running on it "
            "(see machine.load_average_before); CPU is per process in % of one core: bench_clients is the client "
            "process, postgres and redis include their use by anything else during the run",
            "fan-out: from just before a member's opinion POST to each other member's socket delivering the status "
            "with the new count (one process's monotonic clock)",
        ],
    }


def _git_commit() -> str:
    """The code that was measured: the commit, marked dirty when the working tree differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        # Results and docs are what the benchmarks write; only a change elsewhere makes the code differ.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!docs"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def markdown_section(result: dict[str, Any]) -> str:
    config = result["config"]
    begin, end = PROFILES[config["profile"]]["markers"]
    pace = (f"{PACE_LABELS[config['profile']]}: opinions over {config['opinion_window_s']:.0f} s, "
            f"{config['rating_pause_s'][0]:.0f}-{config['rating_pause_s'][1]:.0f} s of reading per statement")
    cpu = result["cpu_percent_of_one_core"]
    rows = [
        ("Concurrent websockets", f"{result['sockets']} ({result['rooms']} rooms × {config['group_size']})"),
        ("Fan-out p50 / p95 / p99", f"{result['p50_fanout_ms']} / {result['p95_fanout_ms']} / {result['p99_fanout_ms']} ms"
                                    f" ({result['fanout_samples']} member pairs)"),
        ("Submissions per second", f"{result['submissions_per_s']} overall; opinions {result['opinion_submissions_per_s']}/s "
                                   f"during a {config['opinion_window_s']:.0f} s window"),
        ("Submissions", ", ".join(f"{count} {kind}s" for kind, count in result["submissions"].items())),
        ("Errors", f"{result['errors']}" + (f" ({', '.join(f'{k}: {v}' for k, v in result['error_breakdown'].items())})"
                                             if result["error_breakdown"] else "")),
        ("Lost submissions", str(result["lost_submissions"])),
        ("Rounds completed", f"{result['rounds_completed']} of {result['rooms']}"),
        ("Peak RSS, daphne", f"{result['peak_rss_mb']} MB ({config['daphne_processes']} process(es))"),
        ("CPU (% of one core)", ", ".join(f"{name} {value}" for name, value in cpu.items())
                                + f"; machine {result['system_cpu_busy_percent']} % busy"),
        ("Statements pushed after last opinion, p50 / p95", f"{result['statements_push_s']['p50']} / {result['statements_push_s']['p95']} s"),
    ]
    table = "\n".join(["| Measure | Result |", "| --- | --- |"] + [f"| {name} | {value} |" for name, value in rows])
    return (
        f"{begin}\n"
        f"Last run: {result['created_at']} (commit {result.get('git_commit', 'unknown')}), {result['machine']['cpus']} cores, load average before "
        f"{result['machine']['load_average_before'][0]}; {pace}. Stand-in generator, reward model "
        f"`{config['reward_model']}`; goal: 500 sockets, p95 fan-out under 250 ms, no lost submission.\n\n{table}\n{end}"
    )


def update_docs(result: dict[str, Any]) -> None:
    """Rewrite only the figures between the Load markers; other sections belong to other benchmarks."""
    section = markdown_section(result)
    begin, end = PROFILES[result["config"]["profile"]]["markers"]
    if not DOCS_PATH.exists():
        DOCS_PATH.write_text(f"# Benchmarks\n\n## Load\n\n{section}\n")
        return
    text = DOCS_PATH.read_text()
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        after = rest.split(end, 1)[1]
        DOCS_PATH.write_text(before + section + after)
    else:
        DOCS_PATH.write_text(text.rstrip("\n") + f"\n\n## Load\n\n{section}\n")


# --- Main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    env = server_environment(config)
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

    load_before = os.getloadavg()
    if load_before[0] > 1.0:
        print(f"load: warning: the machine is already busy (load average {load_before[0]:.1f}); figures will suffer", file=sys.stderr)
    print(f"load: fresh database {config.database}, Redis db {config.redis_db}", file=sys.stderr)
    recreate_database(config.database)
    flush_redis(config.redis_url)
    import django

    django.setup()
    fixture = create_fixture(config)

    print(f"load: starting {config.daphne_processes} daphne process(es) and a Celery worker (logs in {LOG_DIR})", file=sys.stderr)
    with running_site(config, env) as site:
        watched = {f"daphne-{i}": p.pid for i, p in enumerate(site.daphnes)} | {"worker": site.worker.pid, "bench_clients": os.getpid()}
        cpu = CpuWindow(processes={name: psutil.Process(pid) for name, pid in watched.items()} | shared_services())
        print(f"load: {config.participants} clients in {config.rooms} rooms", file=sys.stderr)
        with ResourceSampler(watched, database=config.database) as sampler:
            cpu.start()
            recorder, clients, elapsed = asyncio.run(run_clients(config, fixture, site.base_urls))
            cpu.stop()
        for index, daphne in enumerate(site.daphnes):
            if daphne.poll() is not None:
                recorder.error("daphne exited", f"daphne-{index} exited with {daphne.returncode}")
    result = summarise(
        config, recorder, clients, fixture, elapsed_s=elapsed, sampler=sampler, cpu=cpu, load_before=load_before
    )

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_docs:
        update_docs(result)
    print(json.dumps({key: result[key] for key in (
        "sockets", "p50_fanout_ms", "p95_fanout_ms", "lost_submissions", "submissions_per_s", "errors", "peak_rss_mb",
        "rounds_completed", "wall_s")}, indent=2))
    if result["errors"] or result["lost_submissions"]:
        print(f"load: errors {dict(result['error_breakdown'])}; examples {result['error_examples']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
