"""Who is calling the API: the browser session (with CSRF) or `Authorization: Bearer <token>`.

Tokens are random strings handed out once by POST /api/token; only their
sha256 is stored (ApiToken.token_hash), and each expires after
settings.TIM3_TOKEN_TTL_HOURS. A request carrying a Bearer header is judged by
that token alone: a bad or expired token is a 401, never a fall-back to the
session. Bearer requests need no CSRF token (no browser sends the header by
itself); session requests that change anything must pass Django's CSRF check.
"""

import functools
import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone
from ninja.security import APIKeyCookie, HttpBearer
from ninja.utils import check_csrf

from processes.runtime import prepared
from processes.runtime.sql import convert_row, converters_for
from tim3web.accounts import wallet_of
from tim3web.errors import ApiError
from tim3web.models import Account, ApiToken

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


class TokenOwner(NamedTuple):
    """What a Bearer token's one query finds: its row's id and times, its user, the user's wallet."""

    token_id: int
    expires_at: datetime
    last_used_at: datetime | None
    user: Any
    address: str | None  # None: the user has no Account yet


@functools.cache
def _token_query(vendor: str) -> tuple[str, list]:
    """user_for_token's statement, built once per database vendor: the token joined with its
    user and the user's Account (none yet: NULL), so a request costs one round trip and no ORM
    query building (~1 ms of CPU). Returns the SQL and the converters of the values the ORM
    would convert (SQLite's text datetimes and 0/1 booleans; sql.converters_for)."""
    user_model = get_user_model()
    q = connection.ops.quote_name
    user_pk = q(user_model._meta.pk.column)
    token_fields = [ApiToken._meta.get_field(name) for name in ("id", "expires_at", "last_used_at")]
    user_fields = list(user_model._meta.concrete_fields)
    address = Account._meta.get_field("address")
    columns = ([f"t.{q(f.column)}" for f in token_fields] + [f"u.{q(f.column)}" for f in user_fields]
               + [f"a.{q(address.column)}"])
    sql = (f"SELECT {', '.join(columns)} FROM {q(ApiToken._meta.db_table)} t "
           f"JOIN {q(user_model._meta.db_table)} u ON u.{user_pk} = t.{q(ApiToken._meta.get_field('user').column)} "
           f"LEFT JOIN {q(Account._meta.db_table)} a ON a.{q(Account._meta.get_field('user').column)} = u.{user_pk} "
           f"WHERE t.{q(ApiToken._meta.get_field('token_hash').column)} = %s")
    return prepared.register(sql), converters_for([*token_fields, *user_fields, address])


def _token_owner(token_hash: str) -> TokenOwner | None:
    sql, converters = _token_query(connection.vendor)
    with connection.cursor() as cursor:
        cursor.execute(sql, [token_hash])
        row = cursor.fetchone()
    if row is None:
        return None
    values = convert_row(row, converters)
    user = get_user_model().from_db(connection.alias, None, values[3:-1])  # every concrete field, in order
    return TokenOwner(values[0], values[1], values[2], user, values[-1])


def user_for_token(token: str) -> TokenOwner:
    """The token's active user and wallet (TokenOwner), or ApiError 401 saying why not."""
    owner = _token_owner(hash_token(token)) if token else None
    if owner is None or not owner.user.is_active:
        raise ApiError(401, "invalid_token", "The Bearer token is not valid; get one from POST /api/token.",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    now = timezone.now()
    if owner.expires_at <= now:
        raise ApiError(401, "token_expired", "The Bearer token has expired; get a new one from POST /api/token.",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    if owner.last_used_at is None or now - owner.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=owner.token_id).update(last_used_at=now)
    return owner


class BearerAuth(HttpBearer):
    """`Authorization: Bearer <token>`; no header (or another scheme) leaves it to the session."""

    def __call__(self, request):
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.authenticate(request, token.strip())

    def authenticate(self, request, token: str):
        owner = user_for_token(token)
        request.user = owner.user
        if owner.address is not None:  # found with the token; a user without an Account gets one in wallet_for
            request.tim3_wallet = owner.address
        return owner.user


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
