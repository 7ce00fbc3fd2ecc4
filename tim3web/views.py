"""The pages: dashboard and live diagram, wallet, explorer, flow timelines, operations.

Views read state and call `processes.actions` / `processes.services`; they never
change process state themselves (only messages do). Every admin action is
written to the audit log.
"""

import io
import logging
import threading
import time
from functools import wraps

from django.conf import settings
from django.contrib import messages as flash
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.management import call_command, get_commands
from django.core.paginator import Paginator
from django.db import close_old_connections
from django.db.models import Q, Sum
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from processes.actions import (
    ActionError,
    configure_coordinator,
    pause_state,
    request_deposit,
    request_faucet,
    request_pause,
    request_redemption,
    request_resume,
    system_health,
)
from processes.blueprints.coordinator import LIMIT_FIELDS
from processes.blueprints.state import (
    CollateralLock,
    CoordinatorPosition,
    CoordinatorRole,
    CoordinatorState,
    LockManagerState,
    Operation,
    Position,
    StateManagerState,
    TokenAccount,
    TokenState,
)
from processes.flows import Flow
from processes.runtime.ids import is_id, now_ms
from processes.runtime.models import Message, Process, Wallet
from processes.runtime.quantities import DENOMINATION, format_units
from processes.services import activate_coordinator, active_coordinator, coordinators, rollback_coordinator, spawn_coordinator
from tim3web.accounts import SignupError, create_account, wallet_of
from tim3web.forms import LIMIT_INPUTS, AmountForm, FaucetForm, LimitsForm, PauseForm, ResumeForm, SignupForm
from tim3web.models import Account, AuditEntry

log = logging.getLogger(__name__)
HOUR_MS, DAY_MS = 3_600_000, 86_400_000

# What a user sees tick off while a flow runs: (Action of the hop, what it means).
FLOW_STEPS = {
    "deposit:deposit": [
        ("Transfer", "USDA sent to the coordinator"),
        ("Credit-Notice", "Coordinator received the USDA"),
        ("Mint", "TIM3 minted to your wallet"),
        ("UpdatePosition", "Position recorded"),
        ("Deposit-Complete", "Deposit complete"),
    ],
    "deposit:lock": [
        ("MintTIM3", "Request received by the coordinator"),
        ("LockCollateral", "Lock Manager asked to lock collateral"),
        ("Lock", "USDA locked in your account"),
        ("Mint", "TIM3 minted to your wallet"),
        ("UpdatePosition", "Position recorded"),
        ("MintTIM3-Response", "Deposit complete"),
    ],
    "redeem:deposit": [
        ("RedeemTIM3", "Request received by the coordinator"),
        ("Burn", "TIM3 burned"),
        ("Transfer", "USDA paid out to you"),
        ("UpdatePosition", "Position recorded"),
        ("Redeem-Complete", "Redemption complete"),
    ],
    "redeem:lock": [
        ("BurnTIM3", "Request received by the coordinator"),
        ("Burn", "TIM3 burned"),
        ("UnlockCollateral", "Lock Manager asked to unlock"),
        ("Unlock", "USDA unlocked in your account"),
        ("UpdatePosition", "Position recorded"),
        ("BurnTIM3-Response", "Redemption complete"),
    ],
    "faucet:": [
        ("Mint", "Faucet request received by USDA"),
        ("Mint-Response", "USDA credited to your wallet"),
    ],
}
KIND_LABELS = {"deposit": "Deposit", "redeem": "Redemption", "faucet": "Faucet", "transfer": "Transfer", "other": "Request"}


def flow_steps(flow: Flow) -> list[tuple[str, str]]:
    return FLOW_STEPS.get(f"{flow.kind}:{flow.mode or ''}") or FLOW_STEPS.get(f"{flow.kind}:deposit") or []


def flow_title(flow: Flow) -> str:
    label = KIND_LABELS.get(flow.kind, flow.kind.title())
    if flow.kind in ("deposit", "redeem"):
        label += " · v1 collateral" if flow.mode == "lock" else " · v2 custody"
    return label


# --- reading state ---------------------------------------------------------------------

