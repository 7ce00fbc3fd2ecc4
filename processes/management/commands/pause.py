from django.core.management.base import BaseCommand, CommandError

from processes.actions import ActionError, request_pause
from processes.services import operator_address


class Command(BaseCommand):
    help = "Emergency pause of every coordinator, from the operator (owner) wallet."

    def add_arguments(self, parser):
        parser.add_argument("--scope", choices=["mint", "redeem", "all"], default="all")
        parser.add_argument("--reason", required=True)

    def handle(self, *args, scope, reason, **options):
        try:
            flows = request_pause(wallet=operator_address(), scope=scope, reason=reason, role="admin")
        except ActionError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"pause ({scope}) sent to {len(flows)} coordinator(s): " + " ".join(f.id for f in flows))
