"""A drain reads its process's own state row (TokenState, CoordinatorState) in the same round
trip as the process's lock (delivery.open_mailbox), not as a statement of its own.

What a user would check: deposits still complete with the books right, and the reads that
used to wait alone now travel with the lock (the point of the change: fewer round trips per hop).
"""

import pytest
from django.db import connection

from processes.flows import Flow
from processes.invariants import check_invariants
from processes.runtime import prepared
from tests.test_flows import U, deposit, fund

pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="psycopg pipelines: Postgres only")


def statements_sent_alone(block) -> list[str]:
    """The SQL texts `block()` sends outside a pipeline (each waiting for its own answer)."""
    by_name = {name: text for text, name in prepared._names.items()}
    alone = []

    def record(execute, sql, params, many, context):
        if not context["connection"].connection.pgconn.pipeline_status:
            name = sql.split()[1].split("(")[0] if sql.startswith("EXECUTE ") else None
            alone.append(by_name.get(name, sql))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        block()
    return alone


def test_deposits_complete_and_own_state_is_read_with_the_lock(system, wallet):
    user = wallet()
    fund(user, 10 * U)
    flows = []
    alone = statements_sent_alone(lambda: flows.extend(deposit(user, 2 * U) for _ in range(3)))
    assert [f.status for f in flows] == [Flow.COMPLETED] * 3
    assert check_invariants() == []
    state_reads = [s for s in alone if s.startswith("SELECT") and
                   ('FROM "processes_tokenstate"' in s or 'FROM "processes_coordinatorstate"' in s)]
    assert state_reads == []