def process_node(process: Process) -> str:
    """Which node of the diagram a process is drawn as."""
    if process.kind == "coordinator":
        return "coordinator"
    if process.kind == "token":
        return "tim3" if process.name == "tim3" else "usda"
    if process.kind in ("lock-manager", "state-manager"):
        return process.kind
    return "user"


def wallet_figures(address: str) -> dict:
    """The wallet's balances in base units (ints)."""
    rows = {a.process.name: a for a in TokenAccount.objects.filter(account=address, process__name__in=["usda", "tim3"])
            .select_related("process")}
    usda, tim3 = rows.get("usda"), rows.get("tim3")
    v1 = CoordinatorPosition.objects.filter(user=address).aggregate(locked=Sum("locked"), committed=Sum("committed"))
    usda_balance = usda.balance if usda else 0
    usda_locked = usda.locked if usda else 0
    return {
        "address": address,
        "usda": usda_balance,
        "usda_locked": usda_locked,
        "usda_available": usda_balance - usda_locked,
        "tim3": tim3.balance if tim3 else 0,
        "v1_position": (v1["locked"] or 0) - (v1["committed"] or 0),
    }


def coordinator_limits(address: str | None = None) -> dict:
    """The active coordinator's limits and what is left of them for this wallet (base units)."""
    try:
        process = active_coordinator()
    except LookupError:
        return {}
    c = CoordinatorState.objects.filter(process=process).first()
    if c is None:
        return {}
    now = now_ms()
    minted = Operation.objects.filter(process=process, kind__in=Operation.MINT_KINDS, reserved=True)
    daily_used = minted.filter(user=address, created_at__gt=now - DAY_MS).aggregate(s=Sum("quantity"))["s"] or 0 \
        if address else 0
    hourly_used = minted.filter(created_at__gt=now - HOUR_MS).aggregate(s=Sum("quantity"))["s"] or 0
    return {
        "coordinator": process.name,
        "min_amount": c.min_amount,
        "max_amount": c.max_amount,
        "user_daily_limit": c.user_daily_limit,
        "daily_used": daily_used,
        "daily_left": max(0, c.user_daily_limit - daily_used),
        "system_hourly_limit": c.system_hourly_limit,
        "hourly_left": max(0, c.system_hourly_limit - hourly_used),
        "large_threshold": c.large_threshold,
        "cooldown_seconds": c.cooldown_ms // 1000,
        "payout_available": sum(max(0, s.custody - s.payouts_committed) for s in CoordinatorState.objects.all()),
    }


def safe_health() -> dict | None:
    try:
        return system_health()
    except Exception:  # a page must render even before bootstrap
        log.exception("system_health failed")
        return None


def js_int(value: int) -> str:
    """Base units travel to the browser as strings (exact, like the API)."""
    return str(value)


def wallet_context(request, *, bound: dict | None = None) -> dict:
    """Everything the wallet panel needs: figures, limits, pause state, the two forms, history."""
    address = wallet_of(request.user)
    figures = wallet_figures(address)
    limits = coordinator_limits(address)
    paused = pause_state()
    forms = {}
    for direction in ("deposit", "redeem"):
        data = bound.get(direction) if bound else None
        forms[direction] = AmountForm(data, direction=direction, wallet=figures, limits=limits, paused=paused)
    flows = list(Flow.objects.filter(user=address)[:20])
    return {
        "my_address": address,
        "wallet": figures,
        "limits": limits,
        "paused": paused,
        "deposit_form": forms["deposit"],
        "redeem_form": forms["redeem"],
        "faucet_form": (bound or {}).get("faucet_form") or FaucetForm(),
        "history": [{"flow": f, "title": flow_title(f)} for f in flows],
        "wallet_js": {
            "address": address,
            "denomination": DENOMINATION,
            "balances": {k: js_int(v) for k, v in figures.items() if k != "address"},
            "limits": {k: (js_int(v) if isinstance(v, int) else v) for k, v in limits.items()},
            "paused": {"mint": paused["mint"], "redeem": paused["redeem"], "reason": paused["reason"]},
            "steps": {key: [{"action": a, "label": label} for a, label in steps] for key, steps in FLOW_STEPS.items()},
            "kinds": KIND_LABELS,
        },
    }


