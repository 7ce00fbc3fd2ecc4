"""The JSON API of CONTRACT through Django's test client: every endpoint's happy path, auth,
wrong user, SPEC §2's bad quantities, idempotency, rate limits, roles, Bearer tokens and CSRF."""

import hashlib
import json
import threading
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.middleware.csrf import _get_new_csrf_string
from django.test import Client
from django.utils import timezone

from processes.flows import Flow
from processes.runtime.delivery import run_until_idle
from processes.runtime.models import Message, Process
from tim3web import idempotency, ratelimit
from tim3web.accounts import create_account, wallet_of
from tim3web.auth import issue_token
from tim3web.models import ApiToken, AuditEntry, IdempotencyRecord

PASSWORD = "correct horse battery"
UNIT = 10**6
MESSAGE_KEYS = {"id", "from", "target", "action", "tags", "data", "slot", "reference", "x_reference",
                "pushed_for", "parent", "status", "error", "timestamp"}
FLOW_KEYS = {"id", "kind", "mode", "status", "quantity", "error", "messages"}
BAD_QUANTITIES = ["0", "-5", "-1", "1.5", "1e3", "+5", "05", " 5", "5 ", "5\n", "", "abc", "0x10",
                  str(10**18 + 1), str(2**63 + 1), "9" * 40, 1000, 0, -1, 1.5, None, [], {}]
FUND_PATHS = ["/api/faucet", "/api/deposits", "/api/redemptions"]


# --- helpers ------------------------------------------------------------------------
class Api:
    """A JSON client for one user (Bearer) or anonymous."""

    def __init__(self, token: str | None = None, client: Client | None = None) -> None:
        self.client = client or Client()
        self.token = token

    def call(self, method: str, path: str, body=None, *, raw: str | None = None, headers: dict | None = None,
             **params):
        headers = dict(headers or {})
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        kwargs = {"headers": headers}
        if method == "get":
            return self.client.get(path, params, **kwargs)
        data = raw if raw is not None else json.dumps(body if body is not None else {})
        return getattr(self.client, method)(path, data=data, content_type="application/json", **kwargs)

    def get(self, path, **params):
        return self.call("get", path, **params)

    def post(self, path, body=None, **kwargs):
        return self.call("post", path, body, **kwargs)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "code"}, body
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and body["error"]
    return body


def snapshot() -> tuple[int, int, int]:
    """What an error must leave unchanged."""
    return Flow.objects.count(), Message.objects.count(), IdempotencyRecord.objects.count()


def flow_status(flow_id: str) -> str:
    run_until_idle()
    response = Api().get(f"/api/flows/{flow_id}")
    assert response.status_code == 200, response.content
    return response.json()["status"]


@pytest.fixture
def make_user(db):
    counter = iter(range(10_000))

    def make(name: str | None = None, **flags):
        account = create_account(username=name or f"user{next(counter)}", password=PASSWORD)
        if flags:
            get_user_model().objects.filter(pk=account.user.pk).update(**flags)
            account.user.refresh_from_db()
        return account.user

    return make


@pytest.fixture
def as_user(make_user):
    """A factory: an Api acting as a fresh user through a Bearer token; `.user` is the user."""

    def make(name: str | None = None, **flags) -> Api:
        user = make_user(name, **flags)
        raw, _ = issue_token(user)
        api = Api(raw)
        api.user = user
        api.address = wallet_of(user)
        return api

    return make


@pytest.fixture
def alice(system, as_user):
    return as_user("alice")


@pytest.fixture
def bob(system, as_user):
    return as_user("bob")


def fund(api: Api, usda: int = 500 * UNIT) -> None:
    response = api.post("/api/faucet", {"quantity": str(usda)})
    assert response.status_code == 202, response.content
    assert flow_status(response.json()["flow_id"]) == "completed"


def wallet(api: Api) -> dict:
    response = api.get("/api/wallet")
    assert response.status_code == 200, response.content
    return response.json()


# --- accounts and tokens ---------------------------------------------------------------
def test_register_then_token_then_wallet(db):
    api = Api()
    response = api.post("/api/register", {"username": "carol", "password": PASSWORD})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["username"] == "carol" and len(body["address"]) == 43

    response = api.post("/api/token", {"username": "carol", "password": PASSWORD})
    assert response.status_code == 200, response.content
    token = response.json()["token"]
    row = ApiToken.objects.get()
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()  # only the hash is stored
    assert token not in json.dumps(list(ApiToken.objects.values()), default=str)
    assert timedelta(hours=23) < row.expires_at - timezone.now() <= timedelta(hours=24)

    me = Api(token).get("/api/wallet").json()
    assert me["address"] == body["address"]


