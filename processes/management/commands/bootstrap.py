from django.core.management.base import BaseCommand

from processes.services import bootstrap_system, operator_address


class Command(BaseCommand):
    help = "Create and wire the TIM3 processes (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--env", choices=["test", "production"], help="defaults to TIM3_ENV")

    def handle(self, *args, env=None, **options):
        processes = bootstrap_system(environment=env)
        for name, process in processes.items():
            self.stdout.write(f"{name:14} {process.id}")
        self.stdout.write(f"{'operator':14} {operator_address()}")
