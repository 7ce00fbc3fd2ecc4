"""Hand-written SQL for the handlers' hot statements.

Why: building a statement through the ORM costs more Python time (0.5-0.7 ms)
than Postgres takes to answer it. These helpers build each statement's text
once per model and shape, cache it, and run it on `django.db.connection`: in
the caller's transaction, on Postgres and SQLite alike (Django's cursor maps
%s to SQLite's ?), with the ORM's errors (IntegrityError, DataError, ...).

`where`, `set`, `order_by` and `expression` are SQL fragments over the model's
own columns, written as constants by the caller; values always go in `params`.
Quote a reserved column name like "user" or "key" with double quotes (both
backends accept them). Rows come back as model instances through the same
converters the ORM applies (SQLite booleans, JSON fields, ...).
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from django.db import DatabaseError, connection, models
from django.db.models import Model

from processes.runtime import prepared

_statements: dict[tuple, str] = {}
_converters: dict[tuple, list] = {}


def _statement(key: tuple, build: Callable[[], str]) -> str:
    """The SQL text for `key`, built the first time it is asked for."""
    sql = _statements.get(key)
    if sql is None:
        sql = _statements[key] = prepared.register(build())
    return sql


def _table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _column_list(fields) -> str:
    return ", ".join(connection.ops.quote_name(f.column) for f in fields)


def converters_for(fields) -> list:
    """(index, converters, column) for the fields, in this order, whose database values the ORM
    converts: the backend's converters, then the field's `from_db_value`, as its compiler does."""
    found = []
    for index, field in enumerate(fields):
        column = field.get_col(field.model._meta.db_table)
        converters = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        if converters:
            found.append((index, converters, column))
    return found


def convert_row(row: tuple, converters: list) -> list:
    """A raw row's values as the ORM would hand them over (`converters` from converters_for)."""
    values = list(row)
    for index, found, column in converters:
        for convert in found:
            values[index] = convert(values[index], column, connection)
    return values


def _row_converters(model: type[Model]) -> list:
    """converters_for all of `model`'s columns. The backend's converters depend only on
    settings, so one list serves every thread."""
    key = (model, connection.vendor)
    if key not in _converters:
        _converters[key] = converters_for(model._meta.concrete_fields)
    return _converters[key]


def _instance(model: type[Model], row: tuple) -> Model:
    values = convert_row(row, _row_converters(model))
    return model.from_db(connection.alias, None, values)  # all concrete fields, in order: no names needed


def instances(model: type[Model], rows) -> list:
    """Model instances for raw rows holding all of `model`'s concrete columns, in order."""
    return [_instance(model, row) for row in rows]


# Fields whose value goes to the driver as it is when it already has this exact Python type
# (or is None): all the ORM's get_db_prep_save would do is check that (and on Postgres wrap
# ints in psycopg's Int8, whose only use is server-side binding, which Django leaves off).
# Any other value, and every other field (JSON, dates: the backend's own form), takes the ORM's path.
_PLAIN_TYPES = ((models.CharField, str), (models.TextField, str), (models.BooleanField, bool),
                (models.IntegerField, int))
_plain: dict[tuple, list] = {}


def _plain_type(field) -> type | None:
    if field.is_relation:
        field = field.target_field
    if type(field).pre_save is not models.Field.pre_save:  # auto_now and the like set the value
        return None
    return next((python for kind, python in _PLAIN_TYPES if isinstance(field, kind)), None)


def _prepared(obj: Model, fields, *, add: bool) -> list:
    """The fields' values as the ORM would write them (pre_save for auto fields, then the backend's form)."""
    key = (type(obj), tuple(fields))
    plain = _plain.get(key)
    if plain is None:
        plain = _plain[key] = [_plain_type(f) for f in fields]
    values = []
    for field, python in zip(fields, plain, strict=True):
        value = getattr(obj, field.attname)
        if python is None or not (value is None or type(value) is python):
            value = field.get_db_prep_save(field.pre_save(obj, add), connection)
        values.append(value)
    return values


# --- reading ---------------------------------------------------------------------------