@pytest.mark.parametrize("body, status, code", [
    ({"username": "carol", "password": "short"}, 400, "weak_password"),
    ({"username": "carol", "password": "password123"}, 400, "weak_password"),
    ({"username": "no spaces", "password": PASSWORD}, 400, "invalid_username"),
    ({"username": "", "password": PASSWORD}, 400, "invalid_username"),
    ({"username": "x" * 151, "password": PASSWORD}, 400, "invalid_username"),
    ({"username": "nul\x00", "password": PASSWORD}, 400, "invalid_username"),
    ({"username": "carol"}, 400, "invalid_password"),
    ({"username": "carol", "password": PASSWORD, "is_superuser": True}, 400, "unknown_field"),
    ({"username": "carol", "password": 12345678}, 400, "invalid_password"),
    (["carol", PASSWORD], 400, "invalid_body"),
])
def test_register_refuses_bad_input(db, body, status, code):
    assert_error(Api().post("/api/register", body), status, code)
    assert not get_user_model().objects.exists()


def test_register_taken_username_and_bad_json(make_user):
    make_user("carol")
    assert_error(Api().post("/api/register", {"username": "carol", "password": PASSWORD}), 409, "username_taken")
    assert_error(Api().post("/api/register", raw="{not json"), 400, "invalid_json")
    assert_error(Api().post("/api/register", raw=""), 400, "invalid_body")


def test_token_refuses_bad_credentials(make_user):
    make_user("carol")
    assert_error(Api().post("/api/token", {"username": "carol", "password": "wrong password"}), 401,
                 "invalid_credentials")
    assert_error(Api().post("/api/token", {"username": "nobody", "password": PASSWORD}), 401, "invalid_credentials")
    assert not ApiToken.objects.exists()


def test_token_ttl_follows_settings(make_user, settings):
    settings.TIM3_TOKEN_TTL_HOURS = 1
    make_user("carol")
    Api().post("/api/token", {"username": "carol", "password": PASSWORD})
    assert timedelta(minutes=59) < ApiToken.objects.get().expires_at - timezone.now() <= timedelta(hours=1)


def test_bearer_invalid_expired_and_inactive(as_user, system):
    api = as_user()
    assert api.get("/api/wallet").status_code == 200
    assert_error(Api("tim3_not-a-token").get("/api/wallet"), 401, "invalid_token")
    assert_error(Api("").get("/api/wallet"), 401, "authentication_required")

    ApiToken.objects.filter(user=api.user).update(expires_at=timezone.now() - timedelta(seconds=1))
    before = snapshot()
    response = api.get("/api/wallet")
    assert_error(response, 401, "token_expired")
    assert "Bearer" in response["WWW-Authenticate"]
    assert_error(api.post("/api/faucet", {"quantity": "1000000"}), 401, "token_expired")
    assert snapshot() == before

    other = as_user()
    get_user_model().objects.filter(pk=other.user.pk).update(is_active=False)
    assert_error(other.get("/api/wallet"), 401, "invalid_token")


def test_bearer_token_is_not_a_session(as_user, system):
    """A bad Bearer token is a 401 even if the same client also has a good session."""
    api = as_user()
    client = Client()
    client.force_login(api.user)
    assert client.get("/api/wallet").status_code == 200
    assert_error(Api("tim3_bogus", client).get("/api/wallet"), 401, "invalid_token")


def test_bearer_lookup_reads_the_token_user_and_wallet_fresh_each_request(as_user, system):
    """One query finds token, user and wallet (tim3web.auth): nothing of it is remembered between
    requests, so a revoked token, a deactivated user or a new superuser counts at once."""
    api = as_user()
    assert wallet(api)["address"] == api.address
    ApiToken.objects.filter(user=api.user).update(last_used_at=None)
    assert api.get("/api/wallet").status_code == 200
    used = ApiToken.objects.get(user=api.user).last_used_at
    assert used is not None and timezone.now() - used < timedelta(minutes=1)
    assert api.get("/api/wallet").status_code == 200
    assert ApiToken.objects.get(user=api.user).last_used_at == used  # not written again within the minute

    assert_error(api.post("/api/admin/resume", {"scope": "all"}), 403, "forbidden")
    get_user_model().objects.filter(pk=api.user.pk).update(is_superuser=True)
    assert api.post("/api/admin/resume", {"scope": "all"}).status_code == 202

    ApiToken.objects.filter(user=api.user).delete()
    assert_error(api.get("/api/wallet"), 401, "invalid_token")


def test_bearer_user_without_an_account_gets_its_wallet_on_first_use(make_user, system):
    """A user made outside the sign-up (createsuperuser) has no Account: the token still works,
    and the user's requests go through a wallet of its own, created once."""
    user = get_user_model().objects.create_user(username="no-account", password=PASSWORD)
    api = Api(issue_token(user)[0])
    address = wallet(api)["address"]
    assert len(address) == 43 and wallet_of(user) == address
    response = api.post("/api/faucet", {"quantity": "1000000"})
    assert response.status_code == 202, response.content
    assert Flow.objects.get(id=response.json()["flow_id"]).user == address
    assert wallet(api)["address"] == address


