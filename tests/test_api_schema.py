"""Property-based: schemathesis generates requests (valid and invalid) from /api/openapi.json and
sends them through the WSGI app, as a logged-in user with a bootstrapped system. No answer may
be a server error (5xx), whatever the input."""

import pytest
import schemathesis
from django.core import signals
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tim3web.accounts import create_account
from tim3web.auth import issue_token
from tim3web.wsgi import application

MAX_EXAMPLES = 20


# Loaded at collection through the app itself (serving the schema touches no database). Not
# schemathesis.pytest.from_fixture: its lazy loader sets Node._nodeid, which pytest 9 no longer has.
schema = schemathesis.openapi.from_wsgi("/api/openapi.json", application)


@pytest.fixture
def keep_test_connection():
    """What Django's test client does: the WSGI app must not close the connection (and with it the
    test's transaction) at the start and end of each request."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def bearer(system, settings, keep_test_connection):
    settings.TIM3_RATE_LIMIT_PER_MINUTE = 100_000  # let every generated request reach the endpoint
    settings.TIM3_READ_RATE_LIMIT_PER_SECOND = 100_000
    account = create_account(username="fuzzer", password="correct horse battery")
    raw, _ = issue_token(account.user)
    return {"Authorization": f"Bearer {raw}"}


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_no_server_errors(case, bearer):
    case.call_and_validate(headers=bearer, checks=[not_a_server_error])