def select_statement(model: type[Model], *, where: str, order_by: str = "", limit: int | None = None,
                     lock: str = "") -> str:
    """The SELECT of all `model`'s columns, in order (`instances` reads its rows), that
    select_rows runs; `lock` is a locking clause (`FOR UPDATE ...`). Public for a caller
    that sends it in a pipeline (delivery.open_mailbox)."""
    def build() -> str:
        sql = f"SELECT {_column_list(model._meta.concrete_fields)} FROM {_table(model)} WHERE {where}"
        if order_by:
            sql += f" ORDER BY {order_by}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return f"{sql} {lock}" if lock else sql

    return _statement(("select", model, where, order_by, limit, lock), build)


def select_rows(model: type[Model], *, where: str, params: list, order_by: str = "",
                limit: int | None = None) -> list:
    """Instances of `model` for the rows matching `where`."""
    with connection.cursor() as cursor:
        cursor.execute(select_statement(model, where=where, order_by=order_by, limit=limit), params)
        return instances(model, cursor.fetchall())


def select_one(model: type[Model], *, where: str, params: list) -> Model | None:
    """The one row matching `where` (a unique key), or None."""
    rows = select_rows(model, where=where, params=params)
    if len(rows) > 1:
        raise model.MultipleObjectsReturned(f"{len(rows)} {model.__name__} rows match {where}")
    return rows[0] if rows else None


def select_value(model: type[Model], *, expression: str, where: str, params: list) -> Any:
    """The first column of the first row of `SELECT expression ... WHERE where`, as the driver
    gives it (no conversion), or None when no row matches."""
    sql = _statement(("value", model, expression, where),
                     lambda: f"SELECT {expression} FROM {_table(model)} WHERE {where} LIMIT 1")
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else row[0]


def select_values(model: type[Model], *, aggregates: list[tuple[str, str]], params: list) -> list:
    """Several aggregates over `model`'s rows in one round trip: for each (expression, where),
    `(SELECT expression FROM table WHERE where)`; the values as the driver gives them (a
    SUM of no rows is None). `params` are all the wheres' params, in order."""
    key = ("values", model, tuple(aggregates))
    text = _statement(key, lambda: "SELECT " + ", ".join(
        f"(SELECT {expression} FROM {_table(model)} WHERE {where})" for expression, where in aggregates))
    with connection.cursor() as cursor:
        cursor.execute(text, params)
        return list(cursor.fetchone())


def select_sum(model: type[Model], *, column: str, where: str, params: list) -> int:
    """SUM(column) over the matching rows as an exact int, 0 when none match.
    (Postgres sums a bigint column as numeric: a Decimal, which int() takes exactly.)"""
    return int(select_value(model, expression=f"SUM({column})", where=where, params=params) or 0)


def exists(model: type[Model], *, where: str, params: list) -> bool:
    return select_value(model, expression="1", where=where, params=params) is not None


# --- writing ----------------------------------------------------------------------------

def _update_sql(model: type[Model], set: str, where: str) -> str:
    return _statement(("update", model, set, where), lambda: f"UPDATE {_table(model)} SET {set} WHERE {where}")


def update_rows(model: type[Model], *, set: str, where: str, params: list) -> int:
    """`UPDATE ... SET set WHERE where`; how many rows it changed. Lets a change relative to the
    stored value (`balance = balance + %s`) and its condition be one statement."""
    with connection.cursor() as cursor:
        cursor.execute(_update_sql(model, set, where), params)
        return cursor.rowcount


def update_later(model: type[Model], *, set: str, where: str, params: list, rows: int) -> None:
    """`update_rows` whose answer nobody waits for: it must change exactly `rows` rows, which is
    checked once it has run (queued inside `writing_later()`, at once elsewhere)."""
    write_later(Statement(_update_sql(model, set, where), params, rows=rows, label=model._meta.label))


def insert_or_add(obj: Model, *, unique: tuple[str, ...], add: tuple[str, ...]) -> None:
    """INSERT `obj`, or where a row with the same `unique` columns exists, add `obj`'s values of
    the `add` columns to it (`balance = balance + %s` for an account that may not exist yet).
    One statement that needs no answer: queued inside `writing_later()`."""
    meta = obj._meta
    fields = [f for f in meta.concrete_fields if f is not meta.auto_field]
    table, q = _table(type(obj)), connection.ops.quote_name

    def build() -> str:
        insert = _insert_sql(type(obj), fields, unique, returning=False)
        return (insert.replace(" DO NOTHING", " DO UPDATE SET ")
                + ", ".join(f"{q(c)} = {table}.{q(c)} + EXCLUDED.{q(c)}" for c in add))

    text = _statement(("insert_or_add", type(obj), unique, add), build)
    write_later(Statement(text, _prepared(obj, fields, add=True), rows=1, label=meta.label))