# --- auth required -----------------------------------------------------------------------
@pytest.mark.parametrize("method, path, body", [
    ("get", "/api/wallet", None),
    ("get", "/api/flows", None),
    ("post", "/api/faucet", {"quantity": "1000000"}),
    ("post", "/api/deposits", {"quantity": "1000000"}),
    ("post", "/api/redemptions", {"quantity": "1000000"}),
    ("post", "/api/admin/pause", {"scope": "all", "reason": "drill"}),
    ("post", "/api/admin/resume", {"scope": "all"}),
])
def test_login_required(system, method, path, body):
    before = snapshot()
    response = Api().call(method, path, body)
    assert_error(response, 401, "authentication_required")
    assert snapshot() == before


@pytest.mark.parametrize("path", ["/api/health", "/api/processes", "/api/messages"])
def test_public_reads(system, path):
    assert Api().get(path).status_code == 200


# --- wallet and the four flows --------------------------------------------------------
def test_faucet_then_wallet(alice):
    assert wallet(alice) == {"address": alice.address, "balances": {"USDA": "0", "TIM3": "0"},
                             "locked": {"USDA": "0"}, "available": {"USDA": "0", "TIM3": "0"}, "denomination": 6}
    response = alice.post("/api/faucet", {"quantity": str(250 * UNIT)})
    assert response.status_code == 202, response.content
    flow_id = response.json()["flow_id"]
    assert set(response.json()) == {"flow_id"}
    assert flow_status(flow_id) == "completed"
    assert wallet(alice)["balances"] == {"USDA": str(250 * UNIT), "TIM3": "0"}
    flow = Flow.objects.get(id=flow_id)
    assert flow.user == alice.address and flow.kind == "faucet"
    assert Message.objects.get(msg_id=flow_id).sender == alice.address


def test_faucet_disabled_in_production(alice, settings):
    settings.TIM3_ENV = "production"
    before = snapshot()
    assert_error(alice.post("/api/faucet", {"quantity": "1000000"}), 403, "faucet_disabled")
    assert snapshot() == before


@pytest.mark.parametrize("mode", [None, "deposit", "lock"])
def test_deposit_and_redeem_complete(alice, mode):
    fund(alice, 300 * UNIT)
    extra = {} if mode is None else {"mode": mode}
    response = alice.post("/api/deposits", {"quantity": str(100 * UNIT), **extra})
    assert response.status_code == 202, response.content
    deposit_id = response.json()["flow_id"]
    assert flow_status(deposit_id) == "completed"
    flow = Api().get(f"/api/flows/{deposit_id}").json()
    assert flow["kind"] == "deposit" and flow["mode"] == (mode or "deposit") and flow["quantity"] == str(100 * UNIT)
    me = wallet(alice)
    assert me["balances"]["TIM3"] == str(100 * UNIT)
    if mode == "lock":  # v1: the USDA stays in the user's account, locked
        assert me["balances"]["USDA"] == str(300 * UNIT) and me["locked"]["USDA"] == str(100 * UNIT)
        assert me["available"]["USDA"] == str(200 * UNIT)
    else:
        assert me["balances"]["USDA"] == str(200 * UNIT) and me["locked"]["USDA"] == "0"

    response = alice.post("/api/redemptions", {"quantity": str(40 * UNIT), **extra})
    assert response.status_code == 202, response.content
    assert flow_status(response.json()["flow_id"]) == "completed"
    me = wallet(alice)
    assert me["balances"]["TIM3"] == str(60 * UNIT)
    if mode == "lock":
        assert me["locked"]["USDA"] == str(60 * UNIT)
    else:
        assert me["balances"]["USDA"] == str(240 * UNIT)


def test_redeem_without_tim3_does_not_complete(alice):
    response = alice.post("/api/redemptions", {"quantity": str(5 * UNIT)})
    assert response.status_code == 202
    assert flow_status(response.json()["flow_id"]) in ("failed", "refunded")
    assert wallet(alice)["balances"] == {"USDA": "0", "TIM3": "0"}


# --- SPEC §2: bad input changes nothing ---------------------------------------------------
@pytest.mark.parametrize("path", FUND_PATHS)
def test_bad_quantity_is_refused(alice, path, settings):
    settings.TIM3_RATE_LIMIT_PER_MINUTE = 1000  # refused requests count too
    fund(alice, 100 * UNIT)
    before, balances = snapshot(), wallet(alice)
    for quantity in BAD_QUANTITIES:
        for mode in (None, "deposit", "lock"):
            body = {"quantity": quantity} if mode is None or path == "/api/faucet" else {"quantity": quantity,
                                                                                         "mode": mode}
            assert_error(alice.post(path, body), 400, "invalid_quantity")
        assert_error(alice.post(path, {"quantity": quantity}, headers={"Idempotency-Key": "k1"}), 400,
                     "invalid_quantity")
    assert snapshot() == before and wallet(alice) == balances


