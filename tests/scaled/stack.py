"""The real scaled-mode services for tests: `celery -A tim3web worker` and
`beat` subprocesses pointed at pytest-django's Postgres test database and the
test Redis db, and helpers to wait for the engine to be idle."""

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOST = "tim3test"  # worker node names are <name>-<run>@tim3test


def orphan_guard() -> list[str]:
    """A command prefix that gets a subprocess SIGTERM if pytest itself dies (even by SIGKILL),
    so no worker outlives the run holding the test database open."""
    setpriv = shutil.which("setpriv")  # util-linux
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


_spawn_requests: queue.Queue = queue.Queue()
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def _spawn_loop() -> None:
    while True:
        args, kwargs, box, done = _spawn_requests.get()
        try:
            box.append(subprocess.Popen(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box.append(exc)
        done.set()


def guarded_popen(*args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen, always from a thread that lives as long as pytest.

    PR_SET_PDEATHSIG (orphan_guard) fires when the *thread* that started the
    child exits, not the process: a worker started by a short-lived thread (the
    fault injector) would get SIGTERM the moment that thread ended.
    """
    global _spawner
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(*args, **kwargs)
    with _spawner_lock:
        if _spawner is None:
            _spawner = threading.Thread(target=_spawn_loop, name="tim3-spawner", daemon=True)
            _spawner.start()
    box, done = [], threading.Event()
    _spawn_requests.put((args, kwargs, box, done))
    done.wait()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def scaled_env_problem() -> str | None:
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://", "pgsql://")):
        return "scaled tests need DATABASE_URL=postgres://… (they run in the Postgres pass of `make test`)"
    if not os.environ.get("REDIS_URL", "").startswith("redis://"):
        return "scaled tests need REDIS_URL=redis://…"
    return None


TIMING = "tim3-timing"  # user property: a measured figure, shown at the end of the run


def worker_database_url() -> str:
    """A DATABASE_URL for pytest-django's test database (exists once `django_db_setup` ran)."""
    from django.db import connection

    s = connection.settings_dict
    auth = quote(s.get("USER") or "", safe="")
    if s.get("PASSWORD"):
        auth += ":" + quote(s["PASSWORD"], safe="")
    host = s.get("HOST") or "localhost"
    port = f":{s['PORT']}" if s.get("PORT") else ""
    return f"postgres://{auth + '@' if auth else ''}{host}{port}/{quote(s['NAME'], safe='')}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def purge_broker(redis_url: str | None = None) -> None:
    """Empty the Celery queue of the test Redis db, including tasks a killed worker left unacked."""
    import redis

    from tim3web.celery import app

    app.control.purge()
    client = redis.Redis.from_url(redis_url or os.environ["REDIS_URL"])
    client.delete("celery", "unacked", "unacked_index", "unacked_mutex")
    client.close()


def reset_broker_connections() -> None:
    """Forget this process's pooled broker connections (after the broker restarted they are dead)."""
    from kombu import pools

    from tim3web.celery import app

    pools.reset()  # closes every pooled connection and forgets the pools (they are shared by URL)
    app._pool = None
    app.amqp._producer_pool = None


@contextmanager
def celery_broker(url: str):
    """Point this (the test) process's Celery app at another broker for a while:
    doorbells it rings, pings and purges go there."""
    from tim3web.celery import app

    def switch(to: str) -> None:
        reset_broker_connections()
        # Celery 5.6 reads the Django-namespaced key first, so set both.
        app.conf.broker_url = app.conf.CELERY_BROKER_URL = to

    previous = app.conf.broker_url
    switch(url)
    try:
        yield app
    finally:
        switch(previous)


class RedisServer:
    """A private `redis-server` (no persistence) on a free port, that a test may
    shut down (`SHUTDOWN NOSAVE`: everything queued is lost) and start again on
    the same port, without disturbing the machine's shared Redis."""

    def __init__(self, *, log_dir: Path, port: int | None = None):
        self.port = port or free_port()
        self.dir = log_dir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.popen: subprocess.Popen | None = None
        self.restarts = 0

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("redis-server") and shutil.which("redis-cli"))

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def ping(self) -> bool:
        result = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "ping"],
                                capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        return result.stdout.strip() == "PONG"

    def start(self, *, timeout: float = 20.0) -> None:
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--daemonize", "no"]
        with open(self.dir / "redis.log", "ab") as log:
            self.popen = guarded_popen(orphan_guard() + argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.popen.poll() is not None:
                pytest.fail(f"redis-server exited with {self.popen.returncode}: {(self.dir / 'redis.log').read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server on port {self.port} did not answer within {timeout}s")
            time.sleep(0.05)

    def shutdown(self) -> None:
        """`redis-cli shutdown nosave`: the server exits and forgets everything it held."""
        if self.popen is None or self.popen.poll() is not None:
            return
        subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "shutdown", "nosave"],
                       capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)

    def restart(self, *, down_for: float = 0.0) -> None:
        self.shutdown()
        time.sleep(down_for)
        self.start()
        self.restarts += 1