def update_value(model: type[Model], *, set: str, where: str, returning: str, params: list) -> Any:
    """`UPDATE ... SET set WHERE where RETURNING returning` (Postgres, SQLite >= 3.35): the value
    the first changed row returns, as the driver gives it, or None when no row matches. Takes a
    counter (`n = n + 1`, returning `n - 1`) in one statement, under the row's lock."""
    sql = _statement(("update_value", model, set, where, returning),
                     lambda: f"UPDATE {_table(model)} SET {set} WHERE {where} RETURNING {returning}")
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else row[0]


def update_statement(obj: Model, *field_names: str) -> tuple[str, list]:
    """The UPDATE that update_columns runs, and its params. Public for a caller that sends
    it in a pipeline without waiting for its row count (delivery.write_statements)."""
    meta = obj._meta
    fields = ([meta.get_field(name) for name in field_names] if field_names
              else [f for f in meta.concrete_fields if not f.primary_key])
    sql = _statement(("update_columns", type(obj), field_names), lambda: (
        f"UPDATE {_table(type(obj))} SET {', '.join(f'{connection.ops.quote_name(f.column)} = %s' for f in fields)} "
        f"WHERE {connection.ops.quote_name(meta.pk.column)} = %s"))
    return sql, [*_prepared(obj, fields, add=False), meta.pk.get_db_prep_value(obj.pk, connection)]


def update_columns(obj: Model, *field_names: str) -> None:
    """Write these fields of `obj` to its row (found by pk); all its non-pk fields when none are named,
    as `obj.save()` on an existing row does. The row must exist. Inside `writing_later()` the
    UPDATE is queued (see there) and the row count checked when it has run."""
    write_later(Statement(*update_statement(obj, *field_names), rows=1, label=f"{obj._meta.label} {obj.pk!r}"))


def _check_rows(found: int, expected: int, label: str) -> None:
    if found != expected:  # as Model.save(update_fields=...) says of a missing row
        raise DatabaseError(f"{label} was not saved: it has no row.")


def save_row(obj: Model) -> None:
    """`obj.save()` for a row that exists: every non-pk column, by pk."""
    update_columns(obj)


def _insert_sql(model: type[Model], fields: list, unless_exists: tuple[str, ...], *, returning: bool) -> str:
    def build() -> str:
        sql = f"INSERT INTO {_table(model)} ({_column_list(fields)}) VALUES ({', '.join(['%s'] * len(fields))})"
        if unless_exists:
            sql += f" ON CONFLICT ({', '.join(connection.ops.quote_name(c) for c in unless_exists)}) DO NOTHING"
        return f"{sql} RETURNING {connection.ops.quote_name(model._meta.pk.column)}" if returning else sql

    return _statement(("insert", model, tuple(f.column for f in fields), unless_exists, returning), build)


def insert_statement(obj: Model) -> tuple[str, list]:
    """The INSERT of `obj` without its auto pk, which is not read back, and its params.
    Public for a caller that sends it in a pipeline (delivery.write_statements)."""
    meta = obj._meta
    fields = [f for f in meta.concrete_fields if f is not meta.auto_field]
    return _insert_sql(type(obj), fields, unless_exists=(), returning=False), _prepared(obj, fields, add=True)


def insert_row(obj: Model, *, unless_exists: tuple[str, ...] = ()) -> bool:
    """INSERT `obj`; an auto pk it has not got yet is set from the database (RETURNING:
    Postgres, SQLite >= 3.35). `unless_exists`: the columns of a unique constraint; when a
    row with the same values is there, insert nothing and return False (one statement
    where an exists() and an insert took two; other constraints still raise)."""
    meta = obj._meta
    returning = meta.auto_field is not None and obj.pk is None
    fields = [f for f in meta.concrete_fields if not (returning and f is meta.auto_field)]
    with connection.cursor() as cursor:
        cursor.execute(_insert_sql(type(obj), fields, unless_exists=unless_exists, returning=returning),
                       _prepared(obj, fields, add=True))
        if returning:
            row = cursor.fetchone()
            inserted = row is not None
            if inserted:
                setattr(obj, meta.pk.attname, row[0])
        else:
            inserted = cursor.rowcount == 1
    if inserted:
        obj._state.adding, obj._state.db = False, connection.alias
    return inserted