@pytest.mark.parametrize("path", FUND_PATHS)
def test_missing_quantity_and_bad_bodies(alice, path):
    before = snapshot()
    assert_error(alice.post(path, {}), 400, "invalid_quantity")
    assert_error(alice.post(path, raw="{"), 400, "invalid_json")
    assert_error(alice.post(path, raw='"1000000"'), 400, "invalid_body")
    assert_error(alice.post(path, raw=""), 400, "invalid_body")
    assert_error(alice.post(path, raw="\xff\xfe"), 400, "invalid_json")
    assert snapshot() == before


@pytest.mark.parametrize("path", ["/api/deposits", "/api/redemptions"])
@pytest.mark.parametrize("mode", ["v1", "", "LOCK", 1])
def test_bad_mode_is_refused(alice, path, mode):
    before = snapshot()
    assert_error(alice.post(path, {"quantity": "1000000", "mode": mode}), 400, "invalid_mode")
    assert snapshot() == before


# --- one user cannot act as another ----------------------------------------------------
@pytest.mark.parametrize("path", FUND_PATHS)
def test_naming_another_wallet_is_refused(alice, bob, path):
    before = snapshot()
    for field in ("wallet", "from", "From", "user", "address", "sender", "Recipient", "owner"):
        body = assert_error(bob.post(path, {"quantity": "1000000", field: alice.address}), 400, "unknown_field")
        assert field in body["error"]
    assert snapshot() == before


def test_wallet_is_always_ones_own(alice, bob):
    fund(alice, 100 * UNIT)
    for params in ({"address": alice.address}, {"wallet": alice.address}, {"user": "alice"}):
        me = bob.get("/api/wallet", **params).json()
        assert me["address"] == bob.address and me["balances"]["USDA"] == "0"


def test_one_user_cannot_move_anothers_funds(alice, bob):
    fund(alice, 200 * UNIT)
    response = alice.post("/api/deposits", {"quantity": str(100 * UNIT)})
    assert flow_status(response.json()["flow_id"]) == "completed"
    alice_before = wallet(alice)
    # Bob redeems and deposits: only ever from his own (empty) wallet.
    for path in ("/api/redemptions", "/api/deposits"):
        for mode in ("deposit", "lock"):
            response = bob.post(path, {"quantity": str(50 * UNIT), "mode": mode})
            assert response.status_code == 202
            flow_id = response.json()["flow_id"]
            assert Message.objects.get(msg_id=flow_id).sender == bob.address
            assert flow_status(flow_id) in ("failed", "refunded")
    assert wallet(alice) == alice_before
    assert wallet(bob)["balances"] == {"USDA": "0", "TIM3": "0"}
    # Bob's flows are his; Alice's are not in his "mine".
    mine = {f["id"] for f in bob.get("/api/flows", mine=1).json()["results"]}
    assert mine == set(Flow.objects.filter(user=bob.address).values_list("id", flat=True))
    assert not mine & set(Flow.objects.filter(user=alice.address).values_list("id", flat=True))


# --- flows ---------------------------------------------------------------------------------
def test_flow_detail_shape_and_public(alice):
    response = alice.post("/api/faucet", {"quantity": str(10 * UNIT)})
    flow_id = response.json()["flow_id"]
    pending = Api().get(f"/api/flows/{flow_id}").json()
    assert pending["status"] == "pending"
    run_until_idle()
    flow = Api().get(f"/api/flows/{flow_id}").json()  # anyone may read a flow
    assert FLOW_KEYS <= set(flow)
    assert flow["id"] == flow_id and flow["status"] == "completed" and flow["error"] is None
    assert flow["messages"][0]["id"] == flow_id and flow["messages"][0]["from"] == alice.address
    for msg in flow["messages"]:
        assert set(msg) == MESSAGE_KEYS
        assert msg["pushed_for"] == flow_id and msg["status"] in ("applied", "failed")
        assert isinstance(msg["tags"], dict)
        is_process = Process.objects.filter(id=msg["target"]).exists()
        assert isinstance(msg["slot"], int) if is_process else msg["slot"] is None  # wallets have no sequence
    assert [m["id"] for m in flow["messages"]] == list(
        Message.objects.filter(pushed_for=flow_id).order_by("seq").values_list("msg_id", flat=True))