def diagram_context(request, my_address: str | None) -> dict:
    processes = list(Process.objects.order_by("created_at"))
    recent_flows = list(Flow.objects.exclude(kind="other")[:15])
    mine = list(Flow.objects.filter(user=my_address)[:15]) if my_address else []
    return {
        "processes": processes,
        "diagram_js": {
            "processes": [{"id": p.id, "name": p.name, "kind": p.kind, "node": process_node(p), "version": p.version,
                           "active": p.active} for p in processes],
            "slots": {p.id: p.next_slot - 1 for p in processes},
            "me": my_address or "",
            "myFlows": [f.id for f in mine],
            "wallets": {w.address: w.label.removeprefix("user:") for w in
                        Wallet.objects.filter(address__in={f.user for f in mine + recent_flows})},
        },
        "replay_flows": [{"flow": f, "title": flow_title(f), "mine": f.user == my_address}
                         for f in sorted({f.id: f for f in mine + recent_flows}.values(),
                                         key=lambda f: f.created_at, reverse=True)[:20]],
    }


# --- pages -----------------------------------------------------------------------------

def home(request):
    my_address = wallet_of(request.user) if request.user.is_authenticated else None
    context = {"health": safe_health(), "paused": pause_state(), **diagram_context(request, my_address)}
    context["recent"] = list(Message.objects.exclude(status=Message.PENDING).order_by("-seq")[:12])
    if request.user.is_authenticated:
        context.update(wallet_context(request))
    return render(request, "home.html", context)


def signup(request):
    if request.user.is_authenticated:
        return redirect("wallet")
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            account = create_account(username=form.cleaned_data["username"], password=form.cleaned_data["password1"])
        except SignupError as exc:
            form.add_error("password1" if exc.code == "weak_password" else "username", str(exc))
        else:
            login(request, account.user, backend="django.contrib.auth.backends.ModelBackend")
            flash.success(request, "Welcome to TIM3. Your wallet is ready.")
            return redirect("wallet")
    # A form with errors is shown again with 200, as Django does (no console noise in the browser).
    return render(request, "auth/signup.html", {"form": form})


class LoginView(auth_views.LoginView):
    template_name = "auth/login.html"
    redirect_authenticated_user = True


@login_required
def wallet(request):
    return render(request, "wallet.html", wallet_context(request))


def _fund_request(request, direction: str):
    address = wallet_of(request.user)
    context = wallet_context(request, bound={direction: request.POST})
    form = context[f"{direction}_form"]
    if form.is_valid():
        quantity, mode = str(form.cleaned_data["amount"]), form.cleaned_data["mode"]
        try:
            if direction == "deposit":
                flow = request_deposit(wallet=address, quantity=quantity, mode=mode)
            else:
                flow = request_redemption(wallet=address, quantity=quantity, mode=mode)
        except (ActionError, LookupError) as exc:
            form.add_error(None, str(exc))
        else:
            what = "Deposit" if direction == "deposit" else "Redemption"
            flash.info(request, f"{what} of {format_units(int(quantity))} sent. Its hops appear below as they happen.")
            return redirect("flow", flow_id=flow.id)
    context["focus"] = direction
    return render(request, "wallet.html", context)


@login_required
@require_POST
def deposit(request):
    return _fund_request(request, "deposit")


@login_required
@require_POST
def redeem(request):
    return _fund_request(request, "redeem")


@login_required
@require_POST
def faucet(request):
    form = FaucetForm(request.POST)
    if form.is_valid():
        try:
            flow = request_faucet(wallet=wallet_of(request.user), quantity=str(form.cleaned_data["amount"]))
        except (ActionError, LookupError) as exc:
            form.add_error("amount", str(exc))
            if settings.TIM3_ENV != "test":  # no faucet card to show it on
                flash.error(request, str(exc))
        else:
            flash.info(request, f"Faucet request for {format_units(form.cleaned_data['amount'])} USDA sent.")
            return redirect("flow", flow_id=flow.id)
    context = wallet_context(request, bound={"faucet_form": form})
    return render(request, "wallet.html", context)


