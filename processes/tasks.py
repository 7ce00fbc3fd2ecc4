"""Celery tasks: thin doorbells around the engine's delivery functions."""

import logging
import time

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections

from processes.runtime.delivery import (
    ProcessBusy,
    collecting_doorbells,
    drain_mailbox,
    record_drain_failure,
    ring_doorbells,
    sweep_mailboxes,
)

log = logging.getLogger(__name__)


def follow_cascade(rung: set[str], *, seconds: float) -> None:
    """Drain the processes the last drain woke, and those they wake, for a short
    while; the caller rings the rest. Any failure is left to a real task (retries,
    dead letters).

    A process another worker is draining is put aside while there is other work;
    when only such processes are left, this worker waits for one's lock (its
    drainer may have read its batch before our message arrived, so it must be
    drained again; polling instead would burn the CPU the drainer needs).
    """
    deadline = time.monotonic() + seconds
    stuck = False  # the last pass drained nothing: every process left was busy
    while rung and time.monotonic() < deadline:
        busy, drained = set(), False
        for process_id in sorted(rung):
            rung.discard(process_id)
            try:
                drain_mailbox(process_id=process_id, wait=stuck or (not busy and not rung),
                              follow=settings.TIM3_FOLLOW_DRAINS)
                drained = True
            except ProcessBusy:
                busy.add(process_id)
            except Exception:
                log.warning("following the cascade into %s failed; ringing its doorbell", process_id, exc_info=True)
                close_old_connections()
                rung.update(busy, {process_id})
                return
        stuck = not drained
        rung.update(busy)


@shared_task(bind=True, max_retries=None, acks_late=True, reject_on_worker_lost=True)
def drain(self, process_id: str, isolate: bool = False) -> int:
    """Apply `process_id`'s pending messages. Duplicate and late calls are no-ops."""
    close_old_connections()
    try:
        with collecting_doorbells() as rung:
            applied = drain_mailbox(process_id=process_id, batch_size=1 if isolate else None,
                                    follow=0 if isolate else settings.TIM3_FOLLOW_DRAINS)
            follow_cascade(rung, seconds=settings.TIM3_FOLLOW_SECONDS)
        ring_doorbells(rung)
        return applied
    except (OperationalError, InterfaceError) as exc:  # transient (lost connection, deadlock, lock timeout): nothing applied
        # Not DataError/IntegrityError/ProgrammingError: those repeat on every try, so they
        # go below, where they count toward dead-lettering instead of blocking the mailbox forever.
        close_old_connections()
        raise self.retry(exc=exc, countdown=min(0.1 * 2 ** self.request.retries, 5)) from exc
    except Exception as exc:
        log.exception("draining %s failed", process_id)
        record_drain_failure(process_id=process_id, error=f"{type(exc).__name__}: {exc}")
        # Retry one message at a time, so a poisoned message is found and dead-lettered.
        raise self.retry(exc=exc, countdown=min(0.1 * 2 ** self.request.retries, 5), kwargs={"isolate": True}) from exc


@shared_task(acks_late=True)
def sweep() -> int:
    """Ring again for messages pending too long (a lost doorbell, a dead worker)."""
    close_old_connections()
    return len(sweep_mailboxes())


@shared_task(acks_late=True)
def cleanup_expired() -> int:
    """AO-Cron tick: coordinators look at operations pending past PendingTimeout."""
    from processes.services import send_cleanup_expired

    close_old_connections()
    return len(send_cleanup_expired())


@shared_task(acks_late=True)
def check_risk_alerts() -> int:
    from processes.services import send_check_risk_alerts

    close_old_connections()
    return len(send_check_risk_alerts())


@shared_task(acks_late=True)
def vacuum_mailbox() -> int:
    """Keep the mailbox's pending index lean (processes.services.vacuum_busy_tables)."""
    from processes.services import vacuum_busy_tables

    close_old_connections()
    return len(vacuum_busy_tables())


@shared_task(acks_late=True)
def analyze_mailbox() -> int:
    """Refresh the mailbox tables' planner statistics (hourly: see vacuum_busy_tables)."""
    from processes.services import vacuum_busy_tables

    close_old_connections()
    return len(vacuum_busy_tables(analyze=True))

