"""processes/runtime/prepared.py: sql.py's fixed statements as Postgres prepared statements.

What a user of the money core would check: the same answers as before, exact
64-bit values whatever was sent first (a prepared statement keeps its types),
nothing lost when Postgres will not prepare a statement, and the statements
really are prepared (otherwise this module is only overhead).
"""

import psycopg
import pytest
from django.db import OperationalError, connection, transaction

from processes.blueprints.state import TokenAccount
from processes.runtime import prepared, sql
from processes.runtime.ids import new_id
from processes.runtime.models import Process

pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="prepared statements are Postgres's")

BIG = 2**63 - 1


@pytest.fixture
def process(db):
    return Process.objects.create(id=new_id(), name=f"prep-{new_id()[:8]}", kind="token", owner=new_id())


def prepared_here() -> dict[str, int]:
    """This connection's prepared statements: name -> how many times Postgres planned them generically."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT name, generic_plans FROM pg_prepared_statements")
        return dict(cursor.fetchall())


def name_of(text: str) -> str:
    return prepared._names[text]


def test_a_fixed_statement_runs_prepared_from_its_first_use(process):
    where = "process_id = %s AND account = %s"
    row = TokenAccount(process=process, account=new_id(), balance=7, locked=0)
    sql.insert_row(row)
    for _ in range(8):  # past Postgres's five custom plans: the generic plan is used too
        found = sql.select_one(TokenAccount, where=where, params=[process.id, row.account])
        assert (found.pk, found.balance, found.account) == (row.pk, 7, row.account)
    name = name_of(sql.select_statement(TokenAccount, where=where))
    assert name in prepared_here()


def test_values_stay_exact_64_bit_whatever_was_sent_first(process):
    # The statement is prepared (and planned generically) with small values first; then values
    # past 32 bits and up to 2**63 - 1 must arrive exactly (server-side binding once wrapped one).
    row = TokenAccount(process=process, account=new_id(), balance=0, locked=0)
    sql.insert_row(row)
    for step in [1, 2, 3, 4, 5, 6, 7, 5_000_000_000, BIG - 5_000_000_028]:
        sql.update_rows(TokenAccount, set="balance = balance + %s", where="id = %s", params=[step, row.pk])
    assert TokenAccount.objects.get(pk=row.pk).balance == BIG
    text = sql._update_sql(TokenAccount, "balance = balance + %s", "id = %s")
    assert prepared_here()[name_of(text)] >= 1  # it did run on a generic plan
    with pytest.raises(Exception, match="out of range"):  # one more is an error, never a wrap
        with transaction.atomic():
            sql.update_rows(TokenAccount, set="balance = balance + %s", where="id = %s", params=[1, row.pk])
    assert TokenAccount.objects.get(pk=row.pk).balance == BIG


def test_a_statement_first_run_in_a_pipeline_is_prepared_at_the_next_one(process):
    where = "process_id = %s AND balance >= %s"
    text = sql.select_statement(TokenAccount, where=where, order_by="id")
    accounts = [TokenAccount(process=process, account=new_id(), balance=b, locked=0) for b in (3, 9)]
    for a in accounts:
        sql.insert_row(a)
    with transaction.atomic():
        for expected_prepared in (False, True):
            with connection.cursor() as cursor:
                with sql.pipeline():
                    cursor.execute(text, [process.id, 5])
                assert [r[0] for r in cursor.fetchall()] == [accounts[1].pk]
            assert (name_of(text) in prepared_here()) is expected_prepared


def test_a_statement_postgres_will_not_prepare_runs_as_text_and_the_transaction_goes_on(process):
    # "%s IS NULL" gives Postgres no type for the parameter: PREPARE is refused. The refusal
    # happens in a savepoint: the transaction's earlier write still commits.
    row = TokenAccount(process=process, account=new_id(), balance=1, locked=0)
    with transaction.atomic():
        sql.insert_row(row)
        value = sql.select_value(TokenAccount, expression="%s IS NULL", where="id = %s", params=[None, row.pk])
        assert value is True
    text = sql._statements[("value", TokenAccount, "%s IS NULL", "id = %s")]
    assert text in prepared._refused
    assert TokenAccount.objects.get(pk=row.pk).balance == 1


def test_prepared_statements_outlive_a_rollback_and_a_new_connection_prepares_afresh(transactional_db):
    # transactional_db: the test closes its connection, which a test wrapped in a transaction cannot.
    process = Process.objects.create(id=new_id(), name=f"prep-{new_id()[:8]}", kind="token", owner=new_id())
    where = "process_id = %s"
    text = sql.select_statement(TokenAccount, where=where)
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            sql.select_rows(TokenAccount, where=where, params=[process.id])
            raise RuntimeError("roll back")
    assert name_of(text) in prepared_here()  # a rollback does not take it away
    assert sql.select_rows(TokenAccount, where=where, params=[process.id]) == []

    connection.close()  # a new server session knows nothing of the old one's statements
    assert sql.select_rows(TokenAccount, where=where, params=[process.id]) == []
    assert name_of(text) in prepared_here()


def test_a_column_type_changed_under_a_prepared_statement_fails_once_as_transient_then_runs(db):
    # A migration altering a column's type while a connection keeps its plans: Postgres refuses
    # the old plan. That try fails as an OperationalError (the drain task retries those; nothing
    # was applied) and the next one prepares afresh, instead of every use failing until a restart.
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE tim3_prepared_probe (id integer PRIMARY KEY, v integer)")
        cursor.execute("INSERT INTO tim3_prepared_probe VALUES (1, 5)")
    text = prepared.register("SELECT v FROM tim3_prepared_probe WHERE id = %s")

    def read() -> int:
        with connection.cursor() as cursor:
            cursor.execute(text, [1])
            return cursor.fetchone()[0]

    assert read() == 5
    assert name_of(text) in prepared_here()
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE tim3_prepared_probe ALTER COLUMN v TYPE bigint")
    with pytest.raises(OperationalError, match="prepared again"):
        with transaction.atomic():
            read()
    assert read() == 5
    assert name_of(text) in prepared_here()


def test_a_prepare_that_times_out_leaves_the_statement_its_own_transient_error(transactional_db):
    # Another session holds a table lock and ours has a lock timeout: the PREPARE (which locks
    # the table too) times out inside its savepoint. The caller's transaction must come out as
    # it was, so the statement itself meets the lock and fails with its own OperationalError
    # (which a drain retries), not "current transaction is aborted" (which it would not).
    url = connection.settings_dict
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE tim3_prepared_lock_probe (id integer PRIMARY KEY, v integer)")
        cursor.execute("INSERT INTO tim3_prepared_lock_probe VALUES (1, 5)")
    text = prepared.register("SELECT v FROM tim3_prepared_lock_probe WHERE id = %s")
    holder = psycopg.connect(host=url["HOST"] or "127.0.0.1", port=url["PORT"] or 5432, user=url["USER"],
                             password=url["PASSWORD"] or None, dbname=url["NAME"])
    try:
        holder.execute("LOCK TABLE tim3_prepared_lock_probe IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(OperationalError, match="lock timeout"):
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '100ms'")
                cursor.execute(text, [1])
        holder.rollback()
        with connection.cursor() as cursor:
            cursor.execute(text, [1])  # the lock is gone: prepared now, and it answers
            assert cursor.fetchone()[0] == 5
        assert name_of(text) in prepared_here()
    finally:
        holder.rollback()
        holder.close()
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE tim3_prepared_lock_probe")


def test_long_in_lists_are_not_prepared(db):
    # One prepared statement per list length would pile up plans in every session.
    short = prepared.register("SELECT 1 FROM processes_process WHERE id IN (%s, %s)")
    long = prepared.register("SELECT 1 FROM processes_process WHERE id IN (%s, %s, %s, %s, %s)")
    assert short in prepared._names and long not in prepared._names
