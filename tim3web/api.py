"""The JSON API of CONTRACT ("HTTP API"), mounted at /api/ (OpenAPI at /api/openapi.json, docs at /api/docs).

Auth: the browser session (unsafe methods need the CSRF token) or
`Authorization: Bearer <token>` from POST /api/token (tim3web.auth). Public,
without login: register, token, health, processes, messages and flows/{id}
(the message log is public, as on AO). Everything else answers 401 without a
login.

A user only ever acts through its own wallet, `wallet_of(request.user)`; no
endpoint takes an address, and a body naming one ("wallet", "from", ...) is
refused as an unknown field.

Every error, whatever raised it, is `{"error": "<sentence>", "code":
"<snake_case>"}` with a 4xx status, and nothing changes on error: input
errors are 400 (`invalid_<field>`, `unknown_field`, `invalid_json`,
`invalid_quantity`, `duplicate_field`, ...), 401 `authentication_required` / `invalid_token` /
`token_expired`, 403 `forbidden` / `csrf_failed` / `faucet_disabled`, 404
`not_found`, 405 `method_not_allowed`, 409 `username_taken`, 422
`idempotency_key_reused`, 429 `rate_limited`.
"""

import functools
import json
import logging
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from django.contrib.auth import authenticate
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import transaction
from django.db.models import Q
from django.http import Http404, HttpResponseNotAllowed, JsonResponse
from django.urls import re_path
from ninja import Field, NinjaAPI, Query, Schema, Status
from ninja.errors import AuthenticationError, AuthorizationError, HttpError, ValidationError
from ninja.parser import Parser
from pydantic import AfterValidator, ConfigDict

from processes.actions import (
    ActionError,
    request_deposit,
    request_faucet,
    request_pause,
    request_redemption,
    request_resume,
    system_health,
)
from processes.blueprints.state import TokenAccount
from processes.flows import Flow
from processes.runtime.models import Message, Process
from processes.runtime.quantities import DENOMINATION
from tim3web import idempotency, ratelimit
from tim3web.accounts import SignupError, create_account
from tim3web.auth import AUTH, is_admin, is_guardian, issue_token, wallet_for
from tim3web.errors import ApiError, error_body
from tim3web.models import AuditEntry
from tim3web.serializers import message_to_dict

log = logging.getLogger(__name__)

ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # message and flow ids are 43-char base64url
MAX_SLOT = 2**63 - 1
MAX_LIMIT = 200
QUANTITY_DOC = ("A positive whole number of base units (denomination 6) as a string in canonical form: "
                "digits only, no sign, leading zero, decimal point or exponent; at most 10^18.")


# --- input types ----------------------------------------------------------------
def _clean_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text")
    return value


Text = Annotated[str, AfterValidator(_clean_text)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"page size, at most {MAX_LIMIT}")]


class Input(Schema):
    """Request bodies: unknown fields (like "wallet" or "from") are refused, never ignored."""

    model_config = ConfigDict(extra="forbid")


class Credentials(Input):
    username: Text
    password: Text = Field(max_length=4096)


class QuantityIn(Input):
    quantity: Text = Field(description=QUANTITY_DOC, examples=["1000000"],
                           json_schema_extra={"pattern": "^[1-9][0-9]{0,18}$"})


class DepositIn(QuantityIn):
    mode: Literal["deposit", "lock"] | None = Field(
        None, description='"deposit": v2 custody (default); "lock": v1 collateral, locked in your own account.')


class PauseIn(Input):
    scope: Literal["mint", "redeem", "all"]
    reason: Text = Field(description="Why; shown on the diagram and the deposit form (at most 500 characters).")


class ResumeIn(Input):
    scope: Literal["mint", "redeem", "all"]


# --- output types ----------------------------------------------------------------
class ErrorOut(Schema):
    error: str
    code: str


class RegisterOut(Schema):
    username: str
    address: str


class TokenOut(Schema):
    token: str
    expires_at: datetime


class Tokens(Schema):
    USDA: str
    TIM3: str


class LockedOut(Schema):
    USDA: str


class WalletOut(Schema):
    address: str
    balances: Tokens
    locked: LockedOut
    available: Tokens = Field(description="balance - locked: what can be spent or redeemed now")
    denomination: int


class FlowCreated(Schema):
    flow_id: str


class MessageOut(Schema):
    id: str
    from_: str = Field(alias="from")
    target: str
    action: str
    tags: dict[str, str]
    data: str
    slot: int | None
    reference: str
    x_reference: str | None
    pushed_for: str
    parent: str | None
    status: Literal["pending", "applied", "failed"]
    error: str | None
    timestamp: int


