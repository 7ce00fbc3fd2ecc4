"""Per-wallet rate limits at the edge (SPEC §5), counted in Django's cache.

- "write": fund-moving requests, settings.TIM3_RATE_LIMIT_PER_MINUTE per wallet
  per minute (default 60); the coordinator checks its own limit again.
- "read": settings.TIM3_READ_RATE_LIMIT_PER_SECOND per wallet per second
  (default 20), for the endpoints that need a login.

Fixed windows: one counter per (scope, wallet, window), created with
`cache.add` and bumped with `cache.incr`, both atomic in Redis (scaled mode,
shared by every web process) and in LocMemCache (embedded mode, one process).
A counter lives two windows, so it cannot expire while it is being counted.
Every attempt by a logged-in wallet counts, refused ones (bad quantity,
replayed Idempotency-Key) included. A limit of 0 turns the scope off. If the cache is unreachable the request is
let through (logged): the coordinator's own limit still holds.
"""

import logging
import math
import time

from django.conf import settings
from django.core.cache import cache

from tim3web.accounts import wallet_of
from tim3web.errors import ApiError

log = logging.getLogger(__name__)

SCOPES = {
    # scope: (setting with the limit, window in seconds)
    "write": ("TIM3_RATE_LIMIT_PER_MINUTE", 60),
    "read": ("TIM3_READ_RATE_LIMIT_PER_SECOND", 1),
}


def clock() -> float:
    return time.time()


def hit(subject: str, *, scope: str, limit: int, period: int, now: float | None = None) -> float | None:
    """Count one request; None if it is within the limit, else the seconds until the window resets."""
    now = clock() if now is None else now
    window = int(now // period)
    key = f"rl:{scope}:{subject}:{window}"
    cache.add(key, 0, timeout=2 * period)
    count = cache.incr(key)
    if count <= limit:
        return None
    return (window + 1) * period - now


def check(request, scope: str) -> None:
    """Raise ApiError 429 (code rate_limited) if the caller's wallet is over the limit for `scope`."""
    setting, period = SCOPES[scope]
    limit = int(getattr(settings, setting))
    if limit <= 0:
        return
    subject = wallet_of(request.auth)
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
