"""Quantities (SPEC §2): canonical integer strings, exact on every database."""

from decimal import Decimal

import pytest
from django.db.models import F, Sum
from hypothesis import given
from hypothesis import strategies as st

from processes.blueprints.state import TokenAccount, TokenState
from processes.invariants import check_invariants
from processes.runtime.delivery import spawn_process
from processes.runtime.ids import new_id
from processes.runtime.models import Message, Process
from processes.runtime.quantities import (
    MAX_QUANTITY,
    MAX_SUPPLY,
    UNIT,
    QuantityError,
    format_units,
    parse_quantity,
    parse_token_amount,
)
from processes.runtime.replay import replay_all
from tests.conftest import send

NOT_CANONICAL = "canonical form"


@pytest.mark.parametrize(("value", "message"), [
    ("0", NOT_CANONICAL),
    ("-1", NOT_CANONICAL),
    ("-5", NOT_CANONICAL),
    ("1.5", NOT_CANONICAL),
    ("1.0", NOT_CANONICAL),
    ("1e3", NOT_CANONICAL),
    ("+5", NOT_CANONICAL),
    ("05", NOT_CANONICAL),
    ("00", NOT_CANONICAL),
    (" 5", NOT_CANONICAL),
    ("5 ", NOT_CANONICAL),
    ("5\n", NOT_CANONICAL),
    ("1_000", NOT_CANONICAL),
    ("0x10", NOT_CANONICAL),
    ("\u0665", NOT_CANONICAL),  # ARABIC-INDIC DIGIT FIVE: int() would accept it
    ("１", NOT_CANONICAL),  # FULLWIDTH DIGIT ONE
    ("", "is required"),
    (None, "is required"),
    (str(2**63 + 1), "above the maximum"),
    (str(MAX_QUANTITY + 1), "above the maximum"),
    ("9" * 19, "above the maximum"),
    ("1" + "0" * 40, NOT_CANONICAL),
    (2**63 + 1, "must be a string"),
    (5, "must be a string"),
])
def test_parse_quantity_rejects_with_a_clear_message(value, message):
    with pytest.raises(QuantityError, match=message) as info:
        parse_quantity(value)
    assert str(info.value).startswith("Quantity ")  # names the field it is about


def test_parse_quantity_names_the_field():
    with pytest.raises(QuantityError, match="^Amount is required"):
        parse_quantity("", name="Amount")


@pytest.mark.parametrize(("text", "expected"), [
    ("1", 1),
    ("10", 10),
    (str(UNIT), UNIT),
    (str(MAX_QUANTITY - 1), MAX_QUANTITY - 1),
    (str(MAX_QUANTITY), MAX_QUANTITY),
])
def test_parse_quantity_accepts_canonical_values(text, expected):
    value = parse_quantity(text)
    assert value == expected
    assert type(value) is int


@given(st.integers(min_value=1, max_value=MAX_QUANTITY))
def test_every_valid_quantity_round_trips(quantity):
    assert parse_quantity(str(quantity)) == quantity
    assert parse_token_amount(format_units(quantity)) == quantity


@given(st.integers(min_value=1, max_value=MAX_QUANTITY), st.sampled_from(["", "0", "+", "-", " ", "\t"]),
       st.sampled_from(["", ".0", "e0", " ", "\n", "x"]))
def test_non_canonical_spellings_of_valid_quantities_are_rejected(quantity, prefix, suffix):
    text = prefix + str(quantity) + suffix
    if text == str(quantity):
        assert parse_quantity(text) == quantity
        return
    with pytest.raises(QuantityError):
        parse_quantity(text)