@pytest.mark.parametrize("flow_id", ["A" * 43, "nope", "x" * 300, "%00", "..%2F..", "a b"])
def test_flow_not_found(system, flow_id):
    assert_error(Api().get(f"/api/flows/{flow_id}"), 404, "not_found")


def test_flows_list_mine_newest_first_and_paginated(alice, bob):
    ids = [alice.post("/api/faucet", {"quantity": str(UNIT * (i + 1))}).json()["flow_id"] for i in range(3)]
    bob_id = bob.post("/api/faucet", {"quantity": str(UNIT)}).json()["flow_id"]
    run_until_idle()
    mine = alice.get("/api/flows", mine=1).json()["results"]
    assert [f["id"] for f in mine] == ids[::-1]
    assert all(FLOW_KEYS <= set(f) and f["messages"] for f in mine)
    assert [f["id"] for f in alice.get("/api/flows", mine=1, limit=2).json()["results"]] == ids[:0:-1]
    everyone = [f["id"] for f in alice.get("/api/flows").json()["results"]]
    assert bob_id in everyone and set(ids) <= set(everyone)
    for limit in (0, -1, 201, "x", "1.5"):
        assert_error(alice.get("/api/flows", limit=limit), 400, "invalid_limit")
    assert_error(alice.get("/api/flows", mine="maybe"), 400, "invalid_mine")


# --- messages and processes -------------------------------------------------------------------
def test_message_detail_has_result(alice):
    flow_id = alice.post("/api/faucet", {"quantity": str(UNIT)}).json()["flow_id"]
    run_until_idle()
    msg = Api().get(f"/api/messages/{flow_id}").json()
    assert set(msg) == MESSAGE_KEYS | {"result"}
    assert msg["id"] == flow_id and msg["action"] == "Mint" and msg["status"] == "applied"
    assert msg["tags"]["Quantity"] == str(UNIT) and isinstance(msg["result"], dict)
    assert_error(Api().get("/api/messages/" + "B" * 43), 404, "not_found")
    assert_error(Api().get("/api/messages/bad%00id"), 404, "not_found")


def test_messages_filters(alice, system):
    flow_id = alice.post("/api/faucet", {"quantity": str(UNIT)}).json()["flow_id"]
    alice.post("/api/faucet", {"quantity": str(2 * UNIT)})
    run_until_idle()
    api = Api()
    by_flow = api.get("/api/messages", flow=flow_id).json()["results"]
    assert by_flow and {m["pushed_for"] for m in by_flow} == {flow_id}
    assert [m["id"] for m in by_flow] == list(
        Message.objects.filter(pushed_for=flow_id).order_by("-seq").values_list("msg_id", flat=True))

    usda = system["usda"]
    by_name = api.get("/api/messages", process="usda", limit=200).json()["results"]
    by_id = api.get("/api/messages", process=usda.id, limit=200).json()["results"]
    assert by_name == by_id and {m["target"] for m in by_name} == {usda.id}
    assert [m["slot"] for m in by_name] == sorted((m["slot"] for m in by_name), reverse=True)  # newest first

    mints = api.get("/api/messages", action="Mint", process="usda").json()["results"]
    assert mints and {m["action"] for m in mints} == {"Mint"}

    last = Process.objects.get(pk=usda.pk).next_slot - 1
    after = api.get("/api/messages", process="usda", after_slot=last - 3).json()["results"]
    assert [m["slot"] for m in after] == [last - 2, last - 1, last]  # slot order, gap-free
    assert [m["slot"] for m in api.get("/api/messages", process="usda", after_slot=last - 3, limit=2)
            .json()["results"]] == [last - 2, last - 1]
    assert api.get("/api/messages", process="usda", after_slot=last).json()["results"] == []
    assert api.get("/api/messages", process="usda", after_slot=0).json()["results"][0]["slot"] == 1

    assert_error(api.get("/api/messages", after_slot=3), 400, "after_slot_needs_process")
    assert_error(api.get("/api/messages", process="nope"), 404, "not_found")
    for bad in (-1, 2**63, 2**70, "x"):
        assert_error(api.get("/api/messages", process="usda", after_slot=bad), 400, "invalid_after_slot")
    assert_error(api.get("/api/messages", limit=500), 400, "invalid_limit")
    assert_error(api.get("/api/messages", action="a\x00b"), 400, "invalid_action")


def test_processes_and_health(system):
    results = Api().get("/api/processes").json()["results"]
    assert {p["name"] for p in results} == {"usda", "tim3", "coordinator", "lock-manager", "state-manager"}
    assert all(set(p) == {"id", "name", "kind", "version", "active"} for p in results)
    assert {p["id"] for p in results} == set(Process.objects.values_list("id", flat=True))

    health = Api().get("/api/health").json()
    assert {"tim3_supply", "usda_reserves", "collateral_ratio", "reserves_ok", "health_score", "paused",
            "pending_operations", "checked_at"} <= set(health)
    assert set(health["paused"]) == {"mint", "redeem", "reason", "by", "at"}
    assert health["reserves_ok"] is True and health["paused"]["mint"] is False


