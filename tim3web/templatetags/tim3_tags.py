"""Template helpers for the pages: token amounts, message times, address labels."""

from datetime import UTC, datetime

from django import template
from django.urls import reverse
from django.utils.html import format_html

from processes.runtime.models import Process, Wallet
from processes.runtime.quantities import format_units

register = template.Library()


@register.filter
def units(value) -> str:
    """Base units (int or integer string) as a token amount: 25500000 -> "25.5"."""
    if value in (None, ""):
        return "—"
    try:
        return format_units(int(value))
    except (TypeError, ValueError):
        return str(value)


@register.filter
def ms_datetime(value):
    """Milliseconds since the epoch as an aware datetime (for the |date filter)."""
    if value in (None, ""):
        return None
    try:
        return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
    except (TypeError, ValueError, OverflowError):
        return None


@register.filter
def short_id(value, size: int = 8) -> str:
    value = str(value or "")
    return value if len(value) <= size + 1 else f"{value[:size]}…"


@register.filter
def get_item(mapping, key):
    try:
        return mapping.get(key)
    except AttributeError:
        return None


def _names(context) -> dict[str, tuple[str, str]]:
    """id -> (label, kind) for processes, computed once per request."""
    request = context.get("request")
    cache = getattr(request, "_tim3_names", None) if request is not None else None
    if cache is None:
        cache = {p.id: (p.name, "process") for p in Process.objects.only("id", "name")}
        if request is not None:
            request._tim3_names = cache
    return cache


def address_label(context, address: str) -> tuple[str, str]:
    """(label, kind) for an address: a process name, "you", a username or a short id."""
    if not address:
        return "—", "none"
    names = _names(context)
    if address in names:
        return names[address]
    if context.get("my_address") and address == context["my_address"]:
        return "you", "you"
    wallet = Wallet.objects.filter(address=address).only("label").first()
    label = wallet.label if wallet else ""
    names[address] = (label.removeprefix("user:") if label else short_id(address), "wallet")
    return names[address]


@register.simple_tag(takes_context=True)
def addr(context, address, link=True):
    """A labelled, linked address: processes by name, wallets by user name, else a short id."""
    label, kind = address_label(context, address)
    if kind == "none":
        return "—"
    if kind == "process":
        url = reverse("explorer-process", args=[address])
    else:
        url = reverse("explorer-address", args=[address])
    if not link:
        return format_html('<span class="addr addr-{}" title="{}">{}</span>', kind, address, label)
    return format_html('<a class="addr addr-{}" href="{}" title="{}">{}</a>', kind, url, address, label)


@register.simple_tag(takes_context=True)
def addr_name(context, address) -> str:
    return address_label(context, address)[0]


@register.filter
def ms_duration(value) -> str:
    """A duration in ms, human sized: 4 ms, 1.2 s, 3 min 4 s."""
    if value in (None, ""):
        return "—"
    ms = int(value)
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    minutes, seconds = divmod(ms // 1000, 60)
    return f"{minutes} min {seconds} s"


@register.simple_tag(takes_context=True)
def query_with(context, **kwargs) -> str:
    """The current query string with some parameters replaced (for filters and pagination)."""
    params = context["request"].GET.copy()
    for key, value in kwargs.items():
        if value in (None, ""):
            params.pop(key, None)
        else:
            params[key] = value
    encoded = params.urlencode()
    return f"?{encoded}" if encoded else "?"


@register.filter
def audit_value(value) -> str:
    """An audit detail value for reading: lists joined, long ids shortened."""
    if isinstance(value, (list, tuple)):
        return ", ".join(audit_value(v) for v in value) or "—"
    if isinstance(value, dict):
        return ", ".join(f"{k} {audit_value(v)}" for k, v in value.items())
    text = str(value)
    return short_id(text, 10) if len(text) == 43 and " " not in text else text


AMOUNT_TAGS = {"Quantity", "Amount", "CollateralAmount", "TIM3", "Collateral", "Balance", "Locked"}


@register.filter
def tag_amount(value, name) -> str:
    """For a quantity tag, its value as tokens ("25.5"); else ""."""
    text = str(value or "")
    if name in AMOUNT_TAGS and text.isdigit():
        return format_units(int(text))
    return ""


@register.filter
def is_id(value) -> bool:
    text = str(value or "")
    return len(text) == 43 and all(c.isalnum() or c in "-_" for c in text)
