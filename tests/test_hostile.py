"""Hostile input through every door: the JSON API (Bearer, and the session with CSRF), the
HTML forms, the websocket and `manage.py send`.

One table, `CASES`. Each case sends one bad input and asserts a clear refusal (the API:
a 4xx in the {"error", "code"} shape; a form: the page again with the error next to
the field, or Django's 403 for a missing CSRF token; the console: CommandError with its
sentence; the websocket: an error event, or a handshake refused), and every case is run
between two full snapshots (`hostile_support.snapshot`: every message, every process's
state, flows, wallets, accounts, users, tokens, idempotency records, audit entries),
which must be equal. A short second table, `SAFE`, holds hostile requests that are
*accepted* because they are harmless (an extra form field, another user's idempotency
key, an unknown console action that lands in the inbox): each checks exactly what it
may change. The counts go to test-artifacts/reliability/hostile.json.
"""

import asyncio
import json
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.core.management import CommandError, call_command
from django.middleware.csrf import _get_new_csrf_string
from django.test import Client
from django.utils import timezone

from processes.actions import request_deposit, request_faucet
from processes.blueprints.state import TokenAccount
from processes.flows import Flow
from processes.management.commands import send as send_command
from processes.runtime.delivery import run_until_idle
from processes.runtime.models import Message, Process
from processes.runtime.quantities import UNIT
from processes.runtime.replay import snapshot_state
from processes.services import bootstrap_system, operator_address
from tests.hostile_support import (
    FAST_HASHERS,
    PASSWORD,
    assert_unchanged,
    differences,
    make_user,
    module_world,
    settle,
    snapshot,
)
from tim3web.accounts import wallet_of
from tim3web.auth import issue_token
from tim3web.models import ApiToken, IdempotencyRecord

U = UNIT
ARTIFACT = Path(__file__).resolve().parent.parent / "test-artifacts" / "reliability" / "hostile.json"
CSRF = _get_new_csrf_string()
RESULTS: Counter = Counter()  # (channel, category) -> cases passed in this run
SAFE_RESULTS: Counter = Counter()


# --- the world ------------------------------------------------------------------------------

def build_world() -> SimpleNamespace:
    procs = bootstrap_system(environment="test")
    alice, bob = make_user("alice"), make_user("bob")
    admin = make_user("root", superuser=True)
    guardian = make_user("guard", staff=True, guardian=True)
    a, b = wallet_of(alice), wallet_of(bob)
    for staff in (admin, guardian):
        wallet_of(staff)
    settle(request_faucet(wallet=a, quantity=str(100 * U)))
    settle(request_deposit(wallet=a, quantity=str(40 * U)))
    settle(request_deposit(wallet=a, quantity=str(10 * U), mode="lock"))
    settle(request_faucet(wallet=b, quantity=str(10 * U)))
    tokens = {name: issue_token(user)[0] for name, user in
              (("alice", alice), ("bob", bob), ("admin", admin), ("guardian", guardian))}
    expired, row = issue_token(alice)
    ApiToken.objects.filter(pk=row.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    # Alice's first answer under a key, as the API recorded it.
    response = Client().post("/api/faucet", {"quantity": str(U)}, content_type="application/json",
                             headers={"Authorization": f"Bearer {tokens['alice']}", "Idempotency-Key": "alice-key"})
    assert response.status_code == 202, response.content
    run_until_idle()
    users = {"alice": alice, "bob": bob, "admin": admin, "guardian": guardian}
    return SimpleNamespace(procs=procs, users=users, wallets={"alice": a, "bob": b}, tokens=tokens, expired=expired,
                           sessions={name: session_of(user) for name, user in users.items()})


def session_of(user) -> str:
    """A logged-in session, made once (logging in sets last_login, which the snapshot watches)."""
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def logged_in(w, who: str | None, client: Client) -> Client:
    if who:
        client.cookies[settings.SESSION_COOKIE_NAME] = w.sessions[who]
    return client


@pytest.fixture(scope="module")
def world(django_db_setup, django_db_blocker):
    with module_world(django_db_blocker):
        yield build_world()
    write_artifact()


@pytest.fixture
def w(world, db, settings):
    settings.PASSWORD_HASHERS = FAST_HASHERS
    settings.TIM3_RATE_LIMIT_PER_MINUTE = 100_000  # refused requests count against it; not what is tested here
    settings.TIM3_READ_RATE_LIMIT_PER_SECOND = 100_000
    return world


def write_artifact() -> None:
    """Only after a run of the whole table (a partial run does not overwrite a complete one)."""
    if sum(RESULTS.values()) != len(CASES):
        return
    by_channel, by_category = Counter(), Counter()
    for (channel, category), n in RESULTS.items():
        by_channel[channel] += n
        by_category[f"{channel}:{category}"] += n
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps({
        "bad_inputs": sum(RESULTS.values()),
        "by_channel": dict(sorted(by_channel.items())),
        "by_category": dict(sorted(by_category.items())),
        "accepted_safely": sum(SAFE_RESULTS.values()),
        "accepted_safely_by_case": dict(sorted(SAFE_RESULTS.items())),
        "checked": "each bad input: a clear error, and a full state snapshot before == after",
    }, indent=2) + "\n")


# --- how each channel is driven -------------------------------------------------------------

def api(w, method: str, path: str, body=None, *, who: str = "alice", auth: str = "bearer", raw: str | None = None,
        headers: dict | None = None, csrf: str | None = "ok", content_type: str = "application/json"):
    """One API call. auth: bearer (who's token), session (who logged in; `csrf` ok / None / wrong / no-cookie),
    none, or the literal Authorization header after "header:"."""
    client = Client(enforce_csrf_checks=True)
    headers = dict(headers or {})
    if auth == "bearer":
        headers["Authorization"] = f"Bearer {w.tokens[who]}"
    elif auth.startswith("header:"):
        headers["Authorization"] = auth.removeprefix("header:")
    elif auth == "session":
        logged_in(w, who, client)
        if csrf in ("ok", "wrong"):
            client.cookies["csrftoken"] = CSRF
        if csrf == "ok" or csrf == "no-cookie":
            headers["X-CSRFToken"] = CSRF
        elif csrf == "wrong":
            headers["X-CSRFToken"] = _get_new_csrf_string()
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    if method == "get":
        return client.get(path, headers=headers)
    if data is None:
        return getattr(client, method)(path, headers=headers)
    if not isinstance(data, str | bytes):  # a form-encoded body
        return getattr(client, method)(path, data=data, headers=headers)
    return getattr(client, method)(path, data=data, content_type=content_type, headers=headers)


