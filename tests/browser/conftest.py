"""A live TIM3web for the browser tests: its own SQLite file and var dir, real
delivery (`manage.py serve`: Daphne + in-process Celery worker), an admin from
`createsuperuser --noinput`, and Debian's chromium driven by Playwright."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.scaled.stack import orphan_guard

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
ADMIN = ("admin", "admin-pass-4821")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def manage(env, *args, timeout: float = 180) -> str:
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"manage.py {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def live_server_url(tmp_path_factory):
    """migrate, bootstrap, createsuperuser, then `serve --port <free>`; yields the base URL."""
    tmp = tmp_path_factory.mktemp("tim3-browser")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("TIM3_")}
    env.update(TIM3_VAR_DIR=str(tmp / "var"), TIM3_ENV="test", DJANGO_SETTINGS_MODULE="tim3web.settings",
               PYTHONUNBUFFERED="1", DJANGO_SUPERUSER_USERNAME=ADMIN[0], DJANGO_SUPERUSER_PASSWORD=ADMIN[1],
               DJANGO_SUPERUSER_EMAIL="admin@example.com")
    manage(env, "migrate", "--noinput")
    manage(env, "bootstrap")
    manage(env, "createsuperuser", "--noinput")
    port = free_port()
    log_path = tmp / "serve.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen([*orphan_guard(), sys.executable, "manage.py", "serve", "--port", str(port)], cwd=ROOT,
                                 env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert popen.poll() is None, f"serve exited with {popen.returncode}:\n{log_path.read_text()}"
            try:
                with urllib.request.urlopen(base + "/", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"serve did not answer within 60s:\n{log_path.read_text()}"
            time.sleep(0.1)
        yield base
        log_text = log_path.read_text(errors="replace")
        assert "Traceback" not in log_text, f"the server logged an exception:\n{log_text[-6000:]}"
    finally:
        popen.terminate()
        try:
            popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            popen.kill()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (make browser)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def screenshots():
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
