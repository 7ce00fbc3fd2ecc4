"""A live TIM3web for the browser tests: its own SQLite file and var dir, real
delivery (`manage.py serve`: Daphne + in-process Celery worker), an admin from
`createsuperuser --noinput`, and Debian's chromium driven by Playwright."""

import os
from pathlib import Path

import pytest

from tests.scaled.stack import manage, serving

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
ADMIN = ("admin", "admin-pass-4821")


@pytest.fixture(scope="module")
def live_server_url(tmp_path_factory):
    """migrate, bootstrap, createsuperuser, then `serve --port <free>`; yields the base URL."""
    tmp = tmp_path_factory.mktemp("tim3-browser")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("TIM3_")}
    env.update(TIM3_VAR_DIR=str(tmp / "var"), TIM3_ENV="test", DJANGO_SETTINGS_MODULE="tim3web.settings",
               PYTHONUNBUFFERED="1", DJANGO_SUPERUSER_USERNAME=ADMIN[0], DJANGO_SUPERUSER_PASSWORD=ADMIN[1],
               DJANGO_SUPERUSER_EMAIL="admin@example.com")
    manage(env, "migrate", "--noinput", timeout=180)
    manage(env, "bootstrap", timeout=180)
    manage(env, "createsuperuser", "--noinput", timeout=180)
    log_path = tmp / "serve.log"
    with serving(env, log_path) as base:
        yield base
        log_text = log_path.read_text(errors="replace")
        assert "Traceback" not in log_text, f"the server logged an exception:\n{log_text[-6000:]}"


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