def api_error(response, status: int, code: str) -> None:
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = response.json()
    assert set(body) == {"error", "code"}, body
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and len(body["error"]) > 10, body


def browser(w, who: str | None = None, *, cookie: bool = True) -> Client:
    client = logged_in(w, who, Client(enforce_csrf_checks=True))
    if cookie:
        client.cookies["csrftoken"] = CSRF
    return client


def form_post(w, path: str, data: dict, *, who: str | None = "alice", csrf: bool = True):
    client = browser(w, who, cookie=csrf)
    return client.post(path, {**data, **({"csrfmiddlewaretoken": CSRF} if csrf else {})})


def form_error(response, form: str, field: str | None = None) -> None:
    """The page is shown again (200) with the error on the form (next to `field` if named)."""
    assert response.status_code == 200, (response.status_code, response.content[:300])
    bound = response.context[form]
    assert bound is not None and bound.is_bound and bound.errors, f"{form} has no errors"
    if field is not None:
        assert bound.errors.get(field), (field, bound.errors)
    text = " ".join(str(e) for errors in bound.errors.values() for e in errors)
    assert len(text) > 10, text


def csrf_refused(response) -> None:
    assert response.status_code == 403, (response.status_code, response.content[:200])
    assert b"CSRF" in response.content or b"csrf" in response.content


def console(*args, data: str | None = None, match: str) -> None:
    kwargs = {"data": data} if data is not None else {}
    with pytest.raises(CommandError, match=match):
        call_command("send", *args, **kwargs)


