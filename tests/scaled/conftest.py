"""Scaled mode on the real stack, no mocks: the Postgres test database,
Redis as the Celery broker, and real `celery -A tim3web worker` (and `beat`)
processes started as subprocesses.

Tests here use `@pytest.mark.django_db(transaction=True)` (the `scaled`
fixture requires `transactional_db`), so what the test process writes is
committed and visible to the workers, and the workers are stopped before the
database is flushed at the end of each test.
"""

import pytest

from tests.scaled.stack import TIMING, Scaled, purge_broker, scaled_env_problem


def pytest_terminal_summary(terminalreporter):
    """Print the figures the scaled and embedded tests measured (not assertions)."""
    lines = [
        f"{report.nodeid.split('::')[-1]}: {value}"
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == TIMING
    ]
    if lines:
        terminalreporter.section("TIM3 timings")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _require_postgres_and_redis():
    problem = scaled_env_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture
def scaled(transactional_db, settings, tmp_path):
    """Real Celery services for one test; the test process rings real doorbells."""
    settings.TIM3_DOORBELL = "celery"  # tests/conftest.py turns it off for unit tests
    purge_broker()
    manager = Scaled(log_dir=tmp_path)
    try:
        yield manager
    finally:
        manager.stop_all()
        purge_broker()
