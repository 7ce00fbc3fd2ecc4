"""`manage.py bench` in scaled mode: it starts Daphne and two `celery worker`
processes of its own against the Postgres test database (DATABASE_URL of this
process's environment, which its subprocesses inherit) and the test Redis db.
What is checked is in tests/test_bench.py; never the speed."""

import pytest

from tests.scaled.stack import worker_database_url
from tests.test_bench import assert_clean_run, coordinator_limits, database_facts, run_bench_command

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
