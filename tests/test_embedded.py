"""Embedded mode the way `make run` starts it: migrate, bootstrap, `manage.py
serve` (Daphne + in-process Celery worker on memory:// + sweeper thread), on
its own SQLite file, with no DATABASE_URL or REDIS_URL. Console sends from
other processes are applied within about a second and stream as hop events."""

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from processes.runtime.ids import new_id
from tests.scaled.stack import manage, serving

pytestmark = pytest.mark.embedded

ROOT = Path(__file__).resolve().parent.parent
TIMING = "tim3-timing"  # shown by the terminal summary in tests/scaled/conftest.py


@pytest.fixture
def embedded_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("TIM3_")}
    env.update(TIM3_VAR_DIR=str(tmp_path / "var"), DJANGO_SETTINGS_MODULE="tim3web.settings", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def server(embedded_env, tmp_path):
    """`manage.py migrate`, `bootstrap`, then `serve --port <free>`; yields its base URL."""
    manage(embedded_env, "migrate", "--noinput")
    manage(embedded_env, "bootstrap")
    with serving(embedded_env, tmp_path / "serve.log") as base:
        yield base


def message_row(db_path: Path, msg_id: str):
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
        return db.execute(
            "SELECT status, error, timestamp, applied_at FROM processes_message WHERE msg_id = ?", [msg_id]
        ).fetchone()


def wait_applied(db_path: Path, msg_id: str, *, timeout: float = 5.0) -> tuple[float, int]:
    """Poll the SQLite file until the message is settled: (seconds waited, applied_at - timestamp in ms)."""
    started = time.monotonic()
    while True:
        row = message_row(db_path, msg_id)
        if row and row[0] != "pending":
            assert row[0] == "applied", f"{msg_id} {row[0]}: {row[1]}"
            return time.monotonic() - started, row[3] - row[2]
        assert time.monotonic() - started < timeout, f"{msg_id} still {row and row[0]} after {timeout}s"
        time.sleep(0.01)


def test_make_run_serves_and_applies_console_sends_within_a_second(server, embedded_env, tmp_path, request):
    from websockets.sync.client import connect

    db_path = tmp_path / "var" / "tim3.sqlite3"
    assert db_path.exists(), "embedded mode must use its own SQLite file under TIM3_VAR_DIR"
    ws_url = server.replace("http://", "ws://") + "/ws/flows/"
    recipient = new_id()

    with connect(ws_url, origin=server, open_timeout=10) as ws:
        # The faucet (the operator owns USDA), then a transfer from the operator's wallet.
        mint_id = manage(embedded_env, "send", "usda", "Mint", "Quantity=1000000").split()[-1]
        wait_applied(db_path, mint_id)
        transfer_id = manage(embedded_env, "send", "usda", "Transfer", f"Recipient={recipient}", "Quantity=5").split()[-1]
        waited, applied_ms = wait_applied(db_path, transfer_id)
        assert applied_ms <= 1000, f"the transfer took {applied_ms} ms from commit to applied (SPEC: within a second)"

        hops = {}
        deadline = time.monotonic() + 10
        while not {"Transfer", "Credit-Notice"} <= hops.keys():
            assert time.monotonic() < deadline, f"no hop events for the transfer; saw {sorted(hops)}"
            event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if event.get("type") == "hop" and event["flow"] == transfer_id:
                hops[event["message"]["action"]] = event["message"]

    assert hops["Transfer"]["id"] == transfer_id and hops["Transfer"]["status"] == "applied"
    assert hops["Transfer"]["slot"] is not None
    assert hops["Credit-Notice"]["target"] == recipient and hops["Credit-Notice"]["tags"]["Quantity"] == "5"

    # The same answer through the console, in a separate process (`--wait` relies on the server's worker).
    balance = manage(embedded_env, "send", "usda", "Balance", f"Recipient={recipient}", "--wait", "--timeout", "10")
    assert "Balance-Response" in balance and "Balance=5 " in balance, balance

    request.node.user_properties.append(
        (TIMING, f"transfer applied {applied_ms} ms after commit (seen by polling {waited * 1000:.0f} ms after `send` returned)")
    )
