"""What one `POST /api/deposits` (or redemptions) costs over HTTP: latency, queries, Daphne CPU, new DB sessions.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/tim3prof REDIS_URL=redis://127.0.0.1:6379/13 \\
        .venv/bin/python scripts/profile_http.py [--requests 200] [--port 8931] [--doorbell none|celery] \\
        [--endpoint deposits|redemptions] [--show-queries] [--pyinstrument]

Use a scratch database and Redis db (it migrates, bootstraps and writes flows there;
with --doorbell celery it empties the Celery queue afterwards, as no worker runs).
1. Queries per request: one deposit through Django's test client in this process,
   counted with CaptureQueriesContext (--show-queries prints them).
2. A real Daphne (`daphne tim3web.asgi:application`, as in the Procfile) with
   TIM3_DOORBELL=none by default (no workers needed; the flows stay pending) and the
   write rate limit raised so it never refuses: a warmed `requests` session with a Bearer
   token sends the deposits one after another. Prints the latency median/p90/p99, Daphne's
   CPU seconds per 100 requests (utime+stime from /proc) and Postgres sessions opened per
   request (pg_stat_database.sessions).
--pyinstrument profiles the in-process requests instead and prints where the time goes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tim3web.settings")
os.environ["TIM3_DOORBELL"] = "none"  # this process only counts; nothing here should drain
os.environ["TIM3_RATE_LIMIT_PER_MINUTE"] = "1000000000"

import django  # noqa: E402

django.setup()

import requests  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402

from processes.services import bootstrap_system  # noqa: E402
from tim3web.accounts import create_account  # noqa: E402
from tim3web.auth import issue_token  # noqa: E402

BODY = {"quantity": "1000000"}
USERNAME = "profile-http"
PASSWORD = "profile-http-password"


def bearer_token() -> str:
    user = get_user_model().objects.filter(username=USERNAME).first()
    if user is None:
        user = create_account(username=USERNAME, password=PASSWORD).user
    return issue_token(user)[0]


def count_queries(token: str, path: str, show: bool) -> int:
    client = Client()
    headers = {"Authorization": f"Bearer {token}"}
    client.post(path, BODY, content_type="application/json", headers=headers)  # warm caches
    with CaptureQueriesContext(connection) as queries:
        response = client.post(path, BODY, content_type="application/json", headers=headers)
    assert response.status_code == 202, response.content
    if show:
        for q in queries.captured_queries:
            print(f"  {q['time']}s  {q['sql'][:160]}")
    return len(queries)


def profile_in_process(token: str, path: str, n: int) -> None:
    from pyinstrument import Profiler

    client = Client()
    headers = {"Authorization": f"Bearer {token}"}
    with Profiler(interval=0.0002) as profiler:
        for _ in range(n):
            client.post(path, BODY, content_type="application/json", headers=headers)
    print(profiler.output_text(unicode=True, color=False, show_all=False))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def db_sessions() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        return cursor.fetchone()[0]


def start_daphne(port: int, doorbell: str) -> subprocess.Popen:
    env = {**os.environ, "TIM3_DOORBELL": doorbell}
    daphne = subprocess.Popen([str(Path(sys.executable).parent / "daphne"), "-b", "127.0.0.1", "-p", str(port),
                               "tim3web.asgi:application"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL)  # its access log
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return daphne
        except requests.ConnectionError:
            time.sleep(0.2)
    daphne.terminate()
    raise SystemExit("Daphne did not start")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(token: str, path: str, port: int, n: int, doorbell: str) -> dict:
    daphne = start_daphne(port, doorbell)
    try:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        url = f"http://127.0.0.1:{port}{path}"
        for _ in range(20):  # warm: imports, the ninja router, pools
            assert session.post(url, json=BODY).status_code == 202
        sessions = db_sessions()
        time.sleep(1.5)
        cpu = cpu_seconds(daphne.pid)
        latencies = []
        for _ in range(n):
            started = time.perf_counter()
            response = session.post(url, json=BODY)
            latencies.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 202, response.text
        cpu = cpu_seconds(daphne.pid) - cpu
        time.sleep(1.5)  # backends report their session counts to pg_stat at most once a second
        sessions = db_sessions() - sessions
    finally:
        daphne.terminate()
        daphne.wait(10)
    return {"requests": n, "ms": {"p50": round(statistics.median(latencies), 2), "p90": round(percentile(latencies, 90), 2),
                                  "p99": round(percentile(latencies, 99), 2), "mean": round(statistics.fmean(latencies), 2)},
            "daphne_cpu_s_per_100": round(cpu * 100 / n, 3), "db_sessions_per_request": round(sessions / n, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--doorbell", choices=("none", "celery"), default="none")
    parser.add_argument("--endpoint", choices=("deposits", "redemptions"), default="deposits")
    parser.add_argument("--show-queries", action="store_true")
    parser.add_argument("--pyinstrument", action="store_true")
    args = parser.parse_args()
    path = f"/api/{args.endpoint}"
    if connection.vendor != "postgresql":
        raise SystemExit("Set DATABASE_URL (Postgres) and REDIS_URL: this measures the scaled mode.")
    call_command("migrate", verbosity=0)
    bootstrap_system()
    token = bearer_token()
    if args.pyinstrument:
        profile_in_process(token, path, args.requests)
        return
    figures = {"queries_per_request": count_queries(token, path, args.show_queries)}
    connection.close()
    figures.update(measure(token, path, args.port, args.requests, args.doorbell))
    if args.doorbell == "celery":
        from tim3web.celery import app

        app.control.purge()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
