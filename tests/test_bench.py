"""`manage.py bench` checked the way a user of the command checks it: the
figures of CONTRACT "`bench` figures (`--json`)" are there with the right
types, every flow completed, nothing lost or duplicated, the hop count is the
message log's, and the stack the bench started left the system as it found it
(coordinator limits restored, invariants hold). Never its speed: that is what
the bench itself reports.

Embedded mode here (`manage.py bench` as a console process on its own SQLite
file, the way tests/test_embedded.py runs `make run`); scaled mode in
tests/scaled/test_bench.py, which uses the helpers below.
"""

import json
import subprocess
import sys
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from processes.blueprints.state import CoordinatorState
from processes.flows import Flow
from processes.invariants import check_invariants
from processes.runtime.models import Message
from processes.services import active_coordinator
from tests.scaled.stack import manage
from tests.test_embedded import ROOT, embedded_env  # noqa: F401 - the fixture, used by name below
from tim3web.models import Account

FLOWS = 12
BENCH_ARGS = ["--flows", str(FLOWS), "--concurrency", "3", "--json"]


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- helpers (also used by tests/scaled/test_bench.py) ------------------------------------

def coordinator_limits() -> dict[str, int]:
    """The limits the bench raises for its run, as the active coordinator holds them."""
    c = CoordinatorState.objects.get(process=active_coordinator())
    return {"system_hourly_limit": c.system_hourly_limit, "user_daily_limit": c.user_daily_limit,
            "rate_limit_per_minute": c.rate_limit_per_minute}


def database_facts() -> dict:
    """What the database says about the bench's run: its deposit/redeem flows (the bench-*
    accounts' wallets), the settled messages of those flows, the limits, the invariants."""
    wallets = Account.objects.filter(user__username__startswith="bench-").values("address")
    flows = list(Flow.objects.filter(user__in=wallets, kind__in=["deposit", "redeem"])
                 .values_list("id", "kind", "mode", "status"))
    settled = (Message.objects.filter(pushed_for__in=[flow_id for flow_id, *_ in flows])
               .exclude(status=Message.PENDING).count())
    return {"flows": flows, "settled": settled, "limits": coordinator_limits(), "invariants": check_invariants()}


def run_bench_command(*args: str) -> dict:
    """`manage.py bench <BENCH_ARGS> <args>` in this process; its parsed JSON."""
    out = StringIO()
    call_command("bench", *BENCH_ARGS, *args, stdout=out)
    return json.loads(out.getvalue())


def assert_contract_figures(figures: dict) -> None:
    """Every CONTRACT key, with the right type."""
    for key in ("backend", "workers", "flows", "hops", "seconds", "hops_per_s", "flows_per_s",
                "flow_ms", "ws_lag_ms", "lost", "duplicated"):
        assert key in figures, f"CONTRACT figure {key!r} missing: {sorted(figures)}"
    assert isinstance(figures["backend"], str) and figures["backend"]
    for key in ("workers", "flows", "hops", "lost", "duplicated"):
        assert type(figures[key]) is int, f"{key} is {figures[key]!r}, not an integer"
    for key in ("seconds", "hops_per_s", "flows_per_s"):
        assert is_number(figures[key]), f"{key} is {figures[key]!r}, not a number"
    assert set(figures["flow_ms"]) == {"p50", "p95", "p99"}, figures["flow_ms"]
    assert set(figures["ws_lag_ms"]) == {"p50", "p99"}, figures["ws_lag_ms"]
    for key in ("flow_ms", "ws_lag_ms"):
        values = list(figures[key].values())
        assert all(is_number(v) and v >= 0 for v in values), f"{key}: {figures[key]}"
        assert values == sorted(values), f"{key} percentiles out of order: {figures[key]}"


def assert_clean_run(figures: dict, facts: dict, *, limits_before: dict, mix: str) -> None:
    """A run a user would accept: all flows completed, nothing lost or duplicated, hops as
    the message log counts them, limits restored, invariants hold."""
    assert_contract_figures(figures)
    assert figures["flows"] == FLOWS
    assert figures["statuses"] == {"completed": FLOWS}, f"{figures['statuses']}, errors: {figures['errors']}"
    assert figures["errors"] == []
    assert figures["lost"] == 0
    assert figures["duplicated"] == 0

    flows = facts["flows"]
    assert len(flows) == FLOWS, f"the database holds {len(flows)} bench flows: {flows}"
    assert {status for *_, status in flows} == {Flow.COMPLETED}, flows
    assert {kind for _, kind, _, _ in flows} == {"deposit", "redeem"}  # both mixes alternate them per user
    assert {mode for _, _, mode, _ in flows} == {"lock" if mix == "v1" else "deposit"}
    assert figures["hops"] == facts["settled"]
    assert figures["hops"] > figures["flows"], "every flow has several hops"

    assert facts["limits"] == limits_before, "the bench did not restore the coordinator limits"
    assert facts["invariants"] == []


# --- tests ---------------------------------------------------------------------------------

def test_bench_refuses_to_start_its_own_stack_in_production(settings):
    settings.TIM3_ENV = "production"
    with pytest.raises(CommandError, match="only in the test environment"):
        run_bench_command()


FACTS_SCRIPT = ("import django, json; django.setup(); from tests.test_bench import database_facts; "
                "print(json.dumps(database_facts()))")


def facts_of(env: dict) -> dict:
    """database_facts() of the embedded app's SQLite file, read by a process of its own."""
    result = subprocess.run([sys.executable, "-c", FACTS_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.embedded
def test_bench_embedded(embedded_env, tmp_path):  # noqa: F811 - the imported fixture
    """`manage.py bench` starts `manage.py serve` on the app's SQLite file (its own TIM3_VAR_DIR)."""
    manage(embedded_env, "migrate", "--noinput")
    manage(embedded_env, "bootstrap")
    limits_before = facts_of(embedded_env)["limits"]

    figures = json.loads(manage(embedded_env, "bench", *BENCH_ARGS, "--mix", "mix", timeout=180))

    assert (tmp_path / "var" / "tim3.sqlite3").exists()
    assert figures["backend"] == "sqlite" and figures["mode"] == "embedded" and figures["workers"] == 1
    assert "serve" in figures["cpu_ms_per_hop"]
    assert_clean_run(figures, facts_of(embedded_env), limits_before=limits_before, mix="mix")
