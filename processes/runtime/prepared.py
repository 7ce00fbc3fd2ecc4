"""Postgres prepared statements for the fixed SQL of sql.py (TIM3_PG_PREPARE, on by default).

Why: Postgres parses and plans every statement it is sent. For the ~50 fixed
statements a drain and a web request send (sql.py builds each text once),
each connection now runs `PREPARE tim3_N AS ...` once and from then on
`EXECUTE tim3_N(values)`: the plan is made once per connection, not per
statement (a primary-key read here: 0.11 -> 0.08 ms).

Values still go inline, as Django's client-side binding writes them, and each
parameter's type comes from the statement (the column it is compared with or
assigned to), never from the Python value: a bigint stays a bigint whatever
the value, and a value out of range is an error, as before. (Server-side
binding types parameters by value; it once stored a 32-bit wrapped supply and
stays off.)

It is an execute wrapper on each Postgres connection (`install`), so callers
keep writing `cursor.execute(text, params)` with the text sql.py built; the
wrapper swaps in the EXECUTE. A statement is prepared the first time it runs
outside a pipeline (in a pipeline nothing can wait for the answer, so it runs
as text that once and is prepared at the next `sql.pipeline()`). Preparing
runs in a savepoint inside a transaction, so a statement Postgres refuses to
prepare costs nothing but its own speed-up: it is logged and left as text.

Prepared statements live in the server session, not in a transaction (a
rollback keeps them), so what is prepared is remembered on the psycopg
connection object itself: a new connection starts afresh. Behind a pooler in
transaction mode (PgBouncer) set TIM3_PG_PREPARE=0: there the session is not
the client's.

Restart workers and Daphnes after a migration of the engine's tables (a
deploy does): a session's statements keep the parameter types they were
prepared with. A column whose result type changed fails that session's next
try once, as an OperationalError (retried by a drain like a lost
connection), and the session prepares afresh; but a widened column a
statement only writes (integer -> bigint) keeps its integer parameter until
the connection is replaced (workers: DB_CONN_MAX_AGE, 60 s; the web pool:
psycopg_pool's max_lifetime, an hour).
"""

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from django.conf import settings
from django.db import DatabaseError, OperationalError, connection
from django.db.backends.signals import connection_created

log = logging.getLogger(__name__)

_lock = threading.Lock()
_names: dict[str, str] = {}  # SQL text -> statement name (the same in every connection of this process)
_executes: dict[str, str] = {}  # SQL text -> the EXECUTE that replaces it
_refused: set[str] = set()  # texts Postgres would not prepare: they run as text
_PLACEHOLDER = re.compile(r"%s")
# An IN list built for a batch's size makes one text per length; prepared, each would keep a
# plan in every session. Short lists (one flow, the usual case) are prepared, longer ones not.
_LONG_IN_LIST = re.compile(r"IN \((%s, ){4,}%s\)")


def register(sql: str) -> str:
    """Run `sql` (a fixed text with %s placeholders) as a prepared statement from now on
    (Postgres; elsewhere nothing changes). Returns `sql`."""
    if connection.vendor != "postgresql" or "%%" in sql or sql in _names or _LONG_IN_LIST.search(sql):
        return sql  # a literal % would read differently in PREPARE: leave such a text alone
    with _lock:
        if sql not in _names:
            name = f"tim3_{len(_names) + 1}"
            count = sql.count("%s")
            _names[sql] = name  # before _executes, which execute_prepared reads first (other threads)
            _executes[sql] = f"EXECUTE {name}({', '.join(['%s'] * count)})" if count else f"EXECUTE {name}"
    return sql


class _Session:
    """What one server session (psycopg connection) has prepared, and wants to."""

    def __init__(self) -> None:
        self.ready: set[str] = set()
        self.wanted: set[str] = set()
        self.stale = False  # a table changed under its plans: DEALLOCATE ALL before the next use


_ALREADY_PREPARED = "42P05"  # duplicate_prepared_statement
_STALE_PLAN = "0A000"  # feature_not_supported: "cached plan must not change result type"


def _is_stale_plan(exc: BaseException) -> bool:
    """Whether `exc` (Django's) says a column's type changed under a prepared statement."""
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) == _STALE_PLAN and "cached plan" in str(cause)


@contextmanager
def stale_plans_retried(pgconn: psycopg.Connection | None) -> Iterator[None]:
    """Inside, a migration that changed a column's type under this session's plans ("cached
    plan must not change result type") comes out as an OperationalError, and the session
    prepares afresh before its next statement. Nothing was applied, and the next try (a
    drain's retry, the client's next request) runs on fresh statements: an OperationalError
    is what the drain task retries like a lost connection, instead of counting it toward
    dead-lettering the message."""
    try:
        yield
    except DatabaseError as exc:
        if not _is_stale_plan(exc):
            raise
        if pgconn is not None:
            _session(pgconn).stale = True
        raise OperationalError(f"a table changed under a prepared statement; "
                               f"it is prepared again at the next try ({exc})") from exc