class MessageDetailOut(MessageOut):
    result: Any


class FlowOut(Schema):
    id: str
    kind: str
    mode: str
    status: Literal["pending", "completed", "refunded", "failed"]
    quantity: str | None
    error: str | None
    user: str
    created_at: datetime
    ended_at: datetime | None
    messages: list[MessageOut]


class FlowList(Schema):
    results: list[FlowOut]


class MessageList(Schema):
    results: list[MessageOut]


class ProcessOut(Schema):
    id: str
    name: str
    kind: str
    version: int
    active: bool


class ProcessList(Schema):
    results: list[ProcessOut]


class PausedOut(Schema):
    mint: bool
    redeem: bool
    reason: str
    by: str
    at: int | None


class HealthOut(Schema):
    model_config = ConfigDict(extra="allow")

    tim3_supply: str
    usda_reserves: str
    collateral_ratio: str
    reserves_ok: bool
    health_score: int
    paused: PausedOut
    pending_operations: int
    checked_at: str


class AdminOut(Schema):
    scope: str
    flow_ids: list[str]


ERRORS = {400: ErrorOut, 401: ErrorOut, 429: ErrorOut}
FUND_ERRORS = {**ERRORS, 403: ErrorOut, 422: ErrorOut, 503: ErrorOut}


# --- the API and its error shape ----------------------------------------------------
def _json_errors(view):
    """Django-level answers ninja makes outside its exception handlers (405, the root's 404) in the error shape."""

    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        try:
            response = view(request, *args, **kwargs)
        except Http404:  # ninja's root view at /api/
            return _not_found(request)
        if isinstance(response, HttpResponseNotAllowed):
            allowed = response["Allow"]
            response = JsonResponse(error_body(f"{request.method} is not allowed here; use {allowed}.",
                                               "method_not_allowed"), status=405)
            response["Allow"] = allowed
        return response

    return wrapper


def _not_found(request, *args, **kwargs):
    return JsonResponse(error_body(f"No API endpoint at {request.path}; see /api/docs.", "not_found"), status=404)


_not_found.csrf_exempt = True


class Tim3Api(NinjaAPI):
    def _get_urls(self):
        urls = super()._get_urls()
        for pattern in urls:
            pattern.callback = _json_errors(pattern.callback)
        return [*urls, re_path(r"^.*$", _not_found, name="not-found")]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose names are unique: {"quantity": "0", "quantity": "5"} is ambiguous (which one
    did a proxy or a log look at?), so it is refused instead of silently taking the last."""
    result = {}
    for name, value in pairs:
        if name in result:
            raise ApiError(400, "duplicate_field", f"Field {name[:64]!r} appears more than once in the body.")
        result[name] = value
    return result


class StrictJsonParser(Parser):
    def parse_body(self, request):
        return json.loads(request.body, object_pairs_hook=_unique_keys)


api = Tim3Api(
    title="TIM3 API",
    version="1",
    description=__doc__,
    urls_namespace="api",
    auth=AUTH,
    parser=StrictJsonParser(),
)


def _error(request, status: int, code: str, message: str, headers: dict | None = None):
    response = api.create_response(request, error_body(message, code), status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


@api.exception_handler(ApiError)
def _api_error(request, exc: ApiError):
    return _error(request, exc.status, exc.code, exc.message, exc.headers)


@api.exception_handler(ActionError)
def _action_error(request, exc: ActionError):
    return _error(request, 403 if exc.code == "faucet_disabled" else 400, exc.code, str(exc))


@api.exception_handler(AuthenticationError)
def _unauthenticated(request, exc):
    return _error(request, 401, "authentication_required",
                  "Log in first: the browser session (with its CSRF token) or Authorization: Bearer <token> "
                  "from POST /api/token.", {"WWW-Authenticate": "Bearer"})


@api.exception_handler(AuthorizationError)
def _forbidden(request, exc):
    return _error(request, 403, "forbidden", "You are not allowed to do this.")


HTTP_CODES = {400: "bad_request", 401: "authentication_required", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
              422: "unprocessable", 429: "rate_limited"}


@api.exception_handler(HttpError)
def _http_error(request, exc: HttpError):
    if isinstance(exc.__cause__, ApiError):  # the parser's own refusal, e.g. duplicate_field
        return _api_error(request, exc.__cause__)
    if exc.status_code == 400 and str(exc).startswith("Cannot parse request body"):
        return _error(request, 400, "invalid_json", "The request body is not valid JSON.")
    status = exc.status_code
    return _error(request, status, HTTP_CODES.get(status, "bad_request"), str(exc) or "Bad request.")


@api.exception_handler(RequestDataTooBig)
def _too_large(request, exc):
    return _error(request, 413, "too_large", "The request body is too large.")


@api.exception_handler(SuspiciousOperation)
def _suspicious(request, exc):
    return _error(request, 400, "bad_request", "The request was refused as malformed.")


@api.exception_handler(Http404)
def _http404(request, exc):
    return _error(request, 404, "not_found", str(exc) or "Not found.")


def _field_of(loc) -> str | None:
    names = [str(part) for part in loc[1:] if isinstance(part, str)]
    names = [n for n in names if n != "payload"]  # ninja's name for the body itself
    return names[-1] if names else None


@api.exception_handler(ValidationError)
def _validation_error(request, exc: ValidationError):
    """pydantic's complaints as one sentence and a code; always 400."""
    first = exc.errors[0] if exc.errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc, kind, msg = tuple(first.get("loc", ())), first.get("type", ""), first.get("msg", "invalid")
    field = _field_of(loc)
    if kind == "extra_forbidden":
        return _error(request, 400, "unknown_field",
                      f"Unknown field {field!r}: this endpoint does not take it (you always act as your own wallet).")
    if field is None:
        where = loc[0] if loc else "request"
        return _error(request, 400, f"invalid_{where}", f"The {where} is not valid: {msg}.")
    code = "invalid_" + re.sub(r"[^a-z0-9]+", "_", field.lower()).strip("_")
    if field == "quantity":
        if kind == "missing":
            message = 'quantity is required: a whole number of base units as a string, like "1000000".'
        else:
            message = f'quantity must be a string of digits in base units, like "1000000" ({msg}).'
        return _error(request, 400, "invalid_quantity", message)
    if kind == "missing":
        return _error(request, 400, code, f"{field} is required.")
    return _error(request, 400, code, f"{field}: {msg}.")


