"""Where a hop's time goes: drain N deposit flows in this process and count.

    DATABASE_URL=... REDIS_URL=... .venv/bin/python scripts/profile_engine.py [--flows 200] [--pyinstrument]

No broker, no HTTP: the flows are started with `request_deposit` and drained
with `run_until_idle` (the same `drain_mailbox` the workers run), so the
figures are the engine's own cost per hop: queries, Python, and hop publishing.
"""

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tim3web.settings")
os.environ["TIM3_DOORBELL"] = "none"

import django  # noqa: E402

django.setup()

from django.db import connection  # noqa: E402

from processes.actions import request_deposit, request_faucet  # noqa: E402
from processes.runtime.delivery import run_until_idle  # noqa: E402
from processes.services import ensure_wallet  # noqa: E402


class QueryCounter:
    def __init__(self):
        self.count, self.seconds, self.kinds = 0, 0.0, Counter()
        self.waited = 0  # statements sent on their own, each waiting for its answer (not in a pipeline)

    def __call__(self, execute, sql, params, many, context):
        self.waited += getattr(context["connection"].connection, "_pipeline", None) is None
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.seconds += time.perf_counter() - started
            self.count += 1
            self.kinds[sql.split()[0].upper() + " " + _table(sql)] += 1


def _table(sql: str) -> str:
    for word in ("FROM", "INTO", "UPDATE"):
        if f"{word} " in sql:
            return sql.split(f"{word} ", 1)[1].split()[0].strip('"')
    return ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flows", type=int, default=200)
    parser.add_argument("--wallets", type=int, default=20)
    parser.add_argument("--pyinstrument", action="store_true")
    parser.add_argument("--follow", action="store_true",
                        help="one flow at a time, each followed hop by hop as a worker does (latency, no batching)")
    args = parser.parse_args()
    wallets = [ensure_wallet(label=f"profile-{i}-{time.time_ns()}").address for i in range(args.wallets)]
    for w in wallets:
        request_faucet(wallet=w, quantity=str(1_000 * 10**6))
    run_until_idle()
    if args.follow and not args.pyinstrument:
        return follow_flows(wallets, args.flows)
    if args.follow:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0002)
        with profiler:
            follow_flows(wallets, args.flows)
        return print(profiler.output_text(unicode=True, color=False))
    for i in range(args.flows):
        request_deposit(wallet=wallets[i % len(wallets)], quantity=str(10**6))
    counter = QueryCounter()
    profiler = None
    if args.pyinstrument:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
    started = time.perf_counter()
    with connection.execute_wrapper(counter):
        hops = run_until_idle()
    seconds = time.perf_counter() - started
    if profiler:
        profiler.stop()
        print(profiler.output_text(unicode=True, color=False, show_all=False))
    print(f"{hops} hops in {seconds:.2f} s: {hops / seconds:.0f} hops/s, {counter.count / hops:.1f} queries/hop, "
          f"{counter.seconds / seconds:.0%} of the time waiting on queries")
    for kind, n in counter.kinds.most_common(25):
        print(f"  {n / hops:6.2f}/hop  {kind}")


def follow_flows(wallets: list[str], flows: int) -> None:
    """Each deposit drained hop by hop the way a worker follows a cascade: the
    engine's share of a flow's latency (no HTTP, no broker)."""
    from statistics import median

    from django.conf import settings

    from processes.runtime.delivery import collecting_doorbells
    from processes.tasks import follow_cascade

    settings.TIM3_DOORBELL = "celery"  # rung doorbells go to the follower's collector, never the broker
    counter, times = QueryCounter(), []
    with connection.execute_wrapper(counter):
        for i in range(flows):
            flow = request_deposit(wallet=wallets[i % len(wallets)], quantity=str(10**6))
            started = time.perf_counter()
            with collecting_doorbells() as rung:
                rung.add(flow.target)
                follow_cascade(rung, seconds=5)
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    print(f"{flows} deposits followed one at a time: p50 {median(times):.1f} ms, p99 {times[int(0.99 * (flows - 1))]:.1f} ms "
          f"per flow, {counter.count / flows:.1f} queries per flow (incl. the request's; "
          f"{counter.waited / flows:.1f} of them sent alone, the rest pipelined), "
          f"{counter.seconds / (sum(times) / 1000):.0%} of the time waiting on queries")
    for kind, n in counter.kinds.most_common(30):
        print(f"  {n / flows:6.2f}/flow  {kind}")


if __name__ == "__main__":
    main()
