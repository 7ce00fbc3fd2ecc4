from django.core.management.base import BaseCommand, CommandError

from processes.actions import ActionError, request_resume
from processes.services import operator_address


class Command(BaseCommand):
    help = "Resume every coordinator, from the operator (owner) wallet."

    def add_arguments(self, parser):
        parser.add_argument("--scope", choices=["mint", "redeem", "all"], default="all")

    def handle(self, *args, scope, **options):
        try:
            flows = request_resume(wallet=operator_address(), scope=scope)
        except ActionError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"resume ({scope}) sent to {len(flows)} coordinator(s): " + " ".join(f.id for f in flows))
