"""AO-style 43-character ids: base64url of 32 bytes, no padding."""

import base64
import hashlib
import re
import secrets
import time

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{43}$")


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def new_id() -> str:
    """A fresh random id, for messages that start a cascade and for wallets."""
    return _encode(secrets.token_bytes(32))


def derive_id(*parts: str | int) -> str:
    """A deterministic id: the same parts always give the same id (replay relies on it)."""
    return _encode(hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest())


def is_id(value: str) -> bool:
    return bool(ID_PATTERN.fullmatch(value or ""))  # fullmatch: "$" would accept a trailing newline


def now_ms() -> int:
    return int(time.time() * 1000)