# --- idempotency ---------------------------------------------------------------------------
def test_same_key_replays_and_moves_nothing_again(alice):
    key = {"Idempotency-Key": "faucet-1"}
    first = alice.post("/api/faucet", {"quantity": str(7 * UNIT)}, headers=key)
    assert first.status_code == 202
    before = snapshot()
    again = alice.post("/api/faucet", {"quantity": str(7 * UNIT)}, headers=key)
    assert again.status_code == 202 and again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true"
    assert snapshot() == before
    run_until_idle()
    assert alice.post("/api/faucet", {"quantity": str(7 * UNIT)}, headers=key).json() == first.json()
    run_until_idle()
    assert wallet(alice)["balances"]["USDA"] == str(7 * UNIT)  # minted once


def test_same_key_different_body_is_refused(alice):
    fund(alice, 100 * UNIT)
    key = {"Idempotency-Key": "dep-1"}
    assert alice.post("/api/deposits", {"quantity": str(10 * UNIT)}, headers=key).status_code == 202
    before = snapshot()
    assert_error(alice.post("/api/deposits", {"quantity": str(11 * UNIT)}, headers=key), 422,
                 "idempotency_key_reused")
    assert_error(alice.post("/api/deposits", {"quantity": str(10 * UNIT), "mode": "lock"}, headers=key), 422,
                 "idempotency_key_reused")
    assert_error(alice.post("/api/redemptions", {"quantity": str(10 * UNIT)}, headers=key), 422,
                 "idempotency_key_reused")
    assert snapshot() == before
    # An explicit default is the same request.
    assert alice.post("/api/deposits", {"quantity": str(10 * UNIT), "mode": "deposit"}, headers=key) \
        .status_code == 202
    assert snapshot() == before


def test_keys_are_per_user(alice, bob):
    key = {"Idempotency-Key": "shared-key"}
    a = alice.post("/api/faucet", {"quantity": str(UNIT)}, headers=key)
    b = bob.post("/api/faucet", {"quantity": str(UNIT)}, headers=key)
    c = bob.post("/api/faucet", {"quantity": str(2 * UNIT)}, headers={"Idempotency-Key": "other"})
    assert a.status_code == b.status_code == c.status_code == 202
    assert a.json()["flow_id"] != b.json()["flow_id"]
    assert "Idempotent-Replayed" not in b
    # Alice's key with Bob's body stays Alice's business: still a reuse for her, a replay for Bob.
    assert_error(alice.post("/api/faucet", {"quantity": str(2 * UNIT)}, headers=key), 422, "idempotency_key_reused")
    assert bob.post("/api/faucet", {"quantity": str(UNIT)}, headers=key).json() == b.json()
    run_until_idle()
    assert wallet(alice)["balances"]["USDA"] == str(UNIT)
    assert wallet(bob)["balances"]["USDA"] == str(3 * UNIT)


def test_refused_request_does_not_use_up_its_key(alice, settings):
    key = {"Idempotency-Key": "retry-me"}
    assert_error(alice.post("/api/faucet", {"quantity": "0"}, headers=key), 400, "invalid_quantity")
    settings.TIM3_ENV = "production"
    assert_error(alice.post("/api/faucet", {"quantity": "1000000"}, headers=key), 403, "faucet_disabled")
    settings.TIM3_ENV = "test"
    assert not IdempotencyRecord.objects.exists()
    assert alice.post("/api/faucet", {"quantity": "1000000"}, headers=key).status_code == 202


@pytest.mark.parametrize("key", ["", " ", "x" * 201, "naïve", "tab\there"])
def test_malformed_key_is_refused(alice, key):
    before = snapshot()
    assert_error(alice.post("/api/faucet", {"quantity": "1000000"}, headers={"Idempotency-Key": key}), 400,
                 "invalid_idempotency_key")
    assert snapshot() == before


