"""Fault injection on the real scaled stack: pytest-django's Postgres test
database, real `celery worker` / `celery beat` / `daphne` subprocesses, and a
private `redis-server` that the tests may shut down and start again without
touching the machine's shared Redis (other runs use it concurrently)."""

import os

import pytest

from tests.scaled.stack import (  # noqa: F401 - require_postgres_and_redis: an autouse fixture
    RedisServer,
    Scaled,
    celery_broker,
    purge_broker,
    require_postgres_and_redis,
    summarize_figures,
)

FIGURES = "tim3-faults"  # user property: a line of the fault run's figures, shown at the end of the run


def pytest_terminal_summary(terminalreporter):
    summarize_figures(terminalreporter, name=FIGURES, title="TIM3 fault injection")


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own, on a free port; this process's Celery app uses it too."""
    if not RedisServer.available():
        pytest.fail("redis-server and redis-cli are needed (apt-get install redis-server)")
    server = RedisServer(log_dir=tmp_path)
    server.start()
    db = os.environ["REDIS_URL"].rsplit("/", 1)[-1]
    url = server.url(int(db) if db.isdigit() else 0)
    try:
        with celery_broker(url):
            yield server, url
    finally:
        server.shutdown()


@pytest.fixture
def fault_stack(transactional_db, settings, tmp_path, private_redis):
    """Real services on the private Redis; stopped before the test database is flushed."""
    server, url = private_redis
    settings.TIM3_DOORBELL = "celery"  # tests/conftest.py turns it off for unit tests
    manager = Scaled(log_dir=tmp_path, redis_url=url)
    manager.redis = server
    try:
        yield manager
    finally:
        manager.stop_all()


@pytest.fixture
def runbook_stack(transactional_db, settings, tmp_path):
    """Real workers on the shared test Redis (nothing here restarts it)."""
    settings.TIM3_DOORBELL = "celery"
    purge_broker()
    manager = Scaled(log_dir=tmp_path)
    try:
        yield manager
    finally:
        manager.stop_all()
        purge_broker()
