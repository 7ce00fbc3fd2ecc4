"""`manage.py bench` in scaled mode: it starts Daphne and two `celery worker`
processes of its own against the Postgres test database (DATABASE_URL of this
process's environment, which its subprocesses inherit) and the test Redis db.
What is checked is in tests/test_bench.py; never the speed."""

import os
import time

import pytest
from django.db import connections

from tests.scaled.stack import worker_database_url
from tests.test_bench import assert_clean_run, coordinator_limits, database_facts, run_bench_command
from tim3web.bench import cpu_by_role

pytestmark = [pytest.mark.scaled, pytest.mark.django_db(transaction=True)]


@pytest.mark.parametrize("mix, loop", [("mix", []), ("v1", ["--rate", "10"])], ids=["mix-closed-loop", "v1-open-loop"])
def test_bench_scaled(scaled, system, settings, monkeypatch, tmp_path, mix, loop):
    monkeypatch.setenv("DATABASE_URL", worker_database_url())  # the bench's stack: pytest-django's test database
    monkeypatch.setenv("TIM3_VAR_DIR", str(tmp_path / "var"))
    settings.VAR_DIR = tmp_path / "var"  # the bench's logs
    limits_before = coordinator_limits()

    figures = run_bench_command("--workers", "2", "--mix", mix, *loop)

    assert figures["backend"] == "postgres" and figures["mode"] == "scaled" and figures["workers"] == 2
    assert {"workers", "daphne"} <= figures["cpu_ms_per_hop"].keys(), figures["cpu_ms_per_hop"]
    assert_clean_run(figures, database_facts(), limits_before=limits_before, mix=mix)


def test_cpu_of_a_connection_that_ended_is_counted_for_postgres():
    """`cpu_ms_per_hop.postgres` includes backends that ended during the run (a web pool's
    replaced connection, a worker's recycled one): their time is in the postmaster's
    children's counters once it reaps them."""
    before = cpu_by_role(None).get("postgres", 0.0)
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            backend = cursor.fetchone()[0]
            started = time.monotonic()
            cursor.execute("SELECT count(*) FROM generate_series(1, 4000000)")
            busy = time.monotonic() - started  # the backend's CPU, nearly all of it (nothing else to wait on)
    finally:
        other.close()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{backend}") and time.monotonic() < deadline:
        time.sleep(0.05)  # until the backend has exited and the postmaster has reaped it
    assert not os.path.exists(f"/proc/{backend}"), "the closed connection's backend did not end"
    counted = cpu_by_role(None).get("postgres", 0.0) - before
    assert busy >= 0.1, "the query was meant to keep the backend busy for a while"
    assert counted >= busy / 2, (counted, busy)