_SENDABLE = (psycopg.pq.TransactionStatus.IDLE, psycopg.pq.TransactionStatus.INTRANS)  # not failed, nothing in flight


def _refresh(pgconn: psycopg.Connection, session: _Session) -> None:
    """DEALLOCATE ALL after a stale plan (called outside pipelines, by prepare_wanted)."""
    if pgconn.info.transaction_status not in _SENDABLE:
        return  # not now: meanwhile everything runs as text
    pgconn.execute("DEALLOCATE ALL")
    session.wanted |= session.ready
    session.ready.clear()
    session.stale = False


def _session(pgconn: psycopg.Connection) -> _Session:
    session = getattr(pgconn, "_tim3_prepared", None)
    if session is None:
        session = pgconn._tim3_prepared = _Session()
    return session


def _prepare_text(sql: str) -> str:
    numbers = iter(range(1, sql.count("%s") + 1))
    return f"PREPARE {_names[sql]} AS " + _PLACEHOLDER.sub(lambda _: f"${next(numbers)}", sql)


def prepare_wanted(pgconn: psycopg.Connection | None) -> None:
    """PREPARE what this connection has run as text so far, in one round trip (not in a pipeline)."""
    if pgconn is None or pgconn.closed or pgconn.pgconn.pipeline_status:
        return
    # Django's errors, as from any statement: a lost connection here is an OperationalError
    # the drain task retries, not a psycopg error it would count toward dead-lettering.
    with connection.wrap_database_errors:
        session = _session(pgconn)
        if session.stale:
            _refresh(pgconn, session)
            if session.stale:
                return
        texts = [t for t in session.wanted if t not in session.ready and t not in _refused]
        session.wanted.clear()
        if texts:
            _prepare(pgconn, session, texts)


def _prepare(pgconn: psycopg.Connection, session: _Session, texts: list[str]) -> None:
    status = pgconn.info.transaction_status
    if status not in _SENDABLE:
        session.wanted.update(texts)  # a failed transaction or a query in flight: another time
        return
    # In a transaction (or about to start one: psycopg begins before the first statement),
    # a refused PREPARE must not fail the caller's transaction: it runs in a savepoint.
    guarded = not pgconn.autocommit or status == psycopg.pq.TransactionStatus.INTRANS
    body = "; ".join(_prepare_text(t) for t in texts)
    cursor = psycopg.ClientCursor(pgconn)  # no parameters: the simple protocol, several statements at once
    try:
        cursor.execute(f"SAVEPOINT tim3_prepare; {body}; RELEASE SAVEPOINT tim3_prepare" if guarded else body)
    except psycopg.Error as exc:
        if guarded:  # the caller's transaction as it was (a lost connection raises here, as Django's)
            cursor.execute("ROLLBACK TO SAVEPOINT tim3_prepare; RELEASE SAVEPOINT tim3_prepare")
        if isinstance(exc, psycopg.OperationalError):
            # A lock or statement timeout, a deadlock: another time. The caller's statement now
            # runs as text and meets (or not) the same condition as its own error, as before.
            session.wanted.update(texts)
            return
        if len(texts) > 1:  # find which one: the others still get prepared
            for text in texts:
                _prepare(pgconn, session, [text])
        elif exc.sqlstate == _ALREADY_PREPARED:  # by the failed batch: PREPARE outlives a rollback
            session.ready.add(texts[0])
        else:
            log.warning("Postgres will not prepare this statement; it runs as text (%s): %s", exc, texts[0])
            _refused.add(texts[0])
        return
    finally:
        cursor.close()
    session.ready.update(texts)


def execute_prepared(execute, sql, params, many, context):
    """Django execute wrapper: a registered text runs as EXECUTE of its prepared statement."""
    run = _executes.get(sql)
    if run is None or sql in _refused:
        return execute(sql, params, many, context)
    pgconn = context["connection"].connection
    session = _session(pgconn)
    if session.stale or sql not in session.ready:
        session.wanted.add(sql)
        prepare_wanted(pgconn)  # does nothing inside a pipeline
        if session.stale or sql not in session.ready:
            return execute(sql, params, many, context)
    with stale_plans_retried(pgconn):
        return execute(run, params, many, context)


def enabled() -> bool:
    return settings.TIM3_PG_PREPARE


def _install(sender, connection, **kwargs) -> None:
    if connection.vendor == "postgresql" and enabled() and execute_prepared not in connection.execute_wrappers:
        connection.execute_wrappers.insert(0, execute_prepared)  # outermost: the others see the EXECUTE


def install() -> None:
    """Wrap every new Postgres connection of this process (called from the app's ready())."""
    connection_created.connect(_install, dispatch_uid="tim3-prepared-statements")