# --- flows -----------------------------------------------------------------------------

def flow_messages(flow: Flow) -> list[Message]:
    """Every message of a flow: its cascade, plus a coordinator's final word sent from a
    timeout's cascade (it names the flow's operation)."""
    found = {m.msg_id: m for m in Message.objects.filter(pushed_for=flow.id)}
    op_ids = set(Operation.objects.filter(flow_id=flow.id).values_list("op_id", flat=True))
    if op_ids:
        coordinator_ids = [p.id for p in coordinators()]
        for m in Message.objects.filter(target=flow.user, sender__in=coordinator_ids).exclude(pushed_for=flow.id):
            if m.get("Operation-Id") in op_ids:
                found[m.msg_id] = m
    return sorted(found.values(), key=lambda m: (m.applied_at is None, m.applied_at or 0, m.seq))


SIGNED_KEYS = ("change", "position")
ADDRESS_KEYS = ("account", "user")
MESSAGE_KEYS = ("operation",)  # an operation's id is the id of the message that opened it


def describe_changes(result: dict) -> list[dict]:
    """Message.result["changes"] as display rows: amounts formatted, addresses kept for linking."""
    rows = []
    for change in (result or {}).get("changes") or []:
        items = []
        for key, value in change.items():
            text, kind = str(value), "text"
            if key in SIGNED_KEYS and text.lstrip("+-").isdigit():
                sign = "−" if text.startswith("-") else "+"
                text, kind = f"{sign}{format_units(int(text.lstrip('+-')))}", "amount"
            elif key in ADDRESS_KEYS and len(text) == 43:
                kind = "address"
            elif key in MESSAGE_KEYS and len(text) == 43:
                kind = "message"
            items.append({"key": key, "value": text, "kind": kind,
                          "negative": kind == "amount" and text.startswith("−")})
        rows.append(items)
    return rows


def timeline_rows(flow_msgs: list[Message]) -> tuple[list[dict], int]:
    applied = [m.applied_at for m in flow_msgs if m.applied_at]
    start = min([m.timestamp for m in flow_msgs] + applied) if flow_msgs else 0
    end = max(applied) if applied else start
    total = max(1, end - start)
    by_id = {m.msg_id: m for m in flow_msgs}
    rows, previous = [], None
    for m in flow_msgs:
        parent = by_id.get(m.parent_id) if m.parent_id else None
        sent = parent.applied_at if parent and parent.applied_at else m.timestamp
        done = m.applied_at or sent
        rows.append({
            "m": m,
            "offset": (m.applied_at - start) if m.applied_at else None,
            "since_previous": (m.applied_at - previous) if m.applied_at and previous else None,
            "latency": (done - sent) if m.applied_at else None,
            "bar_left": round(100 * (sent - start) / total, 2),
            "bar_width": max(0.8, round(100 * (done - sent) / total, 2)),
            "changes": describe_changes(m.result),
            "error": m.error or m.get("Error") or m.get("Reason") or "",
        })
        if m.applied_at:
            previous = m.applied_at
    return rows, end - start


def flow_step_states(flow: Flow, flow_msgs: list[Message]) -> list[dict]:
    seen = list(flow_msgs)
    states = []
    for action, label in flow_steps(flow):
        hit = next((m for m in seen if m.action == action and m.status != Message.PENDING), None)
        if hit:
            seen.remove(hit)
        if hit is None:
            state = "pending" if flow.status == Flow.PENDING else "skipped"
        else:
            state = "failed" if hit.status == Message.FAILED else "done"
        states.append({"action": action, "label": label, "state": state})
    return states


def flow_detail(request, flow_id: str):
    flow = get_object_or_404(Flow, pk=flow_id)
    msgs = flow_messages(flow)
    rows, total_ms = timeline_rows(msgs)
    my_address = wallet_of(request.user) if request.user.is_authenticated else None
    context = {
        "flow": flow, "title": flow_title(flow), "rows": rows, "total_ms": total_ms, "my_address": my_address,
        "steps": flow_step_states(flow, msgs), "mine": my_address == flow.user,
        "operations": Operation.objects.filter(flow_id=flow.id).select_related("process"),
    }
    template = "flows/_timeline.html" if request.GET.get("partial") else "flows/detail.html"
    return render(request, template, context)


