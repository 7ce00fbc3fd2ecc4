"""The pages, through Django's test client: who may see what, forms and their
errors, CSRF, and the no-JavaScript path of every form (delivery driven here
with `run_until_idle`, the same drain the workers run)."""

import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client

from processes.actions import configure_coordinator, request_deposit, request_faucet, request_pause
from processes.blueprints.state import CoordinatorState, TokenAccount
from processes.flows import Flow
from processes.runtime.delivery import run_until_idle
from processes.runtime.models import Message, Process
from processes.runtime.quantities import UNIT
from processes.services import active_coordinator
from tim3web import views
from tim3web.accounts import create_account, wallet_of
from tim3web.models import AuditEntry

pytestmark = pytest.mark.django_db

PASSWORD = "correct-horse-42"


@pytest.fixture
def alice(system):
    return create_account(username="alice", password=PASSWORD).user


@pytest.fixture
def alice_client(alice):
    client = Client()
    client.force_login(alice)
    return client


@pytest.fixture
def funded(alice):
    """alice with 1,000 USDA from the faucet."""
    request_faucet(wallet=wallet_of(alice), quantity=str(1000 * UNIT))
    run_until_idle()
    return alice


def balance(address, token):
    row = TokenAccount.objects.filter(process__name=token, account=address).first()
    return row.balance if row else 0


def make_user(name, *, staff=False, superuser=False, perms=()):
    User = get_user_model()
    user = User.objects.create_user(username=name, password=PASSWORD, is_staff=staff or superuser,
                                    is_superuser=superuser)
    for codename in perms:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    client = Client()
    client.force_login(user)
    return user, client


def csrf_in(response) -> bool:
    return b'name="csrfmiddlewaretoken"' in response.content


# --- overview -------------------------------------------------------------------------

def test_home_anonymous_shows_dashboard_diagram_and_call_to_action(system):
    response = Client().get("/")
    assert response.status_code == 200
    html = response.content.decode()
    for text in ("TIM3 supply", "USDA reserves", "Collateral ratio", "Reserves check", "Health score",
                 "Pending operations", "Live message flow", "Create an account", "Test env"):
        assert text in html
    for node in ("user", "usda", "coordinator", "lock-manager", "tim3", "state-manager"):
        assert f'data-node="{node}"' in html
    assert 'id="diagram-data"' in html
    assert "/static/js/home-page.js" in html


def test_home_signed_in_has_wallet_panel_with_csrf(alice_client):
    response = alice_client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "Your wallet" in html and 'data-swap="deposit"' in html and 'data-swap="redeem"' in html
    assert csrf_in(response)
    assert 'id="wallet-data"' in html


def test_home_renders_before_bootstrap(db):
    response = Client().get("/")
    assert response.status_code == 200


def test_production_env_has_no_faucet(alice_client, settings):
    settings.TIM3_ENV = "production"
    html = alice_client.get("/wallet").content.decode()
    assert "Test USDA faucet" not in html
    response = alice_client.post("/wallet/faucet", {"amount": "10"})
    assert response.status_code == 200
    assert "only in the test environment" in response.content.decode()


# --- accounts -------------------------------------------------------------------------

def test_signup_page_has_labelled_fields_and_csrf(system):
    response = Client().get("/signup")
    assert response.status_code == 200
    html = response.content.decode()
    assert csrf_in(response)
    for field in ("id_username", "id_password1", "id_password2"):
        assert f'<label for="{field}">' in html