@api.exception_handler(Exception)
def _unexpected(request, exc):
    log.exception("API error on %s %s", request.method, request.path)
    return _error(request, 500, "internal_error", "Something went wrong on our side; nothing was changed.")


# --- helpers -------------------------------------------------------------------------
def _flow_to_dict(flow: Flow, messages: list[Message]) -> dict:
    return {
        "id": flow.id, "kind": flow.kind, "mode": flow.mode, "status": flow.status,
        "quantity": None if flow.quantity is None else str(flow.quantity),
        "error": flow.error or None, "user": flow.user,
        "created_at": flow.created_at, "ended_at": flow.ended_at,
        "messages": [message_to_dict(m) for m in messages],
    }


def _flows_with_messages(flows: list[Flow]) -> list[dict]:
    by_flow: dict[str, list[Message]] = {f.id: [] for f in flows}
    for msg in Message.objects.filter(pushed_for__in=list(by_flow)).order_by("seq"):
        by_flow[msg.pushed_for].append(msg)
    return [_flow_to_dict(f, by_flow[f.id]) for f in flows]


def _respond(request, status: int, body: dict, replayed: bool = False):
    response = api.create_response(request, body, status=status)
    if replayed:
        response["Idempotent-Replayed"] = "true"
    return response


def _start(request, body: dict, start) -> Any:
    """A fund-moving request: rate limit, then `start(wallet)` at most once per Idempotency-Key."""
    ratelimit.check(request, "write")
    user = request.auth
    wallet = wallet_for(request)

    def action() -> tuple[int, dict]:
        try:
            flow = start(wallet)
        except LookupError as exc:  # not bootstrapped, or no active coordinator
            raise ApiError(503, "system_unavailable", str(exc))
        return 202, {"flow_id": flow.id}

    return _respond(request, *idempotency.run(request, user=user, body=body, action=action))