# --- explorer --------------------------------------------------------------------------

def explorer(request):
    q = (request.GET.get("q") or "").strip()
    results = []
    if q:
        results = search(q)
        if len(results) == 1:
            return redirect(results[0]["url"])
    my_address = wallet_of(request.user) if request.user.is_authenticated else None
    return render(request, "explorer/index.html", {
        "q": q, "results": results, "my_address": my_address,
        "processes": Process.objects.order_by("created_at"),
        "recent": Message.objects.exclude(status=Message.PENDING).order_by("-seq")[:25],
        "flows": Flow.objects.all()[:10],
    })


def search(q: str) -> list[dict]:
    """Everything a search term names: process, flow, message, wallet."""
    results = []
    for p in Process.objects.filter(Q(id=q) | Q(name__iexact=q)):
        results.append({"kind": "Process", "label": f"{p.name} (v{p.version})", "id": p.id,
                        "url": reverse("explorer-process", args=[p.id])})
    for f in Flow.objects.filter(id=q):
        results.append({"kind": "Flow", "label": f"{flow_title(f)} · {f.status}", "id": f.id,
                        "url": reverse("flow", args=[f.id])})
    for m in Message.objects.filter(msg_id=q):
        results.append({"kind": "Message", "label": m.action or "(no action)", "id": m.msg_id,
                        "url": reverse("explorer-message", args=[m.msg_id])})
    wallets = set(Wallet.objects.filter(Q(address=q) | Q(label=f"user:{q}")).values_list("address", flat=True))
    if not wallets and len(q) == 43 and (TokenAccount.objects.filter(account=q).exists()
                                         or Message.objects.filter(sender=q).exists()):
        wallets = {q}
    for address in wallets:
        if not any(r["id"] == address for r in results):
            label = (Wallet.objects.filter(address=address).values_list("label", flat=True).first() or "wallet")
            results.append({"kind": "Wallet", "label": label.removeprefix("user:"), "id": address,
                            "url": reverse("explorer-address", args=[address])})
    return results


def message_detail(request, msg_id: str):
    m = get_object_or_404(Message, msg_id=msg_id)
    flow = Flow.objects.filter(pk=m.pushed_for).first()
    related = Message.objects.filter(pushed_for=m.pushed_for).order_by("seq")[:200]
    my_address = wallet_of(request.user) if request.user.is_authenticated else None
    return render(request, "explorer/message.html", {
        "m": m, "flow": flow, "flow_title": flow_title(flow) if flow else "", "related": related,
        "children": m.children.order_by("seq"), "changes": describe_changes(m.result),
        "result_messages": (m.result or {}).get("messages") or [], "my_address": my_address,
        "tags": m.tags, "is_process_target": Process.objects.filter(pk=m.target).exists(),
    })


PAGE_SIZE = 25


def message_table(request, qs):
    """Filter a message queryset by the request's action and status, and paginate it."""
    action, status = request.GET.get("action") or "", request.GET.get("status") or ""
    actions = sorted(set(qs.order_by().values_list("action", flat=True).distinct()[:200]))
    if action:
        qs = qs.filter(action=action)
    if status in (Message.PENDING, Message.APPLIED, Message.FAILED):
        qs = qs.filter(status=status)
    elif status == "dead":
        qs = qs.filter(dead=True)
    page = Paginator(qs.order_by("-seq"), PAGE_SIZE).get_page(request.GET.get("page"))
    return {"page": page, "actions": actions, "action": action, "status": status}


