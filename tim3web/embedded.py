"""Embedded mode's background services, in the web server's own process:
an in-process Celery worker (memory:// broker) and a scheduler thread that
does what `celery beat` does in scaled mode."""

import logging
import threading
import time

from django.conf import settings
from django.db import close_old_connections

log = logging.getLogger(__name__)


def start_celery_worker() -> threading.Thread:
    from celery.worker import WorkController

    from tim3web.celery import app

    worker = WorkController(
        app=app, pool_cls="solo", concurrency=1, loglevel="WARNING",
        without_heartbeat=True, without_mingle=True, without_gossip=True,
    )
    thread = threading.Thread(target=worker.start, name="celery-worker", daemon=True)
    thread.start()
    return thread


def run_scheduler(stop: threading.Event, *, sweep_every: float = 0.1, sweep_after_ms: int = 200) -> None:
    """Sweep often: in embedded mode a console `send` from another process
    cannot ring this process's memory broker, so the sweeper is its doorbell."""
    from processes.runtime.delivery import sweep_mailboxes
    from processes.scheduler import run_due_jobs

    while not stop.is_set():
        try:
            sweep_mailboxes(older_than_ms=sweep_after_ms)
            run_due_jobs(now=time.monotonic())
        except Exception:
            log.exception("scheduler tick failed")
        finally:
            close_old_connections()
        stop.wait(sweep_every)


def start_background_services() -> threading.Event:
    stop = threading.Event()
    start_celery_worker()
    threading.Thread(target=run_scheduler, args=(stop,), name="scheduler", daemon=True).start()
    log.info("embedded services started (mode=%s)", settings.TIM3_MODE)
    return stop
