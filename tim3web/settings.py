"""Settings, all from environment variables with embedded defaults.

Embedded mode (default): SQLite file, in-memory Celery broker and channel layer.
Scaled mode: set DATABASE_URL (Postgres) and REDIS_URL.
"""

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("TIM3_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def env_bool(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).lower() in ("1", "true", "yes", "on")


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-insecure-key-set-DJANGO_SECRET_KEY-in-production")
DEBUG = env_bool("DJANGO_DEBUG", True)
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")

REDIS_URL = os.environ.get("REDIS_URL", "")
TIM3_MODE = "scaled" if REDIS_URL else "embedded"
TIM3_ENV = os.environ.get("TIM3_ENV", "test")  # "test" (faucet) or "production"

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "processes",
    "tim3web.apps.Tim3WebConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "tim3web.middleware.RefuseNulMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "tim3web.urls"
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
                "tim3web.context.site",
            ]
        },
    }
]
WSGI_APPLICATION = "tim3web.wsgi.application"
ASGI_APPLICATION = "tim3web.asgi.application"

# --- database -----------------------------------------------------------------
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{VAR_DIR / 'tim3.sqlite3'}"),
        conn_max_age=int(os.environ.get("DB_CONN_MAX_AGE", "60")),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # One writer at a time, taken at BEGIN: no upgrade deadlocks between drains.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
elif env_bool("TIM3_DB_POOL", False):
    # Web processes (tim3web/asgi.py turns this on): under ASGI each request runs in a thread
    # of its own, so a persistent connection is never reused (it leaked, one per thread) and
    # without one every request connected anew (a server-side fork, several ms). The pool
    # keeps at most TIM3_DB_POOL_MAX_SIZE connections for all threads; Django takes one at
    # the request's first query and gives it back when the request ends (CONN_MAX_AGE must
    # be 0 with a pool). A request finding the pool empty waits up to TIM3_DB_POOL_TIMEOUT s.
    # Celery workers leave this off: one thread each, so a persistent connection is reused.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # Each connection is checked as it leaves the pool (an empty query): one the server
    # dropped (restart, pg_terminate_backend) is replaced instead of failing a request.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": int(os.environ.get("TIM3_DB_POOL_MIN_SIZE", "2")),
        "max_size": int(os.environ.get("TIM3_DB_POOL_MAX_SIZE", "10")),
        "timeout": float(os.environ.get("TIM3_DB_POOL_TIMEOUT", "10")),
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 8}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "/login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
WHITENOISE_USE_FINDERS = True  # serve static/ without a collectstatic step

# --- cache: rate-limit counters (shared by every web process in scaled mode) ---
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL,
                          "KEY_PREFIX": "tim3"}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "tim3"}}

# --- the JSON API ---------------------------------------------------------------
TIM3_TOKEN_TTL_HOURS = float(os.environ.get("TIM3_TOKEN_TTL_HOURS", "24"))  # Bearer tokens expire after this
TIM3_RATE_LIMIT_PER_MINUTE = int(os.environ.get("TIM3_RATE_LIMIT_PER_MINUTE", "60"))  # fund-moving requests per wallet
TIM3_READ_RATE_LIMIT_PER_SECOND = int(os.environ.get("TIM3_READ_RATE_LIMIT_PER_SECOND", "20"))  # reads per wallet

# --- celery: the doorbell -----------------------------------------------------
CELERY_BROKER_URL = REDIS_URL or "memory://localhost/"  # a host, or kombu warns "No hostname was supplied" on every send
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_TRANSPORT_OPTIONS = {"polling_interval": 0.01} if not REDIS_URL else {"visibility_timeout": 60}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
TIM3_CLEANUP_SECONDS = float(os.environ.get("TIM3_CLEANUP_SECONDS", "30"))
TIM3_RISK_CHECK_SECONDS = float(os.environ.get("TIM3_RISK_CHECK_SECONDS", "60"))
TIM3_VACUUM_SECONDS = float(os.environ.get("TIM3_VACUUM_SECONDS", "60"))  # VACUUM the mailbox (Postgres)
TIM3_ANALYZE_SECONDS = float(os.environ.get("TIM3_ANALYZE_SECONDS", "3600"))  # and refresh its statistics
CELERY_BEAT_SCHEDULE = {
    "vacuum-mailbox": {"task": "processes.tasks.vacuum_mailbox", "schedule": TIM3_VACUUM_SECONDS},
    "analyze-mailbox": {"task": "processes.tasks.analyze_mailbox", "schedule": TIM3_ANALYZE_SECONDS},
    "sweep-mailboxes": {"task": "processes.tasks.sweep", "schedule": float(os.environ.get("TIM3_SWEEP_SECONDS", "2"))},
    "cleanup-expired": {"task": "processes.tasks.cleanup_expired", "schedule": TIM3_CLEANUP_SECONDS},
    "check-risk-alerts": {"task": "processes.tasks.check_risk_alerts", "schedule": TIM3_RISK_CHECK_SECONDS},
}

# --- channels: hop events -----------------------------------------------------
if REDIS_URL:
    # socket_timeout None: redis-py 8 reads time out after 5 s by default, which races channels_redis's
    # 5 s blocking BZPOPMIN, so every idle websocket was closed with 1011 every few seconds.
    # max_connections: redis-py 8 caps a pool at 100 connections (it was unbounded), and each socket's
    # group_add / receive takes one: the 100th simultaneous websocket handshake failed with HTTP 500.
    # capacity: events queued per Daphne process (one Redis key for all its sockets) and per socket
    # before channels_redis silently drops them; the default 100 lost hops under load (tests/load).
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                    "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None, "max_connections": 10_000}],
                               "capacity": int(os.environ.get("TIM3_WS_CAPACITY", "5000")), "expiry": 120,
                               # A Daphne that dies without leaving the hops group stays a member this long
                               # (channels_redis default: a day), and every publish is copied to it: 30
                               # restarted Daphnes held 400 MB of Redis and multiplied each publish's work.
                               # Live hubs re-join every 60 s (tim3web.fanout.REJOIN_SECONDS).
                               "group_expiry": int(os.environ.get("TIM3_WS_GROUP_EXPIRY", "180"))}}
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- the engine ---------------------------------------------------------------
# How a committed message wakes its target: "celery" enqueues drain(process_id);
# "none" leaves it to whoever drains (tests that drive delivery by hand).
TIM3_DOORBELL = os.environ.get("TIM3_DOORBELL", "celery")
TIM3_DRAIN_BATCH = int(os.environ.get("TIM3_DRAIN_BATCH", "200"))
# A worker follows the cascade it started for this long before handing the rest to the broker.
TIM3_FOLLOW_SECONDS = float(os.environ.get("TIM3_FOLLOW_SECONDS", "0.25"))
# ...and takes up to this many of the woken processes into the same transaction (one commit
# for several hops; 0 = one transaction per drain).
TIM3_FOLLOW_DRAINS = int(os.environ.get("TIM3_FOLLOW_DRAINS", "8"))
# Postgres: run the engine's fixed statements as prepared statements, planned once per connection
# (processes/runtime/prepared.py). Turn off behind a pooler in transaction mode (PgBouncer).
TIM3_PG_PREPARE = env_bool("TIM3_PG_PREPARE", True)
TIM3_MAX_ATTEMPTS = int(os.environ.get("TIM3_MAX_ATTEMPTS", "5"))
TIM3_SWEEP_AFTER_MS = int(os.environ.get("TIM3_SWEEP_AFTER_MS", "2000"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "WARNING")},
}
