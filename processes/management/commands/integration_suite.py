from django.core.management.base import BaseCommand

from processes.integration_suite import Suite, format_table


class Command(BaseCommand):
    help = "SPEC §6 system check against the running system; exit 1 on any failed check."

    def add_arguments(self, parser):
        parser.add_argument("--drive", action="store_true",
                            help="deliver messages in this process (when no worker is running)")
        parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each flow")

    def handle(self, *args, drive=False, timeout=30.0, **options):
        results = Suite(drive=drive, timeout=timeout).run()
        self.stdout.write(format_table(results))
        if not all(r.passed for r in results):
            raise SystemExit(1)
