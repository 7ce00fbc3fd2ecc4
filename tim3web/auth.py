"""Who is calling the API: the browser session (with CSRF) or `Authorization: Bearer <token>`.

Tokens are random strings handed out once by POST /api/token; only their
sha256 is stored (ApiToken.token_hash), and each expires after
settings.TIM3_TOKEN_TTL_HOURS. A request carrying a Bearer header is judged by
that token alone: a bad or expired token is a 401, never a fall-back to the
session. Bearer requests need no CSRF token (no browser sends the header by
itself); session requests that change anything must pass Django's CSRF check.
"""

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from ninja.security import APIKeyCookie, HttpBearer
from ninja.utils import check_csrf

from tim3web.accounts import wallet_of
from tim3web.errors import ApiError
from tim3web.models import ApiToken

TOKEN_PREFIX = "tim3_"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE")
LAST_USED_RESOLUTION = timedelta(minutes=1)  # don't write on every request


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def issue_token(user) -> tuple[str, ApiToken]:
    """A new Bearer token for `user`: the raw token (shown once) and its row."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken.objects.create(user=user, token_hash=hash_token(raw),
                                  expires_at=timezone.now() + timedelta(hours=settings.TIM3_TOKEN_TTL_HOURS))
    return raw, row


def user_for_token(token: str):
    """The active user this token belongs to, or ApiError 401 saying why not.

    The user's Account (its wallet) comes in the same query: see wallet_for."""
    try:
        # get(), not first(): token_hash is unique, and first()'s ORDER BY costs compiling.
        row = ApiToken.objects.select_related("user__account").get(token_hash=hash_token(token)) if token else None
    except ApiToken.DoesNotExist:
        row = None
    if row is None or not row.user.is_active:
        raise ApiError(401, "invalid_token", "The Bearer token is not valid; get one from POST /api/token.",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    now = timezone.now()
    if row.expires_at <= now:
        raise ApiError(401, "token_expired", "The Bearer token has expired; get a new one from POST /api/token.",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=row.pk).update(last_used_at=now)
    return row.user


class BearerAuth(HttpBearer):
    """`Authorization: Bearer <token>`; no header (or another scheme) leaves it to the session."""

    def __call__(self, request):
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.authenticate(request, token.strip())

    def authenticate(self, request, token: str):
        user = user_for_token(token)
        request.user = user
        account = getattr(user, "account", None)  # loaded with the token; None if the user has none yet
        if account is not None:
            request.tim3_wallet = account.address
        return user


class SessionAuth(APIKeyCookie):
    """The Django login session; unsafe methods must pass the CSRF check (403 csrf_failed)."""

    param_name = settings.SESSION_COOKIE_NAME

    def __init__(self) -> None:
        super().__init__(csrf=True)

    def __call__(self, request):
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return None
        if request.method not in SAFE_METHODS and check_csrf(request) is not None:
            raise ApiError(403, "csrf_failed", "CSRF check failed: send the csrftoken cookie's value in the "
                                               "X-CSRFToken header, or use a Bearer token.")
        return user

    def authenticate(self, request, key):  # required by the base class; __call__ does the work
        return None


bearer = BearerAuth()
session = SessionAuth()
AUTH = [bearer, session]


def wallet_for(request) -> str:
    """The caller's wallet address, `wallet_of(request.auth)`, looked up once per request:
    the rate limiter and the endpoint both need it (Bearer auth already read it)."""
    wallet = getattr(request, "tim3_wallet", None)
    if wallet is None:
        wallet = request.tim3_wallet = wallet_of(request.auth)
    return wallet


def is_admin(user) -> bool:
    """An admin may pause and resume (and everything else)."""
    return bool(user and user.is_active and user.is_superuser)


def is_guardian(user) -> bool:
    """A guardian may pause, not resume (CONTRACT: the processes.pause_system permission)."""
    return bool(user and user.is_active and user.has_perm("processes.pause_system"))