@dataclass
class Service:
    """One subprocess: a Celery worker or beat."""

    name: str
    kind: str  # "worker" or "beat"
    popen: subprocess.Popen
    log_path: Path
    env: dict = field(repr=False)
    extra_env: dict = field(default_factory=dict)
    url: str = ""  # a web service's base URL

    @property
    def nodename(self) -> str:
        return f"{self.name}@{HOST}"

    @property
    def appname(self) -> str:  # its Postgres application_name (PGAPPNAME)
        return f"tim3-{self.name}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Scaled:
    """Starts, kills and restarts real Celery processes pointed at the test database."""

    def __init__(self, *, log_dir: Path, redis_url: str | None = None):
        self.log_dir = log_dir
        self.redis_url = redis_url or os.environ["REDIS_URL"]
        self.run = uuid.uuid4().hex[:6]
        self.services: list[Service] = []
        self.base_env = self._base_env()

    def _base_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TIM3_", "PYTEST_"))}
        env.update(
            DATABASE_URL=worker_database_url(),
            REDIS_URL=self.redis_url,
            DJANGO_SETTINGS_MODULE="tim3web.settings",
            TIM3_DOORBELL="celery",
            TIM3_VAR_DIR=str(self.log_dir / "var"),
            PYTHONUNBUFFERED="1",
        )
        return env

    # --- workers ------------------------------------------------------------------

    def start_worker(self, name: str | None = None, *, wait: bool = True, **extra_env: str) -> Service:
        """`celery -A tim3web worker -P solo` as a subprocess; waits until it answers a ping."""
        name = name or f"w{len([s for s in self.services if s.kind == 'worker']) + 1}"
        name = f"{name}-{self.run}"
        env = {**self.base_env, **{k: str(v) for k, v in extra_env.items()}, "PGAPPNAME": f"tim3-{name}"}
        argv = [
            sys.executable, "-m", "celery", "-A", "tim3web", "worker", "-P", "solo", "-c", "1",
            "--without-heartbeat", "--without-mingle", "--without-gossip", "-n", f"{name}@{HOST}", "-l", "WARNING",
        ]
        service = self._spawn(name, "worker", argv, env)
        service.extra_env = dict(extra_env)
        if wait:
            self.wait_ready(service)
        return service

    def start_workers(self, count: int, **extra_env: str) -> list[Service]:
        started = [self.start_worker(wait=False, **extra_env) for _ in range(count)]
        for service in started:
            self.wait_ready(service)
        return started

    def wait_ready(self, service: Service, *, timeout: float = 60.0) -> None:
        from tim3web.celery import app

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not service.alive():
                pytest.fail(f"worker {service.name} exited with {service.popen.returncode}:\n{service.log_tail()}")
            # A solo worker answers between tasks, so a busy one answers late: keep asking.
            try:
                if app.control.ping(destination=[service.nodename], timeout=0.5):
                    return
            except Exception:  # noqa: BLE001 - the broker restarted under our pooled connection
                reset_broker_connections()
                time.sleep(0.2)
        if service.alive():  # what is it doing? (Celery dumps every thread's stack on SIGUSR1)
            service.popen.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
        pytest.fail(f"worker {service.name} did not answer a ping within {timeout}s:\n{service.log_tail(80)}")

    def kill(self, service: Service, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to that one process (by its pid) and reap it."""
        if service.alive():
            service.popen.send_signal(sig)
        return service.popen.wait(timeout=30)

    def restart(self, service: Service, *, sig: int = signal.SIGKILL, **extra_env: str) -> Service:
        """Kill one worker and start a fresh one in its place (new node name, same settings)."""
        self.kill(service, sig)
        return self.start_worker(service.name.rsplit("-", 1)[0] + "r", **{**service.extra_env, **extra_env})

    def workers(self, *, alive: bool = True) -> list[Service]:
        return [s for s in self.services if s.kind == "worker" and (s.alive() or not alive)]

    # --- web ------------------------------------------------------------------------

    def start_web(self, *, settings_module: str | None = None, timeout: float = 60.0, **extra_env: str) -> Service:
        """`daphne -b 127.0.0.1 -p <free> tim3web.asgi:application`, the same env as the workers;
        waits until GET /api/health answers 200."""
        import urllib.request

        port = free_port()
        name = f"web-{self.run}-{port}"
        env = {**self.base_env, **{k: str(v) for k, v in extra_env.items()}, "PGAPPNAME": f"tim3-{name}"}
        if settings_module:
            env["DJANGO_SETTINGS_MODULE"] = settings_module
        argv = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "tim3web.asgi:application"]
        service = self._spawn(name, "web", argv, env)
        service.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            if not service.alive():
                pytest.fail(f"daphne exited with {service.popen.returncode}:\n{service.log_tail()}")
            try:
                with urllib.request.urlopen(service.url + "/api/health", timeout=5) as response:
                    if response.status == 200:
                        return service
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"daphne did not answer within {timeout}s:\n{service.log_tail()}")
            time.sleep(0.2)

    # --- beat -----------------------------------------------------------------------

    def start_beat(self, **extra_env: str) -> Service:
        """`celery -A tim3web beat` with a schedule file of its own."""
        name = f"beat-{self.run}"
        schedule = self.log_dir / f"{name}-schedule"
        env = {**self.base_env, **{k: str(v) for k, v in extra_env.items()}}
        argv = [sys.executable, "-m", "celery", "-A", "tim3web", "beat", "-s", str(schedule), "-l", "WARNING"]
        service = self._spawn(name, "beat", argv, env)
        time.sleep(0.5)
        if not service.alive():
            pytest.fail(f"celery beat exited with {service.popen.returncode}:\n{service.log_tail()}")
        return service

    # --- plumbing -------------------------------------------------------------------

    def _spawn(self, name: str, kind: str, argv: list[str], env: dict) -> Service:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = guarded_popen(
                orphan_guard() + argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest does not reach it; we stop it ourselves
            )
        service = Service(name=name, kind=kind, popen=popen, log_path=log_path, env=env)
        self.services.append(service)
        return service

    def check_alive(self) -> None:
        for service in self.services:
            if service.alive() or service.popen.returncode in (-signal.SIGKILL, -signal.SIGTERM, 0):
                continue
            pytest.fail(f"{service.kind} {service.name} died ({service.popen.returncode}):\n{service.log_tail()}")

    def logs(self) -> str:
        return "\n".join(f"--- {s.kind} {s.name} ---\n{s.log_tail(15)}" for s in self.services)

    def stop_all(self) -> None:
        for service in self.services:
            if service.alive():
                service.popen.send_signal(signal.SIGTERM)  # warm shutdown: finish the current task
        for service in self.services:
            try:
                service.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                service.popen.kill()
                service.popen.wait(timeout=10)


# --- helpers for the tests -------------------------------------------------------------

def pending_count() -> int:
    from processes.runtime.models import Message

    return Message.objects.filter(status=Message.PENDING).count()


def broker_backlog(redis_url: str | None = None) -> int:
    """Doorbells queued in Redis or delivered to a worker and not yet acknowledged."""
    import redis

    client = redis.Redis.from_url(redis_url or os.environ["REDIS_URL"])
    try:
        return client.llen("celery") + client.hlen("unacked")
    finally:
        client.close()


def wait_until_idle(
    scaled: Scaled | None = None, *, timeout: float = 180.0, sweep_every: float | None = None, quiet_broker: bool = True,
) -> float:
    """Wait until no message is pending; return the seconds it took.

    With `quiet_broker`, also until no doorbell is queued or running, so a
    later send without a doorbell really stays pending (a late doorbell would
    drain it). A generous deadline, not a speed check: exceeding it fails with
    what is still pending and the workers' logs. `sweep_every` enqueues the
    sweep task periodically, as `celery beat` would.
    """
    from processes.runtime.models import Message
    from processes.tasks import sweep

    start = time.monotonic()
    last_sweep = start
    while True:
        pending = pending_count()
        if pending == 0 and not (quiet_broker and broker_backlog(scaled.redis_url if scaled else None)):
            return time.monotonic() - start
        now = time.monotonic()
        if now - start > timeout:
            by_target = list(
                Message.objects.filter(status=Message.PENDING).values_list("target", "action")[:10]
            )
            pytest.fail(
                f"{pending} message(s) still pending, "
                f"{broker_backlog(scaled.redis_url if scaled else None)} doorbell(s) in Redis, "
                f"after {timeout:.0f}s (e.g. {by_target}).\n"
                + (scaled.logs() if scaled else "")
            )
        if scaled is not None:
            scaled.check_alive()
        if sweep_every is not None and now - last_sweep >= sweep_every:
            sweep.delay()
            last_sweep = now
        time.sleep(0.05)


def verify_clean() -> None:
    """`manage.py verify` (invariants + replay) must be clean."""
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    try:
        call_command("verify", stdout=out)
    except SystemExit:
        pytest.fail("manage.py verify found problems:\n" + out.getvalue())
    assert "verify: clean" in out.getvalue()


def report(request, text: str) -> None:
    """A figure worth seeing in the run's output (the TIM3 timings section), not an assertion."""
    request.node.user_properties.append((TIMING, text))


def summarize_figures(terminalreporter, *, name: str, title: str) -> None:
    """pytest_terminal_summary body: every `name` user property of this run, under `title`."""
    lines = [
        f"{report.nodeid.split('::')[-1]}: {value}"
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for prop, value in getattr(report, "user_properties", ())
        if prop == name
    ]
    if lines:
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def require_postgres_and_redis():
    """Imported by the conftest of every suite that runs the scaled stack."""
    problem = scaled_env_problem()
    if problem:
        pytest.skip(problem)


def drains_run(services) -> dict[str, int]:
    """How many drain tasks each worker ran (Celery's own counters)."""
    from tim3web.celery import app

    stats = app.control.inspect(destination=[s.nodename for s in services], timeout=5).stats() or {}
    return {node: s.get("total", {}).get("processes.tasks.drain", 0) for node, s in stats.items()}


def in_threads(calls: list, *, threads: int = 10) -> list:
    """Call each zero-argument callable, from `threads` threads started together; results in order."""
    from django.db import connections

    results: list = [None] * len(calls)
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def run(indices):
        try:
            barrier.wait()
            for i in indices:
                results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connections.close_all()  # this thread's connection

    pool = [threading.Thread(target=run, args=(range(k, len(calls), threads),)) for k in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors, f"calls failed: {errors[:3]}"
    return results


def manage(env: dict, *args, timeout: float = 120) -> str:
    """`manage.py <args>` as a subprocess with `env`; its stdout, or the test fails with its output."""
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"manage.py {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@contextmanager
def serving(env: dict, log_path: Path, *, probe: str = "/"):
    """`manage.py serve --port <free>` (what `make run` starts) until it answers `probe`
    with 200; yields its base URL, and stops it afterwards."""
    import urllib.request

    port = free_port()
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [*orphan_guard(), sys.executable, "manage.py", "serve", "--port", str(port)], cwd=ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert popen.poll() is None, f"serve exited with {popen.returncode}:\n{log_path.read_text()}"
            try:
                with urllib.request.urlopen(base + probe, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"serve did not answer within 60s:\n{log_path.read_text()}"
            time.sleep(0.1)
        yield base
    finally:
        popen.terminate()
        try:
            popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=10)
