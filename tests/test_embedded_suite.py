"""SPEC §6 in embedded mode: the app started the way `make run` starts it
(migrate, bootstrap, `manage.py serve` on its own SQLite file, no DATABASE_URL
or REDIS_URL), then `manage.py integration_suite` as a separate console
process against the same SQLite file, without --drive: the server's in-process
worker and sweeper thread deliver every hop. Then `manage.py verify`."""

import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.scaled.stack import TIMING, manage, serving
from tests.test_embedded import ROOT

pytestmark = pytest.mark.embedded


@pytest.fixture
def app_env(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("TIM3_")}
    env.update(TIM3_VAR_DIR=str(tmp_path / "var"), DJANGO_SETTINGS_MODULE="tim3web.settings", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def served(app_env, tmp_path):
    """`make run`: migrate, bootstrap, `serve --port <free>`; yields (base URL, serve log path)."""
    manage(app_env, "migrate", "--noinput")
    manage(app_env, "bootstrap")
    log_path = tmp_path / "serve.log"
    with serving(app_env, log_path, probe="/api/health") as base:
        yield base, log_path


def suite_rows(output: str) -> dict[str, str]:
    """The integration suite's table: {check: PASS|FAIL}."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        if len(cells) >= 2 and cells[1] in ("PASS", "FAIL"):
            rows[cells[0]] = cells[1]
    return rows


def wait_nothing_pending(db_path, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
            pending = db.execute("SELECT count(*) FROM processes_message WHERE status = 'pending'").fetchone()[0]
        if not pending:
            return
        assert time.monotonic() < deadline, f"{pending} message(s) still pending after {timeout:.0f}s"
        time.sleep(0.1)


def test_integration_suite_passes_against_make_run(served, app_env, tmp_path, request):
    base, log_path = served
    assert (tmp_path / "var" / "tim3.sqlite3").exists(), "embedded mode must use its own SQLite file"

    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "manage.py", "integration_suite"], cwd=ROOT, env=app_env, capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL,
    )
    took = time.monotonic() - started
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, (f"integration_suite exited {result.returncode}:\n{output}\n"
                                    f"--- serve log ---\n{log_path.read_text()[-4000:]}")
    rows = suite_rows(result.stdout)
    assert len(rows) == 12 and set(rows.values()) == {"PASS"}, output
    assert "12 passed, 0 failed" in result.stdout, output

    # The server delivers whatever is still in flight (a scheduler tick); then the log replays to the live state.
    wait_nothing_pending(tmp_path / "var" / "tim3.sqlite3")
    with urllib.request.urlopen(base + "/api/health", timeout=10) as response:
        assert response.status == 200
    verified = manage(app_env, "verify")
    assert "verify: clean" in verified, verified
    request.node.user_properties.append((TIMING, f"integration_suite against `make run`: 12 PASS in {took:.2f}s"))
