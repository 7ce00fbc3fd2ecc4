"""Per-wallet rate limits at the edge (SPEC §5), counted in Django's cache.

- "write": fund-moving requests, settings.TIM3_RATE_LIMIT_PER_MINUTE per wallet
  per minute (default 60); the coordinator checks its own limit again.
- "read": settings.TIM3_READ_RATE_LIMIT_PER_SECOND per wallet per second
  (default 20), for the endpoints that need a login.

Fixed windows: one counter per (scope, wallet, window), created at 0 and
bumped by one, atomically in Redis (scaled mode, shared by every web process:
SET NX EX and INCR in one MULTI, one round trip) and in LocMemCache (embedded
mode, one process: `cache.add` and `cache.incr`).
A counter lives two windows, so it cannot expire while it is being counted.
Every attempt by a logged-in wallet counts, refused ones (bad quantity,
replayed Idempotency-Key) included. A limit of 0 turns the scope off. If the cache is unreachable the request is
let through (logged): the coordinator's own limit still holds.
"""

import logging
import math
import time

from django.conf import settings
from django.core.cache import DEFAULT_CACHE_ALIAS, BaseCache, caches
from django.core.cache.backends.redis import RedisCache
from django.core.signals import setting_changed
from django.dispatch import receiver

from tim3web.auth import wallet_for
from tim3web.errors import ApiError

log = logging.getLogger(__name__)
_counters: BaseCache | None = None

SCOPES = {
    # scope: (setting with the limit, window in seconds)
    "write": ("TIM3_RATE_LIMIT_PER_MINUTE", 60),
    "read": ("TIM3_READ_RATE_LIMIT_PER_SECOND", 1),
}


def clock() -> float:
    return time.time()


def counters() -> BaseCache:
    """The default cache (settings.CACHES), one object for the whole process.

    `django.core.cache.cache` is a new object in every request under ASGI (one per
    asgiref context), and a new RedisCache opens a new Redis connection pool: a TCP
    connect and handshake per request. This one keeps its connections; redis-py's
    pool is thread-safe, and LocMemCache takes a lock.
    """
    global _counters
    if _counters is None:
        _counters = caches.create_connection(DEFAULT_CACHE_ALIAS)
    return _counters


@receiver(setting_changed)
def _forget_counters(*, setting: str, **kwargs) -> None:
    global _counters
    if setting == "CACHES":
        _counters = None


def _increment(key: str, timeout: int) -> int:
    """Add one to the counter `key` (created at 0, living `timeout` s) and return its new value."""
    store = counters()
    if isinstance(store, RedisCache):
        # One round trip; cache.add + cache.incr take three (SET NX, then EXISTS and INCR).
        # RedisCache has no pipeline of its own: its client (`_cache`) hands out redis-py's.
        key = store.make_and_validate_key(key)
        with store._cache.get_client(key, write=True).pipeline(transaction=True) as pipe:
            pipe.set(key, 0, ex=timeout, nx=True)
            pipe.incr(key)
            return pipe.execute()[1]
    store.add(key, 0, timeout=timeout)
    return store.incr(key)


def hit(subject: str, *, scope: str, limit: int, period: int, now: float | None = None) -> float | None:
    """Count one request; None if it is within the limit, else the seconds until the window resets."""
    now = clock() if now is None else now
    window = int(now // period)
    count = _increment(f"rl:{scope}:{subject}:{window}", 2 * period)
    if count <= limit:
        return None
    return (window + 1) * period - now


def check(request, scope: str) -> None:
    """Raise ApiError 429 (code rate_limited) if the caller's wallet is over the limit for `scope`."""
    setting, period = SCOPES[scope]
    limit = int(getattr(settings, setting))
    if limit <= 0:
        return
    subject = wallet_for(request)
    try:
        wait = hit(subject, scope=scope, limit=limit, period=period)
    except Exception:  # the cache is down: fail open, the coordinator still limits
        log.warning("rate limit cache unavailable; letting the request through", exc_info=True)
        return
    if wait is not None:
        unit = "minute" if period == 60 else "second"
        kind = "fund-moving requests" if scope == "write" else "requests"
        raise ApiError(429, "rate_limited", f"Too many {kind}: at most {limit} per {unit} per wallet. "
                                            f"Try again in {math.ceil(wait)} s.",
                       headers={"Retry-After": str(max(1, math.ceil(wait)))})
