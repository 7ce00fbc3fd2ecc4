"""The drain task's error handling: transient database errors are retried
without counting against the message; errors that would repeat on every try
(DataError, IntegrityError, a bug) count, and dead-letter the head message
after TIM3_MAX_ATTEMPTS so the mailbox behind it moves on."""

import pytest
from django.db import DataError, OperationalError

from processes import tasks
from processes.runtime.delivery import run_until_idle, send_message
from processes.runtime.models import Message

# The task opens with close_old_connections(), which would close a test's wrapping transaction.
pytestmark = pytest.mark.django_db(transaction=True)


def _broken(exc):
    def drain_mailbox(**kwargs):
        raise exc

    return drain_mailbox


def test_transient_error_is_retried_without_counting(system, wallet, monkeypatch):
    msg = send_message(sender=wallet(), target=system["usda"].id, tags={"Action": "Info"})
    monkeypatch.setattr(tasks, "drain_mailbox", _broken(OperationalError("deadlock detected")))
    with pytest.raises(OperationalError):  # called directly, `retry` re-raises
        tasks.drain(system["usda"].id)
    msg.refresh_from_db()
    assert (msg.status, msg.attempts) == (Message.PENDING, 0)


def test_repeating_database_error_dead_letters_the_head(system, wallet, monkeypatch, settings):
    sender = wallet()
    msg = send_message(sender=sender, target=system["usda"].id, tags={"Action": "Info"})
    behind = send_message(sender=sender, target=system["usda"].id, tags={"Action": "Info"})
    monkeypatch.setattr(tasks, "drain_mailbox", _broken(DataError("value too long for type character varying(64)")))
    for attempt in range(1, settings.TIM3_MAX_ATTEMPTS + 1):
        with pytest.raises(DataError):
            tasks.drain(system["usda"].id)
        msg.refresh_from_db()
        assert msg.attempts == attempt
    assert msg.status == Message.FAILED and msg.dead and "DataError" in msg.error
    assert Message.objects.get(parent_id=msg.msg_id).action == "Info-Error"
    monkeypatch.undo()
    run_until_idle()
    behind.refresh_from_db()
    assert behind.status == Message.APPLIED


def test_vacuum_task_clears_the_applied_messages_out_of_the_pending_index(system, wallet):
    """Every hop leaves a dead entry in the pending-message index until a VACUUM;
    the periodic task removes them (Postgres), and is a no-op elsewhere."""
    from django.db import connection

    if connection.vendor != "postgresql":
        assert tasks.vacuum_mailbox() == 0
        return
    usda, alice = system["usda"], wallet()
    for _ in range(20):
        send_message(sender=alice, target=usda.id, tags={"Action": "Balance"})
    run_until_idle()

    def counts() -> tuple[int, int]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute("SELECT vacuum_count, analyze_count FROM pg_stat_user_tables WHERE relname = %s",
                           [Message._meta.db_table])
            return cursor.fetchone()

    vacuums, analyzes = counts()
    assert tasks.vacuum_mailbox() == 3  # messages, operations, flows
    assert counts() == (vacuums + 1, analyzes)  # statistics are the hourly job's (seconds on a big table)
    assert not Message.objects.filter(status=Message.PENDING).exists()  # it only cleans: nothing else changes
    assert tasks.analyze_mailbox() == 3
    assert counts() == (vacuums + 2, analyzes + 1)


def test_lock_timeout_in_the_drains_pipelined_statements_is_retried_without_counting(system, wallet, monkeypatch):
    """The drain sends its lock + pending read, and its write-back, in psycopg pipelines, whose
    errors surface when the pipeline syncs: they must still be Django's exceptions, so a
    transient one (here a lock timeout, on the process row and then on the message row) is
    retried by the task, not counted toward dead-lettering a healthy message."""
    import threading

    import psycopg
    from django.db import connection

    from processes.runtime.models import Process

    if connection.vendor != "postgresql":
        pytest.skip("psycopg pipelines: Postgres only")
    usda = system["usda"]
    msg = send_message(sender=wallet(), target=usda.id, tags={"Action": "Info"})
    counted = []
    monkeypatch.setattr(tasks, "record_drain_failure", lambda **kwargs: counted.append(kwargs))
    params = connection.settings_dict
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '200ms'")
    try:
        for table, column, key in ((Process._meta.db_table, "id", usda.id), (Message._meta.db_table, "seq", msg.seq)):
            holder = psycopg.connect(host=params["HOST"] or None, port=params["PORT"] or None, user=params["USER"],
                                     password=params["PASSWORD"] or None, dbname=params["NAME"])
            holder.execute(f"SELECT 1 FROM {qn(table)} WHERE {qn(column)} = %s FOR UPDATE", [key])
            release = threading.Timer(5, holder.rollback)  # never hang, whatever happens
            release.start()
            try:
                with pytest.raises(OperationalError):
                    tasks.drain(usda.id)
            finally:
                release.cancel()
                holder.close()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")
    assert counted == []
    msg.refresh_from_db()
    assert (msg.status, msg.attempts) == (Message.PENDING, 0)
    run_until_idle()
    msg.refresh_from_db()
    assert msg.status == Message.APPLIED
