from django.core.management.base import BaseCommand

from processes.invariants import check_invariants
from processes.runtime.replay import replay_all


class Command(BaseCommand):
    help = "Check every invariant and replay the message log into scratch state; exit 1 on any difference."

    def add_arguments(self, parser):
        parser.add_argument("--no-replay", action="store_true")

    def handle(self, *args, no_replay=False, **options):
        problems = check_invariants()
        for line in problems:
            self.stdout.write(f"INVARIANT  {line}")
        if not no_replay:
            report = replay_all()
            for line in report.differences:
                self.stdout.write(f"REPLAY     {line}")
            problems += report.differences
            self.stdout.write(f"replayed {report.messages} messages of {report.processes} processes")
        if problems:
            self.stdout.write(f"verify: {len(problems)} problem(s)")
            raise SystemExit(1)
        self.stdout.write("verify: clean")
