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
    problems.extend(check_mint_windows())
    problems.extend(check_reserves())
    return problems


def check_mint_windows() -> list[str]:
    """Each coordinator's rolling-hour mint window (kept incrementally) equals the sum it stands for."""
    from processes.blueprints.state import CoordinatorState, Operation

    problems = []
    for c in CoordinatorState.objects.select_related("process"):
        actual = Operation.objects.filter(process=c.process, kind__in=Operation.MINT_KINDS, reserved=True,
                                          created_at__gt=c.hour_window_since).aggregate(s=Sum("quantity"))["s"] or 0
        if actual != c.hour_window_minted:
            problems.append(f"{c.process.name}: hourly mint window says {c.hour_window_minted}, "
                            f"its operations add up to {actual}")
    return problems


def reserves_snapshot() -> dict:
    """Proof-of-reserves figures read from the tokens themselves (not the coordinators' books)."""
    from processes.blueprints.state import CoordinatorState, Operation

    tim3 = TokenState.objects.filter(process__name="tim3").first()
    usda = TokenState.objects.filter(process__name="usda").first()
    coordinator_ids = list(Process.objects.filter(kind="coordinator").values_list("id", flat=True))
    held = locked = 0
    if usda:
        accounts = TokenAccount.objects.filter(process=usda.process)
        held = accounts.filter(account__in=coordinator_ids).aggregate(s=Sum("balance"))["s"] or 0
        locked = accounts.aggregate(s=Sum("locked"))["s"] or 0
    books = CoordinatorState.objects.aggregate(custody=Sum("custody"), collateral=Sum("collateral"),
                                               outstanding=Sum("outstanding"))
    return {
        "tim3_supply": tim3.total_supply if tim3 else 0,
        "usda_held": held,
        "usda_locked": locked,
        "usda_reserves": held + locked,
        "books": {k: v or 0 for k, v in books.items()},
        "pending_operations": Operation.objects.filter(status=Operation.PENDING).count(),
        "pending_messages": Message.objects.filter(status=Message.PENDING).count(),
    }


def check_reserves() -> list[str]:
    """SPEC §4: TIM3 supply == USDA held by the coordinators + USDA locked.

    Flows move reserves first and TIM3 second (and burn before paying out), so
    while messages are in flight TIM3 is over-backed, never under; with nothing
    in flight the two sides are equal, and equal to the coordinators' books.
    """
    r = reserves_snapshot()
    problems = []
    if r["tim3_supply"] > r["usda_reserves"]:
        problems.append(f"reserves: TIM3 supply {r['tim3_supply']} is above USDA reserves {r['usda_reserves']} "
                        f"(held {r['usda_held']} + locked {r['usda_locked']})")
    quiescent = r["pending_messages"] == 0 and r["pending_operations"] == 0
    if quiescent:
        if r["tim3_supply"] != r["usda_reserves"]:
            problems.append(f"reserves: at rest, TIM3 supply {r['tim3_supply']} != USDA reserves {r['usda_reserves']}")
        books = r["books"]
        if books["custody"] != r["usda_held"] or books["collateral"] != r["usda_locked"]:
            problems.append(f"reserves: coordinator books (custody {books['custody']}, collateral "
                            f"{books['collateral']}) differ from USDA (held {r['usda_held']}, locked {r['usda_locked']})")
        if books["outstanding"] != r["tim3_supply"]:
            problems.append(f"reserves: coordinators' outstanding TIM3 {books['outstanding']} != supply {r['tim3_supply']}")
    return problems