def process_detail(request, process_id: str):
    process = Process.objects.filter(Q(id=process_id) | Q(name=process_id)).first()
    if process is None:
        raise Http404("No such process.")
    direction = request.GET.get("dir") if request.GET.get("dir") in ("in", "out") else "in"
    qs = Message.objects.filter(target=process.id) if direction == "in" else Message.objects.filter(sender=process.id)
    context = {"process": process, "dir": direction, "node": process_node(process), **message_table(request, qs),
               "holdings": wallet_figures(process.id),
               "counts": {"in": Message.objects.filter(target=process.id).count(),
                          "out": Message.objects.filter(sender=process.id).count()},
               "my_address": wallet_of(request.user) if request.user.is_authenticated else None}
    token = TokenState.objects.filter(process=process).first()
    if token:
        holders = TokenAccount.objects.filter(process=process, balance__gt=0).order_by("-balance", "account")
        context.update(token=token, holders=Paginator(holders, 10).get_page(request.GET.get("hpage")),
                       holders_count=holders.count())
    coordinator = CoordinatorState.objects.filter(process=process).first()
    if coordinator:
        context.update(coordinator=coordinator, limits=limit_values(coordinator),
                       roles=CoordinatorRole.objects.filter(process=process).order_by("role", "address"),
                       pending_ops=Operation.objects.filter(process=process, status=Operation.PENDING)[:20],
                       ops_count=Operation.objects.filter(process=process).count())
    lock_manager = LockManagerState.objects.filter(process=process).first()
    if lock_manager:
        context.update(lock_manager=lock_manager,
                       locks=CollateralLock.objects.filter(process=process, locked__gt=0).order_by("-locked")[:20])
    state_manager = StateManagerState.objects.filter(process=process).first()
    if state_manager:
        context.update(state_manager=state_manager,
                       positions=Position.objects.filter(process=process).order_by("-tim3")[:20],
                       positions_count=Position.objects.filter(process=process).count())
    return render(request, "explorer/process.html", context)


def address_detail(request, address: str):
    wallet = Wallet.objects.filter(address=address).first()
    if wallet is None and not Message.objects.filter(Q(sender=address) | Q(target=address)).exists():
        raise Http404("No such wallet.")
    if Process.objects.filter(pk=address).exists():
        return redirect("explorer-process", process_id=address)
    direction = request.GET.get("dir") if request.GET.get("dir") in ("in", "out") else "out"
    qs = Message.objects.filter(sender=address) if direction == "out" else Message.objects.filter(target=address)
    my_address = wallet_of(request.user) if request.user.is_authenticated else None
    account = Account.objects.filter(address=address).select_related("user").first()
    return render(request, "explorer/address.html", {
        "address": address, "wallet": wallet, "figures": wallet_figures(address), "dir": direction,
        "username": account.user.get_username() if account else "",
        "label": wallet.label if wallet else "", "my_address": my_address,
        "flows": Flow.objects.filter(user=address)[:20], **message_table(request, qs),
        "counts": {"in": Message.objects.filter(target=address).count(),
                   "out": Message.objects.filter(sender=address).count()},
    })


# --- operations ------------------------------------------------------------------------

def forbidden(request, reason: str):
    """The 403 page with the reason (a response, not an exception: no traceback in the log)."""
    return render(request, "403.html", {"exception": reason}, status=403)


def staff_required(view):
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return redirect(f"{reverse('login')}?next={request.path}")
        if not request.user.is_staff:
            return forbidden(request, "The operations page is for staff.")
        return view(request, *args, **kwargs)
    return wrapper


def can_pause(user) -> bool:
    return user.is_superuser or user.has_perm("processes.pause_system")


def audit(request, action: str, **detail) -> AuditEntry:
    return AuditEntry.objects.create(actor=request.user, action=action, detail=detail)


