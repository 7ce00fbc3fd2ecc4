"""Scaled mode on the real stack, no mocks: the Postgres test database,
Redis as the Celery broker, and real `celery -A tim3web worker` (and `beat`)
processes started as subprocesses.

Tests here use `@pytest.mark.django_db(transaction=True)` (the `scaled`
fixture requires `transactional_db`), so what the test process writes is
committed and visible to the workers, and the workers are stopped before the
database is flushed at the end of each test.
"""

import pytest

from tests.scaled.stack import (  # noqa: F401 - require_postgres_and_redis: an autouse fixture
    TIMING,
    Scaled,
    purge_broker,
    require_postgres_and_redis,
    summarize_figures,
)


def pytest_terminal_summary(terminalreporter):
    """Print the figures the scaled and embedded tests measured (not assertions)."""
    summarize_figures(terminalreporter, name=TIMING, title="TIM3 timings")


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
