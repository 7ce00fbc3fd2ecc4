"""The invariants of SPEC §4, checked against live state (`manage.py verify`)."""

from django.db.models import Count, Max, Sum

from processes.blueprints.state import TokenAccount, TokenState
from processes.runtime.models import Message, Process


def check_invariants() -> list[str]:
    """Every broken invariant as a sentence naming what is wrong; empty when all hold."""
    problems: list[str] = []
    for token in TokenState.objects.select_related("process"):
        name = token.process.name
        totals = TokenAccount.objects.filter(process=token.process).aggregate(s=Sum("balance"))
        held = totals["s"] or 0
        if held != token.total_supply:
            problems.append(f"{name}: total supply {token.total_supply} != sum of balances {held}")
        for row in TokenAccount.objects.filter(process=token.process, balance__lt=0):
            problems.append(f"{name}: balance of {row.account} is negative ({row.balance})")
        for row in TokenAccount.objects.filter(process=token.process, locked__lt=0):
            problems.append(f"{name}: locked of {row.account} is negative ({row.locked})")
    for process in Process.objects.all():
        stats = Message.objects.filter(target=process.id, slot__isnull=False).aggregate(n=Count("seq"), top=Max("slot"))
        count, top = stats["n"], stats["top"] or 0
        if count != top or top != process.next_slot - 1:
            problems.append(
                f"{process.name}: slots are not gap-free ({count} slotted messages, highest slot {top}, "
                f"next slot {process.next_slot})"
            )
    problems.extend(check_reserves())
    return problems


def check_reserves() -> list[str]:
    """Proof of reserves; filled in by the coordinator blueprint (SPEC §4)."""
    return []