@given(st.integers(min_value=0, max_value=MAX_QUANTITY // UNIT), st.text(alphabet="0123456789", min_size=0, max_size=6))
def test_token_amounts_parse_exactly_and_format_back(whole, frac):
    text = f"{whole}.{frac}" if frac else str(whole)
    expected = int(Decimal(text) * UNIT)
    if expected == 0 or expected > MAX_QUANTITY:
        with pytest.raises(QuantityError):
            parse_token_amount(text)
        return
    quantity = parse_token_amount(text)
    assert quantity == expected
    formatted = format_units(quantity)
    assert Decimal(formatted.replace(",", "")) == Decimal(text)  # same value, canonical spelling
    assert parse_token_amount(formatted) == quantity


def test_format_units_examples():
    assert format_units(1) == "0.000001"
    assert format_units(25_500_000) == "25.5"
    assert format_units(UNIT) == "1"
    assert format_units(MAX_QUANTITY) == "1,000,000,000,000"
    assert format_units(MAX_SUPPLY) == "9,223,372,036,854.775807"
    assert format_units(-UNIT) == "-1"


@pytest.mark.parametrize("text", ["0", "0.0", "0.0000001", "1.1234567", "-1", "1e3", "abc", "", None, "1.", ".5",
                                  format_units(MAX_QUANTITY + 1)])
def test_parse_token_amount_rejects(text):
    with pytest.raises(QuantityError):
        parse_token_amount(text)


# --- exact on the database ------------------------------------------------------

NEAR_MAX = [MAX_SUPPLY, MAX_SUPPLY - 1, MAX_SUPPLY - 2, 2**53 + 1, MAX_QUANTITY, 9 * MAX_QUANTITY + 123_456_789]


@pytest.mark.django_db
def test_values_near_the_maximum_survive_the_database_exactly():
    process = Process.objects.create(id=new_id(), name="bigint-check", kind="token", owner=new_id())
    rows = {value: TokenAccount.objects.create(process=process, account=new_id(), balance=value) for value in NEAR_MAX}
    for value, row in rows.items():
        stored = TokenAccount.objects.get(pk=row.pk).balance
        assert stored == value and type(stored) is int
        # An exact lookup tells neighbours apart (as floats, 2**63-1 and 2**63-2 would be equal).
        assert list(TokenAccount.objects.filter(process=process, balance=value).values_list("pk", flat=True)) == [row.pk]
        assert int(TokenAccount.objects.filter(pk=row.pk).aggregate(s=Sum("balance"))["s"]) == value

    row = rows[MAX_SUPPLY - 2]
    TokenAccount.objects.filter(pk=row.pk).update(balance=F("balance") + 1)
    assert TokenAccount.objects.get(pk=row.pk).balance == MAX_SUPPLY - 1
    TokenAccount.objects.filter(pk=row.pk).update(balance=F("balance") - (MAX_SUPPLY - 2))
    assert TokenAccount.objects.get(pk=row.pk).balance == 1


def test_minting_up_to_the_maximum_supply_is_exact_and_beyond_it_is_refused(system, operator, wallet):
    big = spawn_process(name="bigtoken", kind="token", owner=operator,
                        tags={"Token-Name": "Big", "Ticker": "BIG", "Mint-Policy": "owner"})
    alice, bob = wallet(), wallet()
    for _ in range(9):
        msg = send(operator, big, {"Action": "Mint", "Recipient": alice, "Quantity": str(MAX_QUANTITY)})
        assert msg.status == Message.APPLIED, msg.error
    token = TokenState.objects.get(process=big)
    assert token.total_supply == 9 * MAX_QUANTITY
    assert TokenAccount.objects.get(process=big, account=alice).balance == 9 * MAX_QUANTITY

    # 9e18 + 1e18 > 2**63 - 1: refused, nothing changes.
    refused = send(operator, big, {"Action": "Mint", "Recipient": alice, "Quantity": str(MAX_QUANTITY)})
    assert refused.status == Message.FAILED
    assert "above its maximum" in refused.error
    # The largest supply a BIGINT holds is reachable exactly.
    top = MAX_SUPPLY - 9 * MAX_QUANTITY
    assert send(operator, big, {"Action": "Mint", "Recipient": bob, "Quantity": str(top)}).status == Message.APPLIED
    assert send(operator, big, {"Action": "Mint", "Recipient": bob, "Quantity": "1"}).status == Message.FAILED

    moved = MAX_QUANTITY - 1
    assert send(alice, big, {"Action": "Transfer", "Recipient": bob, "Quantity": str(moved)}).status == Message.APPLIED
    assert TokenState.objects.get(process=big).total_supply == MAX_SUPPLY
    assert TokenAccount.objects.get(process=big, account=alice).balance == 9 * MAX_QUANTITY - moved
    assert TokenAccount.objects.get(process=big, account=bob).balance == top + moved

    answer = send(bob, big, {"Action": "Balance"})
    (reply,) = Message.objects.filter(parent_id=answer.msg_id)
    assert reply.get("Balance") == str(top + moved) == reply.data
    assert check_invariants() == []
    assert replay_all().differences == []