def test_concurrent_twin_loses_and_replays_the_winner(alice, monkeypatch):
    """The race: both requests miss the look-up; the second insert hits the unique constraint,
    rolls back everything it did, and answers with the winner's record."""
    key = {"Idempotency-Key": "twin"}
    first = alice.post("/api/faucet", {"quantity": str(UNIT)}, headers=key)
    before = snapshot()
    real_find = idempotency._find
    calls = []

    def blind_first_lookup(user, k):
        calls.append(k)
        return None if len(calls) == 1 else real_find(user, k)

    monkeypatch.setattr(idempotency, "_find", blind_first_lookup)
    twin = alice.post("/api/faucet", {"quantity": str(UNIT)}, headers=key)
    assert twin.status_code == 202 and twin.json() == first.json() and twin["Idempotent-Replayed"] == "true"
    assert len(calls) == 2 and snapshot() == before
    calls.clear()
    assert_error(alice.post("/api/faucet", {"quantity": str(2 * UNIT)}, headers=key), 422, "idempotency_key_reused")
    assert snapshot() == before


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_with_one_key_move_once(system, as_user):
    """Real threads on Postgres (SQLite's test database serializes everything anyway)."""
    if connection.vendor != "postgresql":
        pytest.skip("needs concurrent writers (Postgres)")
    alice = as_user("alice")
    barrier, answers = threading.Barrier(4), []

    def post():
        from django.db import connection as conn
        try:
            api = Api(alice.token)
            barrier.wait()
            answers.append(api.post("/api/faucet", {"quantity": str(UNIT)}, headers={"Idempotency-Key": "race"}))
        finally:
            conn.close()

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in answers] == [202] * 4
    assert len({r.json()["flow_id"] for r in answers}) == 1
    assert Flow.objects.filter(user=alice.address).count() == 1
    assert IdempotencyRecord.objects.count() == 1


# --- rate limits ---------------------------------------------------------------------------
@pytest.fixture
def frozen_clock(monkeypatch):
    now = [1_800_000_000.5]
    monkeypatch.setattr(ratelimit, "clock", lambda: now[0])
    return now


def test_fund_moving_requests_are_rate_limited(alice, bob, settings, frozen_clock):
    settings.TIM3_RATE_LIMIT_PER_MINUTE = 2
    for path in ("/api/faucet", "/api/deposits"):
        assert alice.post(path, {"quantity": str(UNIT)}).status_code == 202
    before = snapshot()
    response = alice.post("/api/redemptions", {"quantity": str(UNIT)})
    assert_error(response, 429, "rate_limited")
    assert 1 <= int(response["Retry-After"]) <= 60
    assert_error(alice.post("/api/faucet", {"quantity": str(UNIT)}, headers={"Idempotency-Key": "k"}), 429,
                 "rate_limited")
    assert snapshot() == before
    assert alice.get("/api/wallet").status_code == 200  # reads have their own limit
    assert bob.post("/api/faucet", {"quantity": str(UNIT)}).status_code == 202  # per wallet
    frozen_clock[0] += 60  # the next window
    assert alice.post("/api/faucet", {"quantity": str(UNIT)}).status_code == 202


def test_reads_are_rate_limited(alice, settings, frozen_clock):
    settings.TIM3_READ_RATE_LIMIT_PER_SECOND = 3
    for _ in range(3):
        assert alice.get("/api/wallet").status_code == 200
    assert_error(alice.get("/api/flows"), 429, "rate_limited")
    assert Api().get("/api/health").status_code == 200  # public reads are not per wallet
    frozen_clock[0] += 1
    assert alice.get("/api/wallet").status_code == 200


def test_rate_limit_counter_is_shared_through_the_cache(db):
    """hit() counts in the configured cache (Redis in scaled mode), so every web process sees one count."""
    subject = _get_new_csrf_string()  # any fresh, unique string
    waits = [ratelimit.hit(subject, scope="test", limit=3, period=60, now=120.0) for _ in range(5)]
    assert waits[:3] == [None] * 3 and waits[3] == waits[4] == 60.0
    assert ratelimit.hit(subject, scope="test", limit=3, period=60, now=180.0) is None


# --- admin: pause and resume ------------------------------------------------------------------
@pytest.fixture
def guardian(system, as_user):
    api = as_user("guardian")
    api.user.user_permissions.add(Permission.objects.get(codename="pause_system", content_type__app_label="processes"))
    return api


@pytest.fixture
def admin(system, as_user):
    return as_user("root", is_superuser=True, is_staff=True)


def test_plain_user_cannot_pause_or_resume(alice):
    before = snapshot()
    assert_error(alice.post("/api/admin/pause", {"scope": "mint", "reason": "because"}), 403, "forbidden")
    assert_error(alice.post("/api/admin/resume", {"scope": "mint"}), 403, "forbidden")
    assert snapshot() == before and not AuditEntry.objects.exists()


def test_staff_without_permission_cannot_pause(as_user, system):
    staff = as_user("staff", is_staff=True)
    assert_error(staff.post("/api/admin/pause", {"scope": "all", "reason": "x"}), 403, "forbidden")


