"""Periodic jobs (AO Cron style). Celery beat runs them in scaled mode;
the embedded scheduler thread runs `run_due_jobs` in embedded mode."""

from collections.abc import Callable

# name -> (interval seconds, function); filled in by the blueprints that need cron.
JOBS: dict[str, tuple[float, Callable[[], object]]] = {}
_last_run: dict[str, float] = {}


def register_job(name: str, every: float, fn: Callable[[], object]) -> None:
    JOBS[name] = (every, fn)


def run_due_jobs(*, now: float) -> list[str]:
    ran = []
    for name, (every, fn) in JOBS.items():
        if now - _last_run.get(name, float("-inf")) >= every:
            _last_run[name] = now
            fn()
            ran.append(name)
    return ran
