"""Periodic jobs (AO Cron style). Celery beat runs them in scaled mode
(settings.CELERY_BEAT_SCHEDULE); the embedded scheduler thread runs
`run_due_jobs` in embedded mode."""

from collections.abc import Callable

from django.conf import settings


def _cleanup() -> object:
    from processes.services import send_cleanup_expired

    return send_cleanup_expired()


def _risk() -> object:
    from processes.services import send_check_risk_alerts

    return send_check_risk_alerts()


def _vacuum() -> object:
    from processes.services import vacuum_busy_tables

    return vacuum_busy_tables()


def _analyze() -> object:
    from processes.services import vacuum_busy_tables

    return vacuum_busy_tables(analyze=True)


def jobs() -> dict[str, tuple[float, Callable[[], object]]]:
    return {
        "cleanup-expired": (settings.TIM3_CLEANUP_SECONDS, _cleanup),
        "check-risk-alerts": (settings.TIM3_RISK_CHECK_SECONDS, _risk),
        "vacuum-mailbox": (settings.TIM3_VACUUM_SECONDS, _vacuum),
        "analyze-mailbox": (settings.TIM3_ANALYZE_SECONDS, _analyze),
    }


_last_run: dict[str, float] = {}


def run_due_jobs(*, now: float) -> list[str]:
    ran = []
    for name, (every, fn) in jobs().items():
        if now - _last_run.get(name, float("-inf")) >= every:
            _last_run[name] = now
            fn()
            ran.append(name)
    return ran