def test_guardian_pauses_admin_resumes(guardian, admin, alice):
    fund(alice, 50 * UNIT)
    response = guardian.post("/api/admin/pause", {"scope": "mint", "reason": "oracle drift"})
    assert response.status_code == 202, response.content
    assert response.json()["scope"] == "mint" and response.json()["flow_ids"]
    run_until_idle()
    paused = Api().get("/api/health").json()["paused"]
    assert paused["mint"] is True and paused["reason"] == "oracle drift" and paused["by"] == guardian.address
    entry = AuditEntry.objects.get(action="pause")
    assert entry.actor == guardian.user and entry.detail["reason"] == "oracle drift"
    assert entry.detail["role"] == "guardian"

    deposit = alice.post("/api/deposits", {"quantity": str(10 * UNIT)}).json()["flow_id"]
    assert flow_status(deposit) in ("refunded", "failed")

    before = snapshot()
    assert_error(guardian.post("/api/admin/resume", {"scope": "mint"}), 403, "forbidden")
    assert snapshot() == before and AuditEntry.objects.count() == 1

    response = admin.post("/api/admin/resume", {"scope": "mint"})
    assert response.status_code == 202, response.content
    run_until_idle()
    assert Api().get("/api/health").json()["paused"]["mint"] is False
    assert AuditEntry.objects.get(action="resume").actor == admin.user
    deposit = alice.post("/api/deposits", {"quantity": str(10 * UNIT)}).json()["flow_id"]
    assert flow_status(deposit) == "completed"


def test_admin_may_pause(admin):
    assert admin.post("/api/admin/pause", {"scope": "all", "reason": "drill"}).status_code == 202
    run_until_idle()
    paused = Api().get("/api/health").json()["paused"]
    assert paused["mint"] and paused["redeem"]
    assert AuditEntry.objects.get().detail["role"] == "admin"


@pytest.mark.parametrize("body, code", [
    ({"scope": "everything", "reason": "x"}, "invalid_scope"),
    ({"scope": "mint", "reason": "   "}, "reason_required"),
    ({"scope": "mint", "reason": "x" * 501}, "reason_too_long"),
    ({"scope": "mint"}, "invalid_reason"),
    ({"scope": "mint", "reason": "x", "by": "someone"}, "unknown_field"),
])
def test_pause_bad_input(admin, body, code):
    before = snapshot()
    assert_error(admin.post("/api/admin/pause", body), 400, code)
    assert snapshot() == before and not AuditEntry.objects.exists()


def test_resume_bad_scope(admin):
    assert_error(admin.post("/api/admin/resume", {"scope": "nope"}), 400, "invalid_scope")
    assert not AuditEntry.objects.exists()


# --- CSRF: enforced for the session, not for Bearer -------------------------------------------
def test_session_posts_need_csrf(alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice.user)
    assert client.get("/api/wallet").status_code == 200  # reads need no token
    before = snapshot()
    assert_error(client.post("/api/faucet", {"quantity": "1000000"}, content_type="application/json"), 403,
                 "csrf_failed")
    assert_error(client.post("/api/admin/pause", {"scope": "all", "reason": "x"}, content_type="application/json"),
                 403, "csrf_failed")
    assert snapshot() == before

    secret = _get_new_csrf_string()
    client.cookies["csrftoken"] = secret
    response = client.post("/api/faucet", {"quantity": "1000000"}, content_type="application/json",
                           headers={"X-CSRFToken": secret})
    assert response.status_code == 202, response.content
    assert Flow.objects.get(id=response.json()["flow_id"]).user == alice.address


def test_bearer_needs_no_csrf(alice):
    api = Api(alice.token, Client(enforce_csrf_checks=True))
    assert api.post("/api/faucet", {"quantity": "1000000"}).status_code == 202


# --- the error shape everywhere, and the documents ---------------------------------------------
def test_unknown_paths_and_methods_use_the_error_shape(alice):
    assert_error(Api().get("/api/nothing-here"), 404, "not_found")
    assert_error(Api().get("/api/"), 404, "not_found")
    assert_error(Api().get("/api/wallet/"), 404, "not_found")
    response = alice.call("delete", "/api/wallet")
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in response["Allow"]
    assert_error(alice.get("/api/faucet"), 405, "method_not_allowed")
    assert_error(Api().call("put", "/api/health", {}), 405, "method_not_allowed")


def test_openapi_and_docs(db):
    schema = Api().get("/api/openapi.json").json()
    paths = set(schema["paths"])
    assert {"/api/register", "/api/token", "/api/wallet", "/api/faucet", "/api/deposits", "/api/redemptions",
            "/api/flows/{flow_id}", "/api/flows", "/api/messages/{message_id}", "/api/messages", "/api/processes",
            "/api/health", "/api/admin/pause", "/api/admin/resume"} <= paths
    assert Client().get("/api/docs").status_code == 200


def test_oversized_body_is_refused(alice, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    before = snapshot()
    assert_error(alice.post("/api/faucet", {"quantity": "1" * 2000}), 413, "too_large")
    assert snapshot() == before
