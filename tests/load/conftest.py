"""The load test's stack: real Daphne and Celery worker subprocesses on
pytest-django's Postgres test database and the test Redis db."""

import shutil

import pytest

from tests.scaled.stack import ROOT, Scaled, purge_broker, require_postgres_and_redis  # noqa: F401 - autouse fixture

LOG_DIR = ROOT / "test-artifacts" / "reliability" / "load-logs"  # kept after the run (tmp_path is not, for long)


@pytest.fixture
def load_stack(transactional_db, settings):
    """Services stopped before the test database is flushed."""
    settings.TIM3_DOORBELL = "celery"  # tests/conftest.py turns it off for unit tests
    purge_broker()
    shutil.rmtree(LOG_DIR, ignore_errors=True)
    LOG_DIR.mkdir(parents=True)
    manager = Scaled(log_dir=LOG_DIR)
    try:
        yield manager
    finally:
        manager.stop_all()
        purge_broker()
