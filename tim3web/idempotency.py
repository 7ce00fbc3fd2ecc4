"""`Idempotency-Key` for the POST endpoints that move funds (CONTRACT).

- Same user, same key, same request (method, path and normalized body): the
  first answer is replayed with its status (header `Idempotent-Replayed:
  true`), and nothing is sent again.
- Same user, same key, a different request: 422 `idempotency_key_reused`.
- Keys are per user: another user's identical key is unrelated.
- The record is inserted at the start of the same transaction as the action
  and filled with the answer before it commits, so a key is never stored
  without its effect nor the effect without its key. Two concurrent requests
  with one key: the unique (user, key) constraint makes the second insert wait
  for the first transaction and fail; the loser rolls back (nothing moved) and
  replays the winner's answer.
- Requests refused with an error (4xx) are not recorded: nothing moved, so
  the key stays free for a corrected retry.
"""

import hashlib
import json
import re
from collections.abc import Callable

from django.db import IntegrityError, transaction

from tim3web.errors import ApiError
from tim3web.models import IdempotencyRecord

HEADER = "Idempotency-Key"
_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,198}[\x21-\x7e])?")  # printable ASCII, 1-200 chars


def request_key(request) -> str | None:
    """The request's Idempotency-Key, None if absent, ApiError 400 if malformed."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    key = key.strip()
    if not _KEY.fullmatch(key):
        raise ApiError(400, "invalid_idempotency_key",
                       f"The {HEADER} header must be 1 to 200 printable ASCII characters.")
    return key


def fingerprint(request, body: dict) -> str:
    """What "the same request" means: method, path and the normalized body."""
    canonical = json.dumps({"method": request.method, "path": request.path, "body": body},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _find(user, key: str) -> IdempotencyRecord | None:
    return IdempotencyRecord.objects.filter(user=user, key=key).first()


def _replay(record: IdempotencyRecord, digest: str) -> tuple[int, dict, bool]:
    if record.body_hash != digest:
        raise ApiError(422, "idempotency_key_reused",
                       f"This {HEADER} was already used for a different request; use a new key.")
    if not record.status_code:  # only visible if a transaction leaked a half-written record
        raise ApiError(409, "idempotency_in_progress", f"A request with this {HEADER} is still being processed.")
    return record.status_code, record.response, True


def run(request, *, user, body: dict, action: Callable[[], tuple[int, dict]]) -> tuple[int, dict, bool]:
    """Run `action` (returning status and JSON body) at most once per (user, key).

    Returns (status, body, replayed). Without a key, the action just runs in a transaction.
    """
    key = request_key(request)
    if key is None:
        with transaction.atomic():
            status, answer = action()
        return status, answer, False
    digest = fingerprint(request, body)
    record = _find(user, key)
    if record is not None:
        return _replay(record, digest)
    try:
        with transaction.atomic():
            # First, so a concurrent twin blocks here (on the unique index) before doing anything.
            record = IdempotencyRecord.objects.create(
                user=user, key=key, method=request.method, path=request.path[:200], body_hash=digest,
                status_code=0, response={})
            status, answer = action()
            record.status_code, record.response = status, answer
            record.save(update_fields=["status_code", "response"])
    except IntegrityError:
        record = _find(user, key)
        if record is None:  # some other constraint: not ours to explain
            raise
        return _replay(record, digest)
    return status, answer, False