IDEMPOTENCY_HEADER = {"parameters": [{
    "in": "header", "name": "Idempotency-Key", "required": False,
    "description": "Any 1-200 printable ASCII characters, unique per request you mean once.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 200}}]}
IDEMPOTENCY_DOC = ("Send an `Idempotency-Key` header to make retries safe: the same key with the same body "
                   "replays the first answer and moves nothing again; with a different body it is a 422.")


# --- accounts -------------------------------------------------------------------------
@api.post("/register", auth=None, response={201: RegisterOut, 400: ErrorOut, 409: ErrorOut}, tags=["accounts"])
def register(request, payload: Credentials):
    """Create a user and its wallet."""
    try:
        account = create_account(username=payload.username, password=payload.password)
    except SignupError as exc:
        raise ApiError(409 if exc.code == "username_taken" else 400, exc.code, str(exc))
    return Status(201, {"username": account.user.get_username(), "address": account.address})


@api.post("/token", auth=None, response={200: TokenOut, 400: ErrorOut, 401: ErrorOut}, tags=["accounts"])
def token(request, payload: Credentials):
    """A Bearer token for `Authorization: Bearer <token>`; it expires after TIM3_TOKEN_TTL_HOURS (24 h)."""
    user = authenticate(request, username=payload.username, password=payload.password)
    if user is None:
        raise ApiError(401, "invalid_credentials", "Wrong username or password.")
    raw, row = issue_token(user)
    return {"token": raw, "expires_at": row.expires_at}


@api.get("/wallet", response={200: WalletOut, 401: ErrorOut, 429: ErrorOut}, tags=["wallet"])
def wallet(request):
    """Your own wallet (there is no way to name another): balances in base units."""
    ratelimit.check(request, "read")
    address = wallet_for(request)
    rows = {name: (balance, locked) for name, balance, locked in TokenAccount.objects.filter(
        process__name__in=("usda", "tim3"), account=address).values_list("process__name", "balance", "locked")}
    usda, tim3 = rows.get("usda", (0, 0)), rows.get("tim3", (0, 0))
    return {
        "address": address,
        "balances": {"USDA": str(usda[0]), "TIM3": str(tim3[0])},
        "locked": {"USDA": str(usda[1])},
        "available": {"USDA": str(usda[0] - usda[1]), "TIM3": str(tim3[0] - tim3[1])},
        "denomination": DENOMINATION,
    }


# --- fund-moving requests ------------------------------------------------------------
@api.post("/faucet", response={202: FlowCreated, **FUND_ERRORS}, tags=["funds"],
          openapi_extra=IDEMPOTENCY_HEADER,
          description="Test environment only (403 faucet_disabled in production): USDA from the faucet, "
                      "at most 1,000 USDA per request and 10,000 per wallet per 24 h. " + IDEMPOTENCY_DOC)
def faucet(request, payload: QuantityIn):
    return _start(request, {"quantity": payload.quantity},
                  lambda wallet: request_faucet(wallet=wallet, quantity=payload.quantity))


@api.post("/deposits", response={202: FlowCreated, **FUND_ERRORS}, tags=["funds"],
          openapi_extra=IDEMPOTENCY_HEADER,
          description="Deposit USDA for TIM3. " + IDEMPOTENCY_DOC)
def deposit(request, payload: DepositIn):
    mode = payload.mode or "deposit"
    return _start(request, {"quantity": payload.quantity, "mode": mode},
                  lambda wallet: request_deposit(wallet=wallet, quantity=payload.quantity, mode=mode))


@api.post("/redemptions", response={202: FlowCreated, **FUND_ERRORS}, tags=["funds"],
          openapi_extra=IDEMPOTENCY_HEADER,
          description="Redeem TIM3 for USDA. " + IDEMPOTENCY_DOC)
def redemption(request, payload: DepositIn):
    mode = payload.mode or "deposit"
    return _start(request, {"quantity": payload.quantity, "mode": mode},
                  lambda wallet: request_redemption(wallet=wallet, quantity=payload.quantity, mode=mode))


# --- flows and messages (the public log) -------------------------------------------
@api.get("/flows/{flow_id}", auth=None, response={200: FlowOut, 404: ErrorOut}, by_alias=True, tags=["log"])
def flow_detail(request, flow_id: str):
    """One flow and every message of it, oldest first. Public, like the message log it summarizes
    (anyone may watch the websocket too); only `GET /api/flows?mine=1` is about you."""
    flow = Flow.objects.filter(id=flow_id).first() if ID.fullmatch(flow_id) else None
    if flow is None:
        raise ApiError(404, "not_found", f"No flow with id {flow_id[:64]!r}.")
    return _flows_with_messages([flow])[0]


@api.get("/flows", response={200: FlowList, **ERRORS}, by_alias=True, tags=["log"])
def list_flows(request, mine: Annotated[bool, Query(description="1: only your own flows")] = False,
               limit: Limit = 50):
    """Flows, newest first: with `mine=1` only your own, otherwise everyone's (the log is public)."""
    ratelimit.check(request, "read")
    flows = Flow.objects.order_by("-created_at", "-id")
    if mine:
        flows = flows.filter(user=wallet_for(request))
    return {"results": _flows_with_messages(list(flows[:limit]))}


@api.get("/messages/{message_id}", auth=None, response={200: MessageDetailOut, 404: ErrorOut}, by_alias=True,
         tags=["log"])
def message_detail(request, message_id: str):
    """One message, with what applying it produced (`result`)."""
    msg = Message.objects.filter(msg_id=message_id).first() if ID.fullmatch(message_id) else None
    if msg is None:
        raise ApiError(404, "not_found", f"No message with id {message_id[:64]!r}.")
    return {**message_to_dict(msg), "result": msg.result}


@api.get("/messages", auth=None, response={200: MessageList, 400: ErrorOut, 404: ErrorOut}, by_alias=True,
         tags=["log"])
def list_messages(request, flow: Annotated[Text | None, Query(max_length=64)] = None,
                  process: Annotated[Text | None, Query(max_length=64, description="a process name or id")] = None,
                  action: Annotated[Text | None, Query(max_length=64)] = None,
                  after_slot: Annotated[int | None, Query(ge=0, le=MAX_SLOT)] = None,
                  limit: Limit = 50):
    """Messages newest first; `process` means messages *to* that process. With `after_slot` (which
    needs `process`): that process's applied or failed messages after the slot, in slot order, the
    way a websocket client catches up on a gap."""
    qs = Message.objects.all()
    if flow:
        qs = qs.filter(pushed_for=flow)
    if action:
        qs = qs.filter(action=action)
    target = None
    if process:
        target = Process.objects.filter(Q(name=process) | Q(id=process)).first()
        if target is None:
            raise ApiError(404, "not_found", f"No process named or with id {process!r}.")
        qs = qs.filter(target=target.id)
    if after_slot is not None:
        if target is None:
            raise ApiError(400, "after_slot_needs_process", "after_slot goes with process (slots are per process).")
        qs = qs.filter(slot__gt=after_slot).order_by("slot")
    else:
        qs = qs.order_by("-seq")
    return {"results": [message_to_dict(m) for m in qs[:limit]]}


@api.get("/processes", auth=None, response=ProcessList, tags=["system"])
def list_processes(request):
    """The processes, oldest first."""
    return {"results": [{"id": p.id, "name": p.name, "kind": p.kind, "version": p.version, "active": p.active}
                        for p in Process.objects.order_by("created_at", "name")]}


@api.get("/health", auth=None, response=HealthOut, tags=["system"])
def health(request):
    """Reserves, collateral ratio, health score and pause state."""
    return system_health()


# --- admin ---------------------------------------------------------------------------
@api.post("/admin/pause", response={202: AdminOut, 403: ErrorOut, **ERRORS}, tags=["admin"])
def pause(request, payload: PauseIn):
    """Emergency pause of every coordinator: a guardian (processes.pause_system) or an admin (superuser)."""
    user = request.auth
    role = "admin" if is_admin(user) else "guardian" if is_guardian(user) else None
    if role is None:
        raise ApiError(403, "forbidden", "Only a guardian or an admin may pause the system.")
    ratelimit.check(request, "write")
    wallet = wallet_for(request)
    with transaction.atomic():
        flows = request_pause(wallet=wallet, scope=payload.scope, reason=payload.reason, role=role)
        detail = {"scope": payload.scope, "reason": payload.reason.strip(), "role": role, "wallet": wallet,
                  "flow_ids": [f.id for f in flows]}
        AuditEntry.objects.create(actor=user, action="pause", detail=detail)
    return Status(202, {"scope": payload.scope, "flow_ids": detail["flow_ids"]})


@api.post("/admin/resume", response={202: AdminOut, 403: ErrorOut, **ERRORS}, tags=["admin"])
def resume(request, payload: ResumeIn):
    """Lift a pause: an admin (superuser) only."""
    user = request.auth
    if not is_admin(user):
        raise ApiError(403, "forbidden", "Only an admin may resume the system.")
    ratelimit.check(request, "write")
    wallet = wallet_for(request)
    with transaction.atomic():
        flows = request_resume(wallet=wallet, scope=payload.scope)
        detail = {"scope": payload.scope, "wallet": wallet, "flow_ids": [f.id for f in flows]}
        AuditEntry.objects.create(actor=user, action="resume", detail=detail)
    return Status(202, {"scope": payload.scope, "flow_ids": detail["flow_ids"]})
