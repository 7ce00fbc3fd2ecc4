import json

from django.core.management.base import BaseCommand, CommandError

from tim3web.bench import run_bench


class Command(BaseCommand):
    help = ("Run deposit/redeem flows through the real stack of the current mode and print figures "
            "(hops/s, flows/s, flow latency, websocket lag, lost, duplicated).")

    def add_arguments(self, parser):
        parser.add_argument("--flows", type=int, default=200)
        parser.add_argument("--concurrency", type=int, default=8, help="clients, each one flow at a time")
        parser.add_argument("--rate", type=float, help="open loop: offer this many flows per second instead")
        parser.add_argument("--workers", type=int, default=2, help="celery worker processes (scaled mode)")
        parser.add_argument("--mix", choices=["deposit", "mix", "v1"], default="mix",
                            help="deposit: v2 deposits only; mix: v2 deposits and redemptions; v1: lock/burn")
        parser.add_argument("--url", help="bench an already-running server instead of starting one")
        parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one flow")
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--pgbench", type=int, default=0, metavar="SECONDS",
                            help="afterwards, run `pgbench -N -c 1` this long for reference (Postgres only)")

    def handle(self, *args, **o):
        try:
            figures = run_bench(flows=o["flows"], concurrency=o["concurrency"], workers=o["workers"], rate=o["rate"],
                                mix=o["mix"], url=o["url"], timeout=o["timeout"],
                                pgbench_seconds=o["pgbench"])
        except RuntimeError as exc:  # bench's own refusals and failures: a message, not a traceback
            raise CommandError(str(exc)) from exc
        if o["json"]:
            self.stdout.write(json.dumps(figures))
            return
        for key, value in figures.items():
            self.stdout.write(f"{key:14} {value}")
