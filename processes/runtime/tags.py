"""Tag lists: ordered [name, value] string pairs, validated on the way in."""

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

MAX_TAGS = 64
MAX_TAG_VALUE = 4096
MAX_DATA = 64 * 1024
MAX_ACTION = 48  # the column holds 64, and the runtime may answer "<Action>-Error"
_TAG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Message fields that are columns, never tags: a sender must not forge them.
RESERVED_TAGS = frozenset(
    {"Id", "From", "Target", "Owner", "Slot", "Nonce", "Timestamp", "Reference", "X-Reference",
     "Pushed-For", "Data", "Anchor", "Signature", "Hash-Chain", "From-Process", "From-Module"}
)


class TagError(ValueError):
    pass


def normalize_tags(tags: Mapping[str, Any] | Iterable[Iterable[Any]] | None) -> list[list[str]]:
    """[[name, value], ...] with values as strings; None values dropped."""
    if tags is None:
        return []
    pairs = tags.items() if isinstance(tags, Mapping) else tags
    result = []
    for pair in pairs:
        name, value = pair
        if value is None:
            continue
        result.append([str(name), value if isinstance(value, str) else str(value)])
    return result


def validate_tags(tags: list[list[str]], *, allow_reserved: bool = False) -> None:
    """Raise TagError with a clear sentence for a tag list a sender may not send."""
    if len(tags) > MAX_TAGS:
        raise TagError(f"Too many tags: {len(tags)} (at most {MAX_TAGS}).")
    seen = set()
    for name, value in tags:
        if not _TAG_NAME.fullmatch(name):  # fullmatch: "$" would accept a trailing newline
            raise TagError(f"Tag name {name[:70]!r} is not allowed: use letters, digits, '-', '_', '.', ':' (max 64).")
        if name in seen:
            raise TagError(f"Tag {name!r} appears more than once.")
        seen.add(name)
        if not allow_reserved and name in RESERVED_TAGS:
            raise TagError(f"Tag {name!r} is set by the system and cannot be sent.")
        if name == "Action" and len(value) > MAX_ACTION:
            raise TagError(f"Action is longer than {MAX_ACTION} characters.")
        if len(value) > MAX_TAG_VALUE:
            raise TagError(f"Tag {name!r} is longer than {MAX_TAG_VALUE} characters.")
        if _CONTROL.search(value):
            raise TagError(f"Tag {name!r} contains control characters.")


def encode_data(data: Any) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def validate_data(data: str) -> None:
    if len(data) > MAX_DATA:
        raise TagError(f"Data is larger than {MAX_DATA} characters.")
    if "\x00" in data:
        raise TagError("Data contains a NUL character.")
