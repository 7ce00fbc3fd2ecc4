from django.core.management.base import BaseCommand

from processes.runtime.delivery import processes_with_pending, ring_doorbells, run_until_idle


class Command(BaseCommand):
    help = "Re-ring the doorbell of every process with pending messages (or drain them here with --drain)."

    def add_arguments(self, parser):
        parser.add_argument("--drain", action="store_true", help="apply them in this process instead of the workers")

    def handle(self, *args, drain=False, **options):
        targets = processes_with_pending()
        if drain:
            applied = run_until_idle()
            self.stdout.write(f"applied {applied} messages in this process")
        else:
            ring_doorbells(targets)
            self.stdout.write(f"rang {len(targets)} doorbell(s)")
        self.stdout.write(f"still pending: {len(processes_with_pending())} process(es)")