def ws(path: str, *, frames=(), origin: bytes | None = b"http://testserver") -> dict:
    """Talk to the websocket app in a thread of its own (its event loop and its own DB connection,
    so channels' connection housekeeping never touches the test's transaction)."""
    from tim3web.asgi import application

    result: dict = {}

    async def talk():
        headers = [(b"origin", origin)] if origin is not None else []
        communicator = WebsocketCommunicator(application, path, headers=headers)
        result["connect"] = await communicator.connect(timeout=5)
        if result["connect"][0]:
            result["replies"] = []
            for frame in frames:
                if isinstance(frame, bytes):
                    await communicator.send_to(bytes_data=frame)
                else:
                    await communicator.send_to(text_data=frame)
                result["replies"].append(json.loads(await communicator.receive_from(timeout=5)))
            result["nothing_else"] = await communicator.receive_nothing(timeout=0.2)
            await communicator.disconnect()

    def run():
        try:
            asyncio.run(talk())
        except BaseException as exc:  # reported by the test thread
            result["exception"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "websocket talk did not finish"
    if "exception" in result:
        raise result["exception"]
    return result


def ws_error_events(path: str, *frames) -> None:
    result = ws(path, frames=frames)
    assert result["connect"] == (True, None), result
    assert len(result["replies"]) == len(frames)
    for reply in result["replies"]:
        assert reply["type"] == "error" and reply["error"], reply
    assert result["nothing_else"]


def ws_refused(path: str, *, origin: bytes | None = b"http://testserver", code: int | None = 4404) -> None:
    result = ws(path, origin=origin)
    accepted, close_code = result["connect"]
    assert accepted is False, result
    if code is not None:
        assert close_code == code, result


# --- the table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    channel: str  # api | form | page | websocket | console
    category: str
    name: str
    run: object  # callable(w): sends the input and asserts the refusal
    setup: object = None  # callable(w), run before the "before" snapshot

    @property
    def id(self) -> str:
        return f"{self.channel}-{self.category}-{self.name}"


CASES: list[Case] = []


def add(channel: str, category: str, name: str, run, setup=None) -> None:
    CASES.append(Case(channel, category, name, run, setup))


# API: quantities (SPEC §2) -----------------------------------------------------------------
BAD_QUANTITIES = [
    ("0", "zero"), ("-1", "negative"), ("1.5", "decimal"), ("1e3", "exponent"), ("05", "leading-zero"),
    ("+5", "plus-sign"), (" 5", "leading-space"), ("5 ", "trailing-space"), ("5\n", "trailing-newline"),
    ("", "empty"), (str(2**63 + 1), "2^63+1"), (str(10**40), "10^40"), (str(10**18 + 1), "max+1"),
    ("\u0663", "arabic-indic-digit"), ("\uff15", "fullwidth-digit"), ("1_000", "underscore"), ("0x10", "hex"),
    ("5\u200b", "zero-width-space"), ("\U0001f4b0", "emoji"), ("\u202e5", "rtl-override"), ("5\x00", "nul"),
    (None, "null"), (5, "json-number"), (2**63 + 1, "json-2^63+1"), (10**40, "json-10^40"), (True, "true"),
    (1.5, "json-float"), ({"amount": "5"}, "nested-object"), ({"$gt": 0}, "operator-object"), (["5"], "list"),
]
for value, label in BAD_QUANTITIES:
    add("api", "quantity", f"deposits-{label}", lambda w, v=value: api_error(
        api(w, "post", "/api/deposits", {"quantity": v}), 400, "invalid_quantity"))
add("api", "quantity", "deposits-lone-surrogate", lambda w: api_error(
    api(w, "post", "/api/deposits", raw='{"quantity": "\\ud800"}'), 400, "invalid_quantity"))
for value, label in [("0", "zero"), ("-1", "negative"), ("1e3", "exponent"), ("\u0663", "arabic-indic-digit"),
                     (None, "null"), (5, "json-number"), (True, "true"), ({"a": {"b": "1"}}, "nested-object")]:
    add("api", "quantity", f"redemptions-lock-{label}", lambda w, v=value: api_error(
        api(w, "post", "/api/redemptions", {"quantity": v, "mode": "lock"}), 400, "invalid_quantity"))
for value, label in [("0", "zero"), ("1.5", "decimal"), ("+5", "plus-sign"), (10**40, "json-10^40")]:
    add("api", "quantity", f"faucet-{label}", lambda w, v=value: api_error(
        api(w, "post", "/api/faucet", {"quantity": v}), 400, "invalid_quantity"))
for value, label in [("-1", "negative"), ("05", "leading-zero"), ("1_000", "underscore"), ([1], "list")]:
    add("api", "quantity", f"session-deposits-{label}", lambda w, v=value: api_error(
        api(w, "post", "/api/deposits", {"quantity": v}, auth="session"), 400, "invalid_quantity"))

# API: malformed bodies, missing and duplicated fields, oversized data ---------------------------
BODIES = [
    ("missing-quantity", {}, None, 400, "invalid_quantity"),
    ("missing-quantity-with-mode", {"mode": "lock"}, None, 400, "invalid_quantity"),
    ("list-body", None, "[]", 400, "invalid_body"),
    ("string-body", None, '"1000000"', 400, "invalid_body"),
    ("truncated-json", None, '{"quantity": "1000000"', 400, "invalid_json"),
    ("empty-body", None, "", 400, "invalid_body"),
    ("not-utf8", None, b"\xff\xfe\x00", 400, "invalid_json"),
    ("duplicated-quantity", None, '{"quantity": "0", "quantity": "1000000"}', 400, "duplicate_field"),
    ("duplicated-mode", None, '{"quantity": "1000000", "mode": "deposit", "mode": "lock"}', 400, "duplicate_field"),
    ("deep-nesting", None, "[" * 100_000 + "]" * 100_000, 400, "invalid_json"),
    ("5000-digit-number", None, '{"quantity": 1' + "0" * 5000 + "}", 400, "invalid_json"),
    ("nan", None, '{"quantity": NaN}', 400, "invalid_quantity"),
    ("infinity", None, '{"quantity": Infinity}', 400, "invalid_quantity"),
    ("oversized-quantity", {"quantity": "1" * 3_000_000}, None, 413, "too_large"),
    ("oversized-padding", {"quantity": str(U), "pad": "x" * 3_000_000}, None, 413, "too_large"),
    ("mode-unknown", {"quantity": str(U), "mode": "v3"}, None, 400, "invalid_mode"),
    ("mode-uppercase", {"quantity": str(U), "mode": "LOCK"}, None, 400, "invalid_mode"),
    ("mode-rtl-override", {"quantity": str(U), "mode": "lock\u202e"}, None, 400, "invalid_mode"),
    ("mode-number", {"quantity": str(U), "mode": 1}, None, 400, "invalid_mode"),
]
for label, body, raw, status, code in BODIES:
    add("api", "body", label, lambda w, b=body, r=raw, s=status, c=code: api_error(
        api(w, "post", "/api/deposits", b, raw=r), s, c))
add("api", "body", "form-encoded", lambda w: api_error(
    api(w, "post", "/api/deposits", raw={"quantity": str(U)}), 400, "invalid_json"))

# API: spoofed From / another user's wallet in the body ----------------------------------------------
for field in ("from", "From", "wallet", "address", "user", "User", "sender", "Recipient", "owner", "account"):
    add("api", "spoofed-from", f"deposits-{field}", lambda w, f=field: api_error(
        api(w, "post", "/api/deposits", {"quantity": str(U), f: w.wallets["bob"]}), 400, "unknown_field"))
add("api", "spoofed-from", "redemptions-wallet", lambda w: api_error(
    api(w, "post", "/api/redemptions", {"quantity": str(U), "wallet": w.wallets["bob"]}), 400, "unknown_field"))
add("api", "spoofed-from", "faucet-recipient", lambda w: api_error(
    api(w, "post", "/api/faucet", {"quantity": str(U), "recipient": w.wallets["bob"]}), 400, "unknown_field"))
add("api", "spoofed-from", "session-deposits-from", lambda w: api_error(
    api(w, "post", "/api/deposits", {"quantity": str(U), "from": w.wallets["bob"]}, auth="session"), 400,
    "unknown_field"))
add("api", "spoofed-from", "pause-by", lambda w: api_error(
    api(w, "post", "/api/admin/pause", {"scope": "mint", "reason": "x", "by": w.wallets["bob"]}, who="admin"), 400,
    "unknown_field"))
add("api", "spoofed-from", "register-address", lambda w: api_error(
    api(w, "post", "/api/register", {"username": "mallory", "password": PASSWORD, "address": w.wallets["bob"]},
        auth="none"), 400, "unknown_field"))

# API: unknown actions ----------------------------------------------------------------------------
for method, path, status, code in [
    ("post", "/api/transfers", 404, "not_found"), ("post", "/api/mint", 404, "not_found"),
    ("post", "/api/burn", 404, "not_found"), ("post", "/api/admin/configure", 404, "not_found"),
    ("post", "/api/deposits/", 404, "not_found"), ("delete", "/api/deposits", 405, "method_not_allowed"),
    ("put", "/api/wallet", 405, "method_not_allowed"), ("patch", "/api/redemptions", 405, "method_not_allowed"),
]:
    add("api", "unknown-action", f"{method}-{path.strip('/').replace('/', '-')}", lambda w, m=method, p=path, s=status,
        c=code: api_error(api(w, m, p, {"quantity": str(U)}, who="admin"), s, c))

# API: idempotency keys ---------------------------------------------------------------------------
add("api", "idempotency", "replayed-key-other-quantity", lambda w: api_error(
    api(w, "post", "/api/faucet", {"quantity": str(2 * U)}, headers={"Idempotency-Key": "alice-key"}), 422,
    "idempotency_key_reused"))
add("api", "idempotency", "replayed-key-other-endpoint", lambda w: api_error(
    api(w, "post", "/api/deposits", {"quantity": str(U)}, headers={"Idempotency-Key": "alice-key"}), 422,
    "idempotency_key_reused"))
add("api", "idempotency", "replayed-key-session", lambda w: api_error(
    api(w, "post", "/api/redemptions", {"quantity": str(U)}, auth="session", headers={"Idempotency-Key": "alice-key"}),
    422, "idempotency_key_reused"))
for key, label in [("", "empty"), (" ", "blank"), ("x" * 201, "201-chars"), ("na\u00efve", "non-ascii"),
                   ("tab\there", "control-char"), ("\u202ekey", "rtl-override")]:
    add("api", "idempotency", f"malformed-key-{label}", lambda w, k=key: api_error(
        api(w, "post", "/api/faucet", {"quantity": str(U)}, headers={"Idempotency-Key": k}), 400,
        "invalid_idempotency_key"))

# API: CSRF on session POSTs -----------------------------------------------------------------------
for path, body, who, csrf in [
    ("/api/deposits", {"quantity": str(U)}, "alice", None),
    ("/api/faucet", {"quantity": str(U)}, "alice", "wrong"),
    ("/api/redemptions", {"quantity": str(U)}, "alice", "no-cookie"),
    ("/api/admin/pause", {"scope": "all", "reason": "x"}, "admin", None),
    ("/api/admin/resume", {"scope": "all"}, "admin", "wrong"),
]:
    add("api", "csrf", f"{path.strip('/').replace('/', '-')}-{csrf or 'missing'}", lambda w, p=path, b=body, u=who,
        c=csrf: api_error(api(w, "post", p, b, who=u, auth="session", csrf=c), 403, "csrf_failed"))

# API: tokens and Authorization headers --------------------------------------------------------------
add("api", "auth", "expired-token-faucet", lambda w: api_error(
    api(w, "post", "/api/faucet", {"quantity": str(U)}, auth=f"header:Bearer {w.expired}"), 401, "token_expired"))
add("api", "auth", "expired-token-deposits", lambda w: api_error(
    api(w, "post", "/api/deposits", {"quantity": str(U)}, auth=f"header:Bearer {w.expired}"), 401, "token_expired"))
add("api", "auth", "no-credentials", lambda w: api_error(
    api(w, "post", "/api/deposits", {"quantity": str(U)}, auth="none"), 401, "authentication_required"))
for header, label, code in [
    ("Bearer", "bearer-without-token", "invalid_token"),
    ("Bearer " + "x" * 10_000, "huge-token", "invalid_token"),
    ("Bearer tim3_\u0663\u0663", "unicode-token", "invalid_token"),
    ("Bearer tim3_forged", "forged-token", "invalid_token"),
    ("Basic YWxpY2U6Y29ycmVjdCBob3JzZSBiYXR0ZXJ5", "basic-scheme", "authentication_required"),
    ("Token {alice}", "other-scheme", "authentication_required"),
    ("Bearer {alice} {bob}", "two-tokens", "invalid_token"),
    ("Bearer {alice}x", "altered-token", "invalid_token"),
]:
    add("api", "auth", label, lambda w, h=header, c=code: api_error(
        api(w, "post", "/api/deposits", {"quantity": str(U)},
            auth="header:" + h.format(alice=w.tokens["alice"], bob=w.tokens["bob"])), 401, c))


add("api", "auth", "deactivated-users-token",
    lambda w: api_error(api(w, "post", "/api/faucet", {"quantity": str(U)}, who="bob"), 401, "invalid_token"),
    setup=lambda w: type(w.users["bob"]).objects.filter(pk=w.users["bob"].pk).update(is_active=False))

# API: admin endpoints' text and scope -------------------------------------------------------------
for body, label, code in [
    ({"scope": "mint", "reason": "\x1b[31mALL CLEAR"}, "reason-escape-sequence", "invalid_reason"),
    ({"scope": "mint", "reason": "ok\u202eesaeler"}, "reason-rtl-override", "invalid_reason"),
    ({"scope": "mint", "reason": "a\x00b"}, "reason-nul", "invalid_reason"),
    ({"scope": "mint", "reason": "bell\x07"}, "reason-bell", "invalid_reason"),
    ({"scope": "mint", "reason": "   "}, "reason-blank", "reason_required"),
    ({"scope": "mint", "reason": "x" * 501}, "reason-501-chars", "reason_too_long"),
    ({"scope": "ALL", "reason": "drill"}, "scope-uppercase", "invalid_scope"),
    ({"scope": None, "reason": "drill"}, "scope-null", "invalid_scope"),
    ({"scope": ["mint"], "reason": "drill"}, "scope-list", "invalid_scope"),
    ({"reason": "drill"}, "scope-missing", "invalid_scope"),
]:
    add("api", "admin-input", f"pause-{label}", lambda w, b=body, c=code: api_error(
        api(w, "post", "/api/admin/pause", b, who="admin"), 400, c))
add("api", "admin-input", "pause-reason-lone-surrogate", lambda w: api_error(
    api(w, "post", "/api/admin/pause", raw='{"scope": "mint", "reason": "\\udc00"}', who="admin"), 400,
    "invalid_reason"))
add("api", "admin-input", "resume-scope-unknown", lambda w: api_error(
    api(w, "post", "/api/admin/resume", {"scope": "everything"}, who="admin"), 400, "invalid_scope"))
add("api", "admin-input", "guardian-pause-bad-reason", lambda w: api_error(
    api(w, "post", "/api/admin/pause", {"scope": "all", "reason": "\u2066hidden\u2069"}, who="guardian"), 400,
    "invalid_reason"))

# API: accounts -----------------------------------------------------------------------------------
for body, label, status, code in [
    ({"username": "a\u202eb", "password": PASSWORD}, "username-rtl-override", 400, "invalid_username"),
    ({"username": "\U0001f4b0", "password": PASSWORD}, "username-emoji", 400, "invalid_username"),
    ({"username": "mallory\x00", "password": PASSWORD}, "username-nul", 400, "invalid_username"),
    ({"username": "x" * 151, "password": PASSWORD}, "username-151-chars", 400, "invalid_username"),
    ({"username": "alice", "password": PASSWORD}, "username-taken", 409, "username_taken"),
    ({"username": "mallory", "password": PASSWORD, "is_superuser": True}, "is-superuser", 400, "unknown_field"),
    ({"username": "mallory", "password": "x" * 5000}, "password-5000-chars", 400, "invalid_password"),
    ({"username": "mallory", "password": "password"}, "password-common", 400, "weak_password"),
    ({"username": ["mallory"], "password": PASSWORD}, "username-list", 400, "invalid_username"),
]:
    add("api", "accounts", f"register-{label}", lambda w, b=body, s=status, c=code: api_error(
        api(w, "post", "/api/register", b, auth="none"), s, c))
add("api", "accounts", "register-username-lone-surrogate", lambda w: api_error(
    api(w, "post", "/api/register", raw=f'{{"username": "\\ud83d", "password": "{PASSWORD}"}}', auth="none"), 400,
    "invalid_username"))
for body, label, status, code in [
    ({"username": "alice", "password": "wrong password"}, "wrong-password", 401, "invalid_credentials"),
    ({"username": "nobody", "password": PASSWORD}, "unknown-user", 401, "invalid_credentials"),
    ({"username": "alice\x00", "password": PASSWORD}, "username-nul", 400, "invalid_username"),
    ({"username": "alice", "password": PASSWORD, "expires_at": "2999-01-01"}, "choose-expiry", 400, "unknown_field"),
]:
    add("api", "accounts", f"token-{label}", lambda w, b=body, s=status, c=code: api_error(
        api(w, "post", "/api/token", b, auth="none"), s, c))

# API: reads with extreme parameters (nothing to change, but no 500 either) -------------------------
for path, label, code in [
    (f"/api/messages?process=usda&after_slot={2**63}", "after-slot-2^63", "invalid_after_slot"),
    ("/api/messages?process=usda&after_slot=-1", "after-slot-negative", "invalid_after_slot"),
    ("/api/messages?action=a%00b", "action-nul", "invalid_action"),
    ("/api/flows?limit=0", "limit-zero", "invalid_limit"),
    (f"/api/flows?limit={10**40}", "limit-10^40", "invalid_limit"),
]:
    add("api", "read-params", label, lambda w, p=path, c=code: api_error(api(w, "get", p), 400, c))

# Forms: the wallet ------------------------------------------------------------------------------------
for amount, label in [
    ("0", "zero"), ("-1", "negative"), ("1e3", "exponent"), ("", "empty"), ("abc", "letters"),
    ("1.1234567", "7-decimals"), ("1" + "0" * 40, "10^40"), ("\u0663", "arabic-indic-digit"), ("1_000", "underscore"),
    ("5\x00", "nul"), ("\U0001f4b0", "emoji"), ("\u202e5", "rtl-override"), ("1000", "over-balance"),
    ("0.0000001", "below-one-base-unit"), ("x" * 41, "41-chars"),
]:
    add("form", "deposit-amount", label, lambda w, a=amount: form_error(
        form_post(w, "/wallet/deposit", {"deposit-amount": a, "deposit-mode": "deposit"}), "deposit_form", "amount"))
add("form", "deposit-mode", "unknown-mode", lambda w: form_error(
    form_post(w, "/wallet/deposit", {"deposit-amount": "1", "deposit-mode": "v3"}), "deposit_form", "mode"))
add("form", "deposit-mode", "missing-mode", lambda w: form_error(
    form_post(w, "/wallet/deposit", {"deposit-amount": "1"}), "deposit_form", "mode"))
for amount, mode, label in [("0", "deposit", "zero"), ("-5", "deposit", "negative"), ("100", "deposit", "over-balance"),
                            ("20", "lock", "over-v1-position"), ("1e1", "lock", "exponent")]:
    add("form", "redeem-amount", label, lambda w, a=amount, m=mode: form_error(
        form_post(w, "/wallet/redeem", {"redeem-amount": a, "redeem-mode": m}), "redeem_form", "amount"))
add("form", "redeem-mode", "unknown-mode", lambda w: form_error(
    form_post(w, "/wallet/redeem", {"redeem-amount": "1", "redeem-mode": "burn-all"}), "redeem_form", "mode"))
for amount, label in [("0", "zero"), ("-5", "negative"), ("abc", "letters"), ("", "empty"), ("1e3", "exponent"),
                      ("5\x00", "nul")]:
    add("form", "faucet-amount", label, lambda w, a=amount: form_error(
        form_post(w, "/wallet/faucet", {"amount": a}), "faucet_form", "amount"))

# Forms: signup and login -----------------------------------------------------------------------------
for data, label, field in [
    ({"username": "a\u202eb"}, "username-rtl-override", "username"),
    ({"username": "\U0001f4b0"}, "username-emoji", "username"),
    ({"username": "x" * 151}, "username-151-chars", "username"),
    ({"username": "mallory\x00"}, "username-nul", "username"),
    ({"username": "alice"}, "username-taken", "username"),
    ({"password2": "something else entirely"}, "passwords-differ", "password2"),
    ({"password1": "password", "password2": "password"}, "password-common", "password1"),
]:
    add("form", "signup", label, lambda w, d=data, f=field: form_error(
        form_post(w, "/signup", {"username": "mallory", "password1": PASSWORD, "password2": PASSWORD, **d}, who=None),
        "form", f))
for data, label in [({"password": "wrong password"}, "wrong-password"), ({"username": "nobody"}, "unknown-user"),
                    ({"username": "alice\x00"}, "username-nul"), ({"username": "a" * 300}, "username-300-chars")]:
    add("form", "login", label, lambda w, d=data: form_error(
        form_post(w, "/login", {"username": "alice", "password": PASSWORD, **d}, who=None), "form"))

# Forms: operations (an admin at the keyboard) ----------------------------------------------------------
for data, label, field in [
    ({"scope": "nope"}, "scope-unknown", "scope"),
    ({"reason": ""}, "reason-empty", "reason"),
    ({"reason": "   "}, "reason-blank", "reason"),
    ({"reason": "x" * 501}, "reason-501-chars", "reason"),
    ({"reason": "\x1b[2J cleared"}, "reason-escape-sequence", None),
    ({"reason": "ok\u202eesaeler"}, "reason-rtl-override", None),
    ({"reason": "bell\x07"}, "reason-bell", None),
    ({"reason": "a\x00b"}, "reason-nul", "reason"),
]:
    add("form", "ops-pause", label, lambda w, d=data, f=field: form_error(
        form_post(w, "/ops/pause", {"scope": "mint", "reason": "drill", **d}, who="admin"), "pause_form", f))
add("form", "ops-resume", "scope-unknown", lambda w: form_error(
    form_post(w, "/ops/resume", {"scope": "everything"}, who="admin"), "resume_form", "scope"))
def limits(**changes) -> dict:
    """The limits form as the page fills it in (every current value), with `changes`."""
    from processes.blueprints.state import CoordinatorState
    from tim3web.forms import LimitsForm
    from tim3web.views import limit_values

    form = LimitsForm(current=limit_values(CoordinatorState.objects.get(process__name="coordinator")))
    return {**{name: field.initial for name, field in form.fields.items()}, **changes}


for data, label, field in [
    ({"MinAmount": "0"}, "min-zero", "MinAmount"), ({"MinAmount": "-1"}, "min-negative", "MinAmount"),
    ({"MaxAmount": "abc"}, "max-letters", "MaxAmount"), ({"MaxAmount": "1e3"}, "max-exponent", "MaxAmount"),
    ({"UserDailyLimit": "\u0663"}, "daily-arabic-indic-digit", "UserDailyLimit"),
    ({"CooldownSeconds": "0"}, "cooldown-zero", "CooldownSeconds"),
    ({"CooldownSeconds": "1.5"}, "cooldown-decimal", "CooldownSeconds"),
    ({"RateLimitPerMinute": "\u0663"}, "rate-arabic-indic-digit", "RateLimitPerMinute"),
    ({"MinAmount": "500", "MaxAmount": "100"}, "min-above-max", "MinAmount"),
    ({"PendingTimeout": "1" + "0" * 40}, "timeout-10^40", "PendingTimeout"),
    ({"CooldownSeconds": "\u00b2"}, "cooldown-superscript-two", "CooldownSeconds"),
    ({"MaxAmount": "5\x00"}, "max-nul", "MaxAmount"),
]:
    add("form", "ops-limits", label, lambda w, d=data, f=field: form_error(
        form_post(w, "/ops/limits", limits(**d), who="admin"), "limits_form", f))

# Forms: CSRF missing -------------------------------------------------------------------------------------
for path, data, who in [
    ("/wallet/deposit", {"deposit-amount": "1", "deposit-mode": "deposit"}, "alice"),
    ("/wallet/redeem", {"redeem-amount": "1", "redeem-mode": "deposit"}, "alice"),
    ("/wallet/faucet", {"amount": "1"}, "alice"),
    ("/signup", {"username": "mallory", "password1": PASSWORD, "password2": PASSWORD}, None),
    ("/login", {"username": "alice", "password": PASSWORD}, None),
    ("/ops/pause", {"scope": "all", "reason": "forged"}, "admin"),
    ("/ops/resume", {"scope": "all"}, "admin"),
    ("/ops/limits", {"MaxAmount": "1"}, "admin"),
    ("/ops/coordinators/spawn", {}, "admin"),
    ("/ops/system-check", {}, "admin"),
]:
    add("form", "csrf-missing", path.strip("/").replace("/", "-"), lambda w, p=path, d=data, u=who: csrf_refused(
        form_post(w, p, d, who=u, csrf=False)))

# Forms: coordinator versions (admin) -------------------------------------------------------------------
def page_status(response, status: int, text: bytes) -> None:
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert text in response.content, response.content[:500]


add("form", "ops-coordinators", "activate-nul-id", lambda w: page_status(
    form_post(w, "/ops/coordinators/activate", {"process": "\x00"}, who="admin"), 404, b"couldn"))
add("form", "ops-coordinators", "activate-unknown-id", lambda w: page_status(
    form_post(w, "/ops/coordinators/activate", {"process": "a" * 43}, who="admin"), 404, b"couldn"))
add("form", "ops-coordinators", "activate-a-token", lambda w: page_status(
    form_post(w, "/ops/coordinators/activate", {"process": w.procs["usda"].id}, who="admin"), 200,
    b"is not a coordinator"))
add("form", "ops-coordinators", "unknown-verb", lambda w: page_status(
    form_post(w, "/ops/coordinators/delete", {"process": w.procs["coordinator"].id}, who="admin"), 404, b"couldn"))
add("form", "ops-coordinators", "rollback-without-earlier-version", lambda w: page_status(
    form_post(w, "/ops/coordinators/rollback", {}, who="admin"), 200, b"no earlier coordinator version"))

# Pages: ids and search terms no page can honour (no 500) --------------------------------------------------
for path, who, label in [
    ("/flows/%00", None, "flow-nul"), ("/explorer/messages/%00", None, "message-nul"),
    ("/explorer/processes/%00", None, "process-nul"), ("/explorer/addresses/a%00", None, "address-nul"),
    ("/explorer?q=%00", None, "search-nul"), ("/explorer?q=usda%00", None, "search-trailing-nul"),
    ("/explorer/processes/usda?action=%00", None, "action-filter-nul"), ("/wallet?focus=%00", "alice", "wallet-query-nul"),
    ("/ops?apage=%00", "admin", "ops-page-nul"),
]:
    add("page", "nul", label, lambda w, p=path, u=who: page_status(
        logged_in(w, u, Client()).get(p), 400, b"Bad Request"))
for path, label in [("/flows/" + "x" * 5000, "flow-5000-chars"), ("/explorer/messages/\U0001f4a5", "message-emoji"),
                    ("/explorer/processes/..%2F..%2Fetc", "process-dot-dot"), ("/flows/%E2%80%AEabc", "flow-rtl-override")]:
    add("page", "unknown-id", label, lambda w, p=path: page_status(Client().get(p), 404, b"couldn"))

# WebSocket --------------------------------------------------------------------------------------------------
for frame, label in [
    ("hello", "garbage-text"),
    (json.dumps({"action": "Transfer", "Recipient": "x" * 43, "Quantity": "1000000"}), "json-command"),
    (json.dumps({"type": "subscribe", "flow": "../../etc"}), "json-subscribe"),
    (b"\x00\xff" * 512, "binary-frame"),
    ("x" * 1_000_000, "huge-text-frame"),
    (b"\x00" * 1_000_000, "huge-binary-frame"),
    ("\x00", "nul"),
    ("\ud800", "lone-surrogate"),
    ("\u202e\U0001f4b0", "rtl-override-emoji"),
]:
    add("websocket", "frames", label, lambda w, f=frame: ws_error_events("/ws/flows/", f))
add("websocket", "frames", "many-frames-on-a-flow-stream", lambda w: ws_error_events(
    f"/ws/flows/{Flow.objects.first().id}/", "a", b"b", "{}"))
for path, label in [
    ("/ws/flows/bad/", "short-id"), ("/ws/flows/" + "a" * 44 + "/", "44-chars"),
    ("/ws/flows/" + "a" * 42 + "!/", "punctuation"), ("/ws/flows/\x00/", "nul"), ("/ws/flows/../", "dot-dot"),
    ("/ws/flows/" + "a" * 43 + "/extra/", "extra-segment"), ("/ws/flows/\U0001f4a5/", "emoji"),
    ("/ws/flows", "no-trailing-slash"), ("/ws/other/", "other-path"), ("/ws/flows/%00/", "percent-encoded-nul"),
]:
    add("websocket", "path", label, lambda w, p=path: ws_refused(p))
add("websocket", "origin", "foreign-origin", lambda w: ws_refused("/ws/flows/", origin=b"http://evil.example", code=None))
add("websocket", "origin", "null-origin", lambda w: ws_refused("/ws/flows/", origin=b"null", code=None))

# Console: manage.py send --------------------------------------------------------------------------------------
CONSOLE = [
    (("nope", "Info"), None, "process", "unknown-process", r"No process named or with id 'nope'"),
    (("{operator}", "Info"), None, "process", "wallet-as-process", r"No process named or with id"),
    (("usda\x00", "Info"), None, "process", "process-name-nul", r"No process named or with id"),
    (("usda", "Transfer", "Quantity"), None, "tags", "tag-without-value", r"must look like Name=Value"),
    (("usda", "Transfer", "=5"), None, "tags", "tag-without-name", r"must look like Name=Value"),
    (("usda", "Transfer", "Quantity=1", "Quantity=2"), None, "tags", "duplicated-tag", r"is given twice"),
    (("usda", "Transfer", "From={bob}", "Quantity=1"), None, "spoofed-from", "from-tag", r"'From' is set by the system"),
    (("usda", "Mint", "Owner={bob}", "Quantity=1"), None, "spoofed-from", "owner-tag", r"'Owner' is set by the system"),
    (("usda", "Transfer", "Pushed-For=x"), None, "spoofed-from", "pushed-for-tag", r"'Pushed-For' is set by the system"),
    (("usda", "Transfer", "Bad Name=1"), None, "tags", "tag-name-with-space", r"is not allowed"),
    (("usda", "Transfer", "Qu\u00e4ntity=1"), None, "tags", "tag-name-unicode", r"is not allowed"),
    (("usda", "Transfer", "Recipient=a\x00b"), None, "unicode", "tag-value-nul", r"contains control characters"),
    (("usda", "Transfer", "Recipient=a\x1b[2Jb"), None, "unicode", "tag-value-escape", r"contains control characters"),
    (("usda", "Transfer", "Note=" + "x" * 4097), None, "oversized", "tag-value-4097-chars", r"longer than 4096"),
    (("usda", "Info", *[f"T{i}=1" for i in range(64)]), None, "oversized", "65-tags", r"Too many tags"),
    (("usda", "X" * 49), None, "unknown-action", "action-49-chars", r"Action is longer than 48"),
    (("usda", "Transfer\n"), None, "unknown-action", "action-newline", r"contains control characters"),
    (("usda", "Info"), "x" * (64 * 1024 + 1), "oversized", "data-64k+1", r"Data is larger than"),
    (("usda", "Info"), "a\x00b", "unicode", "data-nul", r"Data contains a NUL"),
]
for value, label in [("0", "zero"), ("-1", "negative"), ("1.5", "decimal"), ("1e3", "exponent"), ("05", "leading-zero"),
                     ("+5", "plus-sign"), (" 5", "leading-space"), ("", "empty"), (str(2**63 + 1), "2^63+1"),
                     (str(10**40), "10^40"), ("\u0663", "arabic-indic-digit"), ("1_000", "underscore")]:
    CONSOLE.append((("usda", "Transfer", "Recipient={bob}", f"Quantity={value}"), None, "quantity", label,
                    r"Quantity .*Nothing was sent\."))
CONSOLE.append((("state-manager", "UpdatePosition", "Operation=mint", "User={bob}", "Amount=-5"), None, "quantity",
                "amount-negative", r"Amount must be a positive whole number"))
CONSOLE.append((("lock-manager", "LockCollateral", "User={bob}", "Quantity=1", "CollateralAmount=1.0"), None,
                "quantity", "collateral-amount-decimal", r"CollateralAmount must be"))
for args, data, category, label, match in CONSOLE:
    add("console", category, label, lambda w, a=args, d=data, m=match: console(
        *[x.format(bob=w.wallets["bob"], operator=operator_address()) if "{" in x else x for x in a], data=d, match=m))


# --- the test ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(w, case):
    if case.setup:
        case.setup(w)
    before = snapshot()
    case.run(w)
    assert_unchanged(before, case.id)
    RESULTS[(case.channel, case.category)] += 1


def test_the_matrix_is_big_enough():
    channels = Counter(c.channel for c in CASES)
    assert len(CASES) >= 40 and set(channels) == {"api", "form", "page", "websocket", "console"}, channels
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


# --- hostile but harmless: accepted, and exactly what may change does -------------------------------------

def balance(token: str, who: str) -> int:
    row = TokenAccount.objects.filter(process__name=token, account=who).first()
    return row.balance if row else 0


def test_extra_form_fields_naming_another_wallet_are_ignored(w):
    """A form has no field for a wallet: extra fields are ignored, and the deposit is alice's own."""
    bob_before = {t: balance(t, w.wallets["bob"]) for t in ("usda", "tim3")}
    response = form_post(w, "/wallet/deposit", {
        "deposit-amount": "1", "deposit-mode": "deposit", "wallet": w.wallets["bob"], "from": w.wallets["bob"],
        "user": "bob", "address": w.wallets["bob"], "Recipient": w.wallets["bob"]})
    assert response.status_code == 302, response.content[:300]
    flow = Flow.objects.get(id=response["Location"].rstrip("/").split("/")[-1])
    assert (flow.user, flow.quantity) == (w.wallets["alice"], U)
    assert Message.objects.get(msg_id=flow.id).sender == w.wallets["alice"]
    run_until_idle()
    flow.refresh_from_db()
    assert flow.status == Flow.COMPLETED
    assert {t: balance(t, w.wallets["bob"]) for t in ("usda", "tim3")} == bob_before
    SAFE_RESULTS["form-extra-wallet-fields"] += 1


def test_another_users_idempotency_key_is_a_new_request_of_ones_own(w):
    """Keys are per user: bob sending alice's key (and alice's body) neither sees alice's answer
    nor touches her record; his request is his own."""
    alice_record = IdempotencyRecord.objects.get(user=w.users["alice"], key="alice-key")
    response = api(w, "post", "/api/faucet", {"quantity": str(U)}, who="bob", headers={"Idempotency-Key": "alice-key"})
    assert response.status_code == 202 and "Idempotent-Replayed" not in response
    assert response.json() != alice_record.response
    assert Flow.objects.get(id=response.json()["flow_id"]).user == w.wallets["bob"]
    again = IdempotencyRecord.objects.get(user=w.users["alice"], key="alice-key")
    assert (again.body_hash, again.response) == (alice_record.body_hash, alice_record.response)
    SAFE_RESULTS["api-other-users-idempotency-key"] += 1


def test_a_replayed_key_with_the_same_body_moves_nothing_again(w):
    first = IdempotencyRecord.objects.get(user=w.users["alice"], key="alice-key")
    before = snapshot()
    response = api(w, "post", "/api/faucet", {"quantity": str(U)}, headers={"Idempotency-Key": "alice-key"})
    assert response.status_code == 202 and response["Idempotent-Replayed"] == "true"
    assert response.json() == first.response
    assert_unchanged(before, "replayed request")
    SAFE_RESULTS["api-replayed-key-same-body"] += 1


def test_a_pause_reason_written_on_several_lines_is_one_line(w):
    """A textarea's line breaks are folded into spaces (they used to reach the tag validator: a 500)."""
    response = form_post(w, "/ops/pause", {"scope": "mint", "reason": "custody\r\ncheck\tunder way"}, who="admin")
    assert response.status_code == 302, response.content[:300]
    run_until_idle()
    assert Message.objects.filter(action="EmergencyPause").latest("seq").get("Reason") == "custody check under way"
    SAFE_RESULTS["form-multiline-pause-reason"] += 1


@pytest.fixture
def delivering_wait(monkeypatch):
    """`send --wait` with this test as the worker: deliver, then wait as the command does."""
    real = send_command.wait_for_cascade

    def deliver_then_wait(*, root, timeout):
        run_until_idle()
        return real(root=root, timeout=timeout)

    monkeypatch.setattr(send_command, "wait_for_cascade", deliver_then_wait)


CONSOLE_RECORDED = [
    # args, the error the handler gives (as CommandError with --wait)
    (("usda", "Transfer", "Quantity=1000000"), "Transfer failed: Recipient is required."),
    (("usda", "Transfer", "Recipient={bob}"), "Transfer failed: Quantity is required"),
    (("usda", "Transfer", "Recipient=not-an-address", "Quantity=1"), "Transfer failed: Recipient must be a 43-character"),
    (("usda", "Transfer", "Recipient={bob}", "Quantity=1000000000"), "Transfer failed: Insufficient balance"),
    (("tim3", "Mint", "Recipient={bob}", "Quantity=1"), "Mint failed: Only an authorized minter may Mint."),
    (("coordinator", "Configure", "ConfigType=MaxAmount", "Value=-1"), "Configure failed: MaxAmount must be"),
    (("coordinator", "Configure", "ConfigType=Bogus", "Value=1"), "Configure failed: Unknown ConfigType"),
    (("state-manager", "UpdatePosition", "User={bob}"), "UpdatePosition failed: Only a coordinator may UpdatePosition."),
]


@pytest.mark.parametrize(("args", "error"), CONSOLE_RECORDED,
                         ids=[f"{a[0]}-{a[1]}-{i}" for i, (a, _) in enumerate(CONSOLE_RECORDED)])
def test_console_requests_a_handler_refuses_are_recorded_failed_and_move_nothing(w, delivering_wait, args, error):
    """Sent, then refused by the process (AO semantics: the log records the failed request and its
    `<Action>-Error`): `--wait` fails with the handler's sentence, and no process state changes."""
    args = [a.format(bob=w.wallets["bob"]) for a in args]
    before = snapshot()
    with pytest.raises(CommandError, match=error.replace(".", r"\.")):
        call_command("send", *args, "--wait", "--timeout", "5")
    after = snapshot()
    assert after["state"] == before["state"], differences(before, after)
    new = Message.objects.filter(seq__gt=before["messages"]["max_seq"]).order_by("seq")
    request, reply = new
    assert (request.sender, request.status, reply.action, reply.target) == (
        operator_address(), Message.FAILED, f"{args[1]}-Error", operator_address())
    for section in ("flows", "accounts", "idempotency", "users", "tokens", "audit"):
        assert after[section] == before[section], section
    SAFE_RESULTS["console-refused-by-handler"] += 1


def test_console_unknown_action_lands_in_the_inbox_and_moves_nothing(w, delivering_wait):
    """SPEC §1: an unmatched message lands in the process inbox with no effect."""
    before = snapshot()
    call_command("send", "usda", "NoSuchAction", "Quantity=5", "--wait", "--timeout", "5")
    after = snapshot()
    assert after["state"] == before["state"]
    [msg] = Message.objects.filter(seq__gt=before["messages"]["max_seq"])
    assert (msg.action, msg.status, msg.handled) == ("NoSuchAction", Message.APPLIED, False)
    assert snapshot_state(Process.objects.get(name="usda")) == before["state"]["usda"]
    SAFE_RESULTS["console-unknown-action-inbox"] += 1