# --- statements sent together -------------------------------------------------------------

class Statement(NamedTuple):
    """A write whose answer nobody waits for: sent in a pipeline with the next statements."""

    sql: str
    params: list  # with many=True, a list of params lists (executemany)
    many: bool = False
    rows: int | None = None  # the row count it must report (checked once it has run)
    label: str = ""  # what it writes, for the error when the row count is wrong


@contextmanager
def pipeline() -> Iterator[None]:
    """One round trip for the statements inside (Postgres); elsewhere they simply run in order.

    A pipeline's errors surface when it syncs, outside the cursors' own wrapping:
    wrap_database_errors turns them into Django's (a lock timeout or lost connection
    is an OperationalError the task retries, not a poisoned message)."""
    if connection.vendor != "postgresql":
        yield
        return
    if prepared.enabled():
        prepared.prepare_wanted(connection.connection)  # statements first run in earlier pipelines
    # A pipeline's errors surface as it syncs, not in execute_prepared: stale plans included.
    with prepared.stale_plans_retried(connection.connection), connection.wrap_database_errors, \
            connection.connection.pipeline():
        yield


def execute_all(statements: list[Statement]) -> Callable[[], None]:
    """Execute `statements` in order; return the check of their row counts, to call once
    they have run (inside `pipeline()` they only go out: call it after the pipeline)."""
    cursors = []
    for statement in statements:
        cursor = connection.cursor()  # one each, so each has its own row count
        if statement.many:
            cursor.executemany(statement.sql, statement.params)
        else:
            cursor.execute(statement.sql, statement.params)
        cursors.append((cursor, statement))

    def check() -> None:
        for cursor, statement in cursors:
            try:
                if statement.rows is not None:
                    _check_rows(cursor.rowcount, statement.rows, statement.label)
            finally:
                cursor.close()

    return check


def send(statements: list[Statement]) -> None:
    """Run `statements` in one round trip (Postgres) and check their row counts."""
    if statements:
        with pipeline():
            check = execute_all(statements)
        check()


# --- writing later --------------------------------------------------------------------------

_later = threading.local()  # .queue: this thread's queued writes, inside writing_later()


@contextmanager
def writing_later() -> Iterator[None]:
    """Inside, `update_columns` and `save_row` queue their UPDATE instead of waiting for it.

    Why: a drain's handlers save state rows (operations, coordinator and state-manager
    rows) that nothing reads back before the next statement; each save waited a round
    trip of its own. The queue goes out ahead of the next statement of any kind on this
    connection, in the same round trip (so every read, ORM or not, sees it), or is taken
    by `take_later()` to go with the drain's own writes; what is left at the end of the
    block goes out then (use it inside the transaction, so that is before the commit). A queued write that fails raises
    at that later statement, so only the engine's first, savepoint-less try of a batch
    uses this: any failure there rolls everything back and the batch runs again with
    savepoints and immediate writes, where each error belongs to its own handler.
    """
    previous = getattr(_later, "queue", None)
    _later.queue = []
    try:
        with connection.execute_wrapper(_send_later_first):
            yield
            send(take_later())  # what the last statements queued: never left behind
    finally:
        _later.queue = previous


def write_later(statement: Statement) -> None:
    """Queue `statement` inside `writing_later()`; elsewhere run it now."""
    queue = getattr(_later, "queue", None)
    if queue is not None:
        queue.append(statement)
    else:
        send([statement])


def take_later() -> list[Statement]:
    """The queued writes, now the caller's to send (empty outside writing_later)."""
    queue = getattr(_later, "queue", None)
    if not queue:
        return []
    _later.queue = []
    return queue


def _send_later_first(execute, sql, params, many, context):
    """Django execute wrapper: the queued writes go out first, in the same round trip."""
    queued = take_later()
    if not queued:
        return execute(sql, params, many, context)
    with pipeline():
        check = execute_all(queued)
        result = execute(sql, params, many, context)
    check()
    return result