def limit_values(c: CoordinatorState) -> dict[str, int]:
    """ConfigType -> the value `Configure` takes (base units, seconds, per minute)."""
    return {name: getattr(c, field) // scale for name, (field, scale) in LIMIT_FIELDS.items()}


def limit_rows(values: dict[str, int]) -> list[dict]:
    rows = []
    for name, (label, unit) in LIMIT_INPUTS.items():
        value = values[name]
        shown = f"{format_units(value)} TIM3" if unit == "TIM3" else f"{value} {unit}"
        rows.append({"name": name, "label": label, "value": shown})
    return rows


SYSTEM_CHECK = {"running": False}
_check_lock = threading.Lock()


def integration_suite_available() -> bool:
    return "integration_suite" in get_commands()


def run_system_check(actor_id: int | None) -> None:
    """`manage.py integration_suite`, its table captured into the audit log (runs in a thread)."""
    out = io.StringIO()
    passed = False
    try:
        call_command("integration_suite", stdout=out, stderr=out)
        passed = True
    except SystemExit as exc:
        passed = exc.code in (0, None)
    except Exception as exc:  # the table says what failed; the operator needs the rest too
        out.write(f"\nThe system check could not run: {exc}\n")
    finally:
        try:
            AuditEntry.objects.create(actor_id=actor_id, action="system_check_result",
                                      detail={"passed": passed, "output": out.getvalue()[-20000:]})
        finally:
            SYSTEM_CHECK["running"] = False
            close_old_connections()


def ops_context(request, **forms) -> dict:
    try:
        active = active_coordinator()
    except LookupError:
        active = None
    state = CoordinatorState.objects.filter(process=active).first() if active else None
    values = limit_values(state) if state else {}
    now = now_ms()
    stuck = Operation.objects.filter(Q(step__startswith="stuck") | Q(status=Operation.PENDING, updated_at__lt=now - 60_000)) \
        .select_related("process").order_by("updated_at")[:50]
    last_check = AuditEntry.objects.filter(action="system_check_result").first()
    versions = []
    for p in coordinators():
        c = CoordinatorState.objects.filter(process=p).first()
        versions.append({"p": p, "c": c})
    audit_page = Paginator(AuditEntry.objects.select_related("actor"), 20).get_page(request.GET.get("apage"))
    return {
        "paused": pause_state(),
        "health": safe_health(),
        "pause_form": forms.get("pause_form") or PauseForm(),
        "resume_form": forms.get("resume_form") or ResumeForm(),
        "limits_form": forms.get("limits_form") or (LimitsForm(current=values) if values else None),
        "limit_rows": limit_rows(values) if values else [],
        "active": active, "versions": versions,
        "dead": Message.objects.filter(dead=True).order_by("-seq")[:50],
        "dead_count": Message.objects.filter(dead=True).count(),
        "stuck": stuck,
        "suite_available": integration_suite_available(),
        "check_running": SYSTEM_CHECK["running"],
        "last_check": last_check,
        "audit_page": audit_page,
        "can_pause": can_pause(request.user),
        "can_resume": request.user.is_superuser,
        "is_admin": request.user.is_superuser,
        "my_address": wallet_of(request.user),
    }


@staff_required
def ops(request):
    return render(request, "ops.html", ops_context(request))


def settle(flows, timeout: float = 3.0) -> bool:
    """Wait (briefly) until these flows end, so the page we redirect to shows their effect.
    With no doorbell (tests driving delivery by hand) nothing would deliver them: don't wait."""
    if settings.TIM3_DOORBELL == "none":
        return False
    ids = [f.id for f in flows]
    deadline = time.monotonic() + timeout
    while Flow.objects.filter(id__in=ids, status=Flow.PENDING).exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def ops_error(request, message: str, **forms):
    flash.error(request, message)
    return render(request, "ops.html", ops_context(request, **forms))


@staff_required
@require_POST
def ops_pause(request):
    if not can_pause(request.user):
        return forbidden(request, "Pausing needs the guardian permission or an admin.")
    form = PauseForm(request.POST)
    if not form.is_valid():
        return ops_error(request, "The pause was not sent: see the form.", pause_form=form)
    scope, reason = form.cleaned_data["scope"], form.cleaned_data["reason"]
    try:
        flows = request_pause(wallet=wallet_of(request.user), scope=scope, reason=reason,
                              role="admin" if request.user.is_superuser else "guardian")
    except ActionError as exc:
        form.add_error(None, str(exc))
        return ops_error(request, str(exc), pause_form=form)
    audit(request, "pause", scope=scope, reason=reason, flows=[f.id for f in flows])
    done = settle(flows)
    flash.warning(request, f"Pause ({scope}) sent to {len(flows)} coordinator(s)"
                  + (" and applied. Users see the reason now." if done else "; it applies in a moment."))
    return redirect("ops")


@staff_required
@require_POST
def ops_resume(request):
    if not request.user.is_superuser:
        return forbidden(request, "Only an admin may resume.")
    form = ResumeForm(request.POST)
    if not form.is_valid():
        return ops_error(request, "Choose what to resume.", resume_form=form)
    scope = form.cleaned_data["scope"]
    try:
        flows = request_resume(wallet=wallet_of(request.user), scope=scope)
    except ActionError as exc:
        return ops_error(request, str(exc), resume_form=form)
    audit(request, "resume", scope=scope, flows=[f.id for f in flows])
    done = settle(flows)
    flash.success(request, f"Resume ({scope}) sent to {len(flows)} coordinator(s)"
                  + (" and applied." if done else "; it applies in a moment."))
    return redirect("ops")


@staff_required
@require_POST
def ops_limits(request):
    if not request.user.is_superuser:
        return forbidden(request, "Only an admin may change limits.")
    try:
        state = CoordinatorState.objects.get(process=active_coordinator())
    except (LookupError, CoordinatorState.DoesNotExist):
        return ops_error(request, "There is no active coordinator to configure.")
    form = LimitsForm(request.POST, current=limit_values(state))
    if not form.is_valid():
        return ops_error(request, "No limit was changed: see the form.", limits_form=form)
    changes = form.changes()
    if not changes:
        flash.info(request, "Nothing changed.")
        return redirect("ops")
    # Raise the maximum before the minimum (and the other way round) so no step is refused.
    first = "MaxAmount" if int(changes.get("MaxAmount", state.max_amount)) >= state.min_amount else "MinAmount"
    order = sorted(changes, key=lambda name: name != first)
    sent = []
    for name in order:
        for msg in configure_coordinator(config_type=name, value=changes[name]):
            sent.append(msg.msg_id)
    audit(request, "configure", changes=changes, messages=sent)
    flash.success(request, f"Sent {len(changes)} change(s) to every coordinator: {', '.join(changes)}.")
    return redirect("ops")


@staff_required
@require_POST
def ops_coordinator(request, verb: str):
    if not request.user.is_superuser:
        return forbidden(request, "Only an admin may change coordinator versions.")
    try:
        if verb == "spawn":
            p = spawn_coordinator()
            message = f"Spawned {p.name} (v{p.version}); activate it when ready."
        elif verb == "activate":
            process_id = request.POST.get("process", "")  # not a query with a NUL in it (Postgres: a 500)
            p = activate_coordinator(process=get_object_or_404(Process, pk=process_id if is_id(process_id) else None))
            message = f"{p.name} (v{p.version}) is now the active coordinator."
        elif verb == "rollback":
            p = rollback_coordinator()
            message = f"Rolled back: {p.name} (v{p.version}) is active again."
        else:
            raise Http404("Unknown coordinator action.")
    except (LookupError, ValueError) as exc:
        return ops_error(request, str(exc))
    audit(request, f"coordinator_{verb}", process=p.id, name=p.name, version=p.version)
    flash.success(request, message)
    return redirect("ops")


@staff_required
@require_POST
def ops_system_check(request):
    if not request.user.is_superuser:  # the check pauses and resumes minting on the live system
        return forbidden(request, "Only an admin may run the system check: it pauses and resumes minting.")
    if not integration_suite_available():
        return ops_error(request, "The system check (manage.py integration_suite) is not available in this build.")
    with _check_lock:
        if SYSTEM_CHECK["running"]:
            flash.info(request, "A system check is already running.")
            return redirect(f"{reverse('ops')}#system-check")
        SYSTEM_CHECK["running"] = True
    audit(request, "system_check", command="manage.py integration_suite")
    threading.Thread(target=run_system_check, args=(request.user.pk,), daemon=True, name="system-check").start()
    flash.info(request, "System check started. It takes a few seconds; this page shows its table when done.")
    return redirect(f"{reverse('ops')}#system-check")
