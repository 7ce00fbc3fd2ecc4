"""Token quantities: integer strings in base units, canonical form only.

Values are Python ints everywhere and BigIntegerField in the database, so they
are exact on SQLite and Postgres alike; the maximum keeps every balance and
supply inside a signed 64-bit integer, where SQLite would otherwise fall back
to floats.
"""

import re

DENOMINATION = 6
UNIT = 10**DENOMINATION
MAX_QUANTITY = 10**18  # one trillion whole tokens per operation
MAX_SUPPLY = 2**63 - 1  # what a BIGINT column holds

_CANONICAL = re.compile(r"^[1-9][0-9]{0,18}$")


class QuantityError(ValueError):
    pass


def parse_quantity(value: object, *, name: str = "Quantity") -> int:
    """The int for a canonical positive quantity string, or QuantityError saying why not."""
    if value is None or value == "":
        raise QuantityError(f"{name} is required: a whole number of base units, like \"1000000\".")
    if not isinstance(value, str):
        raise QuantityError(f"{name} must be a string of digits in base units, like \"1000000\"; got {type(value).__name__}.")
    if not _CANONICAL.fullmatch(value):  # fullmatch: "$" would accept a trailing newline
        raise QuantityError(
            f"{name} must be a positive whole number of base units in canonical form "
            f"(digits only, no sign, leading zero, decimal point or exponent); got {value[:40]!r}."
        )
    quantity = int(value)
    if quantity > MAX_QUANTITY:
        raise QuantityError(f"{name} {value} is above the maximum of {MAX_QUANTITY}.")
    return quantity


def format_units(quantity: int) -> str:
    """Base units as a decimal token amount, e.g. 25500000 -> "25.5"."""
    sign = "-" if quantity < 0 else ""
    whole, frac = divmod(abs(quantity), UNIT)
    text = f"{whole:,}"
    if frac:
        text += "." + f"{frac:0{DENOMINATION}d}".rstrip("0")
    return sign + text


def parse_token_amount(text: str) -> int:
    """A human amount in whole tokens ("25.5") as base units, exactly."""
    text = (text or "").strip().replace(",", "")
    if not re.fullmatch(r"[0-9]+(\.[0-9]{1,6})?", text):
        raise QuantityError("Enter an amount like 25 or 25.5 (at most 6 decimals).")
    whole, _, frac = text.partition(".")
    quantity = int(whole) * UNIT + int((frac or "0").ljust(DENOMINATION, "0"))
    if quantity <= 0:
        raise QuantityError("Enter an amount above zero.")
    if quantity > MAX_QUANTITY:
        raise QuantityError("That amount is above the maximum for one operation.")
    return quantity