def test_signup_creates_account_logs_in_and_opens_wallet(system):
    client = Client()
    response = client.post("/signup", {"username": "bob", "password1": PASSWORD, "password2": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/wallet"
    user = get_user_model().objects.get(username="bob")
    assert user.account.address
    assert client.get("/wallet").status_code == 200


@pytest.mark.parametrize("data, message", [
    ({"username": "bob", "password1": PASSWORD, "password2": "other-pass-99"}, "The two passwords do not match."),
    ({"username": "bob", "password1": "short", "password2": "short"}, "too short"),
    ({"username": "bad name!", "password1": PASSWORD, "password2": PASSWORD}, "Choose a username"),
    ({"username": "", "password1": PASSWORD, "password2": PASSWORD}, "This field is required."),
])
def test_signup_errors_are_shown(system, data, message):
    response = Client().post("/signup", data)
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not get_user_model().objects.filter(username="bob").exists()


def test_signup_taken_username(alice):
    response = Client().post("/signup", {"username": "alice", "password1": PASSWORD, "password2": PASSWORD})
    assert response.status_code == 200
    assert "That username is taken." in response.content.decode()


def test_login_and_logout(alice):
    client = Client()
    page = client.get("/login")
    assert page.status_code == 200 and csrf_in(page)
    bad = client.post("/login", {"username": "alice", "password": "wrong"})
    assert bad.status_code == 200
    assert "Please enter a correct username and password" in bad.content.decode()
    good = client.post("/login", {"username": "alice", "password": PASSWORD})
    assert good.status_code == 302
    assert client.get("/wallet").status_code == 200
    assert client.get("/logout").status_code == 405  # logout is a POST (CSRF-protected)
    assert client.post("/logout").status_code == 302
    assert client.get("/wallet").status_code == 302


def test_forms_refuse_posts_without_csrf_token(funded):
    client = Client(enforce_csrf_checks=True)
    client.force_login(funded)
    response = client.post("/wallet/deposit", {"deposit-amount": "10", "deposit-mode": "deposit"})
    assert response.status_code == 403
    assert not Flow.objects.filter(kind="deposit").exists()


# --- wallet ---------------------------------------------------------------------------

def test_wallet_needs_login(system):
    response = Client().get("/wallet")
    assert response.status_code == 302 and response["Location"].startswith("/login?next=/wallet")
    assert Client().post("/wallet/deposit", {"deposit-amount": "1"}).status_code == 302


def test_wallet_shows_balances_forms_history(funded, alice_client):
    response = alice_client.get("/wallet")
    html = response.content.decode()
    assert response.status_code == 200
    assert csrf_in(response)
    assert '<span data-balance="usda_available">1,000</span>' in html
    assert "Deposit USDA, get TIM3" in html and "Redeem TIM3 for USDA" in html
    assert "Custody (v2)" in html and "Lock collateral (v1)" in html
    assert 'data-max' in html and "You receive" in html
    assert "Faucet" in html and "/flows/" in html  # the faucet flow in the history
    assert '<label for="id_deposit-amount">You pay</label>' in html


@pytest.mark.parametrize("amount, message", [
    ("", "This field is required."),
    ("abc", "Enter an amount like 25 or 25.5"),
    ("1.1234567", "at most 6 decimals"),
    ("0", "Enter an amount above zero."),
    ("0.5", "The minimum per operation is 1 TIM3."),
    ("5000", "That is more than your available balance of 1,000 USDA."),
])
def test_deposit_validation(funded, alice_client, amount, message):
    response = alice_client.post("/wallet/deposit", {"deposit-amount": amount, "deposit-mode": "deposit"})
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not Flow.objects.filter(kind="deposit").exists()


def test_deposit_over_the_coordinators_maximum(funded, alice_client):
    configure_coordinator(config_type="MaxAmount", value=str(100 * UNIT))
    run_until_idle()
    response = alice_client.post("/wallet/deposit", {"deposit-amount": "200", "deposit-mode": "deposit"})
    assert response.status_code == 200
    assert "The maximum per operation is 100 TIM3." in response.content.decode()


def test_deposit_over_the_daily_limit(funded, alice_client):
    configure_coordinator(config_type="UserDailyLimit", value=str(30 * UNIT))
    run_until_idle()
    request_deposit(wallet=wallet_of(funded), quantity=str(25 * UNIT))
    run_until_idle()
    response = alice_client.post("/wallet/deposit", {"deposit-amount": "10", "deposit-mode": "deposit"})
    assert response.status_code == 200
    assert "Over your daily limit: 5 TIM3 left of 30" in response.content.decode()


def test_deposit_without_js_then_redeem(funded, alice_client):
    address = wallet_of(funded)
    response = alice_client.post("/wallet/deposit", {"deposit-amount": "25.5", "deposit-mode": "deposit"})
    assert response.status_code == 302
    flow_id = re.fullmatch(r"/flows/([A-Za-z0-9_-]{43})", response["Location"]).group(1)
    run_until_idle()
    flow = Flow.objects.get(pk=flow_id)
    assert (flow.kind, flow.mode, flow.status, flow.quantity) == ("deposit", "deposit", "completed", 25_500_000)
    assert balance(address, "tim3") == 25_500_000
    page = alice_client.get(response["Location"])
    html = page.content.decode()
    assert page.status_code == 200
    for action in ("Transfer", "Credit-Notice", "Mint", "UpdatePosition", "Deposit-Complete"):
        assert f">{action}</a>" in html
    assert "Deposit · v2 custody · 25.5 USDA" in html
    assert "+25.5" in html and "−25.5" in html  # state changes of the hops
    assert 'class="step step-done"' in html

    response = alice_client.post("/wallet/redeem", {"redeem-amount": "10", "redeem-mode": "deposit"})
    assert response.status_code == 302
    run_until_idle()
    assert balance(address, "tim3") == 15_500_000
    assert balance(address, "usda") == (1000 - 25.5 + 10) * UNIT
    wallet = alice_client.get("/wallet").content.decode()
    assert "Redemption · v2 custody" in wallet and wallet.count('data-status="completed"') >= 3


def test_lock_mode_deposit_and_redeem_over_position(funded, alice_client):
    response = alice_client.post("/wallet/deposit", {"deposit-amount": "20", "deposit-mode": "lock"})
    assert response.status_code == 302
    run_until_idle()
    address = wallet_of(funded)
    assert TokenAccount.objects.get(process__name="usda", account=address).locked == 20 * UNIT
    html = alice_client.get("/wallet").content.decode()
    assert '<span data-balance="usda_locked">20</span>' in html
    response = alice_client.post("/wallet/redeem", {"redeem-amount": "30", "redeem-mode": "lock"})
    assert response.status_code == 200
    assert "That is more than your balance of 20 TIM3." in response.content.decode()


def test_redeem_over_balance(funded, alice_client):
    response = alice_client.post("/wallet/redeem", {"redeem-amount": "1", "redeem-mode": "deposit"})
    assert response.status_code == 200
    assert "That is more than your balance of 0 TIM3." in response.content.decode()


def test_faucet_without_js(alice, alice_client):
    response = alice_client.post("/wallet/faucet", {"amount": "250"})
    assert response.status_code == 302 and response["Location"].startswith("/flows/")
    run_until_idle()
    assert balance(wallet_of(alice), "usda") == 250 * UNIT
    bad = alice_client.post("/wallet/faucet", {"amount": "-1"})
    assert bad.status_code == 200 and "Enter an amount like 25" in bad.content.decode()


def test_pause_mint_shows_banner_disables_deposit_keeps_redeem(funded, alice_client):
    address = wallet_of(funded)
    request_deposit(wallet=address, quantity=str(50 * UNIT))
    run_until_idle()
    admin, _ = make_user("root", superuser=True)
    request_pause(wallet=wallet_of(admin), scope="mint", reason="Auditing the custody account", role="admin")
    run_until_idle()
    html = alice_client.get("/wallet").content.decode()
    assert "Minting is paused: deposits are disabled, redemptions still work" in html
    assert "Auditing the custody account" in html
    assert "Paused by" in html and ">root<" in html
    deposit_form = html[html.index('data-swap="deposit"'):html.index('data-swap="redeem"')]
    redeem_form = html[html.index('data-swap="redeem"'):]
    assert '<fieldset class="swap-body" disabled>' in deposit_form
    assert '<fieldset class="swap-body" disabled>' not in redeem_form[:redeem_form.index("</form>")]
    response = alice_client.post("/wallet/deposit", {"deposit-amount": "10", "deposit-mode": "deposit"})
    assert response.status_code == 200 and "Minting is paused" in response.content.decode()
    response = alice_client.post("/wallet/redeem", {"redeem-amount": "10", "redeem-mode": "deposit"})
    assert response.status_code == 302
    run_until_idle()
    assert balance(address, "tim3") == 40 * UNIT
    home = alice_client.get("/").content.decode()
    assert "Mint paused" in home and "Auditing the custody account" in home


# --- flows and the explorer -------------------------------------------------------------

def test_flow_page_partial_and_missing(funded, alice_client):
    flow = Flow.objects.get(kind="faucet")
    full = Client().get(f"/flows/{flow.id}")
    assert full.status_code == 200 and b"Timeline" in full.content and b"<html" in full.content
    partial = Client().get(f"/flows/{flow.id}?partial=1")
    assert partial.status_code == 200 and b"<html" not in partial.content and b"Timeline" in partial.content
    assert Client().get("/flows/" + "x" * 43).status_code == 404


def test_explorer_search(funded):
    client = Client()
    assert client.get("/explorer").status_code == 200
    coordinator = active_coordinator()
    response = client.get("/explorer", {"q": "coordinator"})
    assert response.status_code == 302 and response["Location"] == f"/explorer/processes/{coordinator.id}"
    response = client.get("/explorer", {"q": coordinator.id})
    assert response["Location"] == f"/explorer/processes/{coordinator.id}"
    flow = Flow.objects.get(kind="faucet")
    both = client.get("/explorer", {"q": flow.id})  # a flow id is also its first message's id
    assert both.status_code == 200
    assert f"/flows/{flow.id}" in both.content.decode() and f"/explorer/messages/{flow.id}" in both.content.decode()
    child = Message.objects.filter(pushed_for=flow.id).exclude(msg_id=flow.id).first()
    assert client.get("/explorer", {"q": child.msg_id})["Location"] == f"/explorer/messages/{child.msg_id}"
    address = wallet_of(funded)
    assert client.get("/explorer", {"q": address})["Location"] == f"/explorer/addresses/{address}"
    assert client.get("/explorer", {"q": "alice"})["Location"] == f"/explorer/addresses/{address}"
    missing = client.get("/explorer", {"q": "no-such-thing"})
    assert missing.status_code == 200 and b"Nothing found" in missing.content


def test_message_page(funded):
    flow = Flow.objects.get(kind="faucet")
    root = Message.objects.get(msg_id=flow.id)
    html = Client().get(f"/explorer/messages/{root.msg_id}").content.decode()
    for text in ("From", "To", "Pushed-For", "Slot", "Tags", "Data", "Result", "Resulting messages", "Same flow",
                 "Mint-Response", "Quantity"):
        assert text in html
    assert Client().get("/explorer/messages/nope").status_code == 404


@pytest.mark.parametrize("name, text", [
    ("usda", "Total supply"), ("tim3", "Total supply"), ("coordinator", "Limits and pause"),
    ("lock-manager", "Total locked"), ("state-manager", "Largest positions"),
])
def test_process_pages(funded, name, text):
    client = Client()
    html = client.get(f"/explorer/processes/{name}").content.decode()
    assert text in html and "Incoming" in html and "Outgoing" in html
    process = Process.objects.get(name=name)
    response = client.get(f"/explorer/processes/{process.id}", {"dir": "out", "status": "applied", "page": "9"})
    assert response.status_code == 200


def test_process_message_filters_and_pagination(funded):
    for _ in range(30):
        request_faucet(wallet=wallet_of(funded), quantity=str(UNIT))
    run_until_idle()
    client = Client()
    html = client.get("/explorer/processes/usda", {"action": "Mint"}).content.decode()
    assert "Page 1 of 2" in html and "Older →" in html
    html = client.get("/explorer/processes/usda", {"action": "Mint", "page": "2"}).content.decode()
    assert "Page 2 of 2" in html
    html = client.get("/explorer/processes/usda", {"status": "failed"}).content.decode()
    assert "No messages match." in html
    assert client.get("/explorer/processes/nope").status_code == 404


def test_address_page(funded, alice_client):
    address = wallet_of(funded)
    html = alice_client.get(f"/explorer/addresses/{address}").content.decode()
    assert "alice" in html and "Wallet · yours" in html and "1,000" in html
    assert Client().get("/explorer/addresses/" + "q" * 43).status_code == 404


# --- operations -------------------------------------------------------------------------

def test_ops_access(system):
    assert Client().get("/ops")["Location"].startswith("/login?next=/ops")
    _, user = make_user("carol")
    assert user.get("/ops").status_code == 403
    assert user.post("/ops/pause", {"scope": "mint", "reason": "x"}).status_code == 403
    _, staff = make_user("sam", staff=True)
    page = staff.get("/ops")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Pausing needs the guardian permission" in html and "Only an admin may resume." in html
    assert staff.post("/ops/pause", {"scope": "mint", "reason": "x"}).status_code == 403
    assert staff.post("/ops/limits", {"MinAmount": "2"}).status_code == 403
    assert staff.post("/ops/coordinators/spawn").status_code == 403


def test_guardian_pauses_but_cannot_resume(system):
    _, guardian = make_user("gina", staff=True, perms=["pause_system"])
    html = guardian.get("/ops").content.decode()
    assert "Pause now" in html and csrf_in(guardian.get("/ops"))
    missing = guardian.post("/ops/pause", {"scope": "mint", "reason": "  "})
    assert missing.status_code == 200 and "This field is required." in missing.content.decode()
    response = guardian.post("/ops/pause", {"scope": "mint", "reason": "Oracle outage"})
    assert response.status_code == 302
    run_until_idle()
    state = CoordinatorState.objects.get(process=active_coordinator())
    assert state.paused_mint and not state.paused_redeem and state.pause_reason == "Oracle outage"
    assert guardian.post("/ops/resume", {"scope": "all"}).status_code == 403
    entry = AuditEntry.objects.get(action="pause")
    assert entry.actor.username == "gina" and entry.detail["reason"] == "Oracle outage"


def test_admin_pause_resume_limits_versions_and_audit(system):
    _, admin = make_user("root", superuser=True)
    assert admin.post("/ops/pause", {"scope": "all", "reason": "Drill"}).status_code == 302
    run_until_idle()
    assert admin.post("/ops/resume", {"scope": "all"}).status_code == 302
    run_until_idle()
    state = CoordinatorState.objects.get(process=active_coordinator())
    assert not state.paused_mint and not state.paused_redeem

    page = admin.get("/ops").content.decode()
    assert 'name="MaxAmount"' in page and 'value="100000"' in page
    form = {"MinAmount": "2", "MaxAmount": "5000", "UserDailyLimit": "50000", "SystemHourlyLimit": "10000",
            "LargeOperationThreshold": "1000", "CooldownSeconds": "300", "RateLimitPerMinute": "60",
            "PendingTimeout": "300"}
    assert admin.post("/ops/limits", form).status_code == 302
    run_until_idle()
    state.refresh_from_db()
    assert state.min_amount == 2 * UNIT and state.max_amount == 5000 * UNIT
    bad = admin.post("/ops/limits", {**form, "MinAmount": "9000"})
    assert bad.status_code == 200 and "The minimum cannot be above the maximum." in bad.content.decode()
    bad = admin.post("/ops/limits", {**form, "CooldownSeconds": "soon"})
    assert bad.status_code == 200 and "Enter a whole number above zero." in bad.content.decode()

    assert admin.post("/ops/coordinators/spawn").status_code == 302
    v2 = Process.objects.get(kind="coordinator", version=2)
    assert not v2.active
    assert admin.post("/ops/coordinators/activate", {"process": v2.id}).status_code == 302
    assert active_coordinator() == v2
    assert admin.post("/ops/coordinators/rollback").status_code == 302
    assert active_coordinator().version == 1
    assert b"no earlier coordinator version" in admin.post("/ops/coordinators/rollback").content

    actions = set(AuditEntry.objects.values_list("action", flat=True))
    assert {"pause", "resume", "configure", "coordinator_spawn", "coordinator_activate",
            "coordinator_rollback"} <= actions
    html = admin.get("/ops").content.decode()
    assert "Audit log" in html and "coordinator_spawn" in html and "Dead-lettered messages" in html


def test_ops_lists_dead_letters(system):
    _, admin = make_user("root", superuser=True)
    msg = Message.objects.filter(status=Message.APPLIED).first()
    Message.objects.filter(pk=msg.pk).update(dead=True, status=Message.FAILED, error="database went away")
    html = admin.get("/ops").content.decode()
    assert "database went away" in html


def test_system_check_runs_and_records_its_table(system, monkeypatch):
    _, admin = make_user("root", superuser=True)

    def fake_call_command(name, stdout, stderr):
        assert name == "integration_suite"
        stdout.write("check                 result\nv2 deposit            PASS\n")

    class InlineThread:
        def __init__(self, target, args, **kwargs):
            self.target, self.args = target, args

        def start(self):
            self.target(*self.args)

    monkeypatch.setattr(views, "call_command", fake_call_command)
    monkeypatch.setattr(views.threading, "Thread", InlineThread)
    monkeypatch.setattr(views, "close_old_connections", lambda: None)
    response = admin.post("/ops/system-check")
    assert response.status_code == 302
    entry = AuditEntry.objects.get(action="system_check_result")
    assert entry.detail["passed"] and "v2 deposit" in entry.detail["output"]
    html = admin.get("/ops").content.decode()
    assert "v2 deposit            PASS" in html and "passed" in html


def test_system_check_not_available(system, monkeypatch):
    _, admin = make_user("root", superuser=True)
    monkeypatch.setattr(views, "get_commands", lambda: {})
    html = admin.get("/ops").content.decode()
    assert "Not available." in html
    assert b"is not available in this build" in admin.post("/ops/system-check").content


# --- Django admin -----------------------------------------------------------------------

def test_django_admin_is_read_only_for_engine_state(funded):
    _, admin = make_user("root", superuser=True)
    for model in ("processes/message", "processes/flow", "processes/tokenaccount", "processes/operation",
                  "processes/coordinatorstate", "tim3web/auditentry", "tim3web/account"):
        assert admin.get(f"/admin/{model}/").status_code == 200, model
        assert admin.get(f"/admin/{model}/add/").status_code == 403, model
    msg = Message.objects.first()
    page = admin.get(f"/admin/processes/message/{msg.pk}/change/")
    assert page.status_code == 200 and b'name="_save"' not in page.content
