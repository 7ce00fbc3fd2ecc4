import os

from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Serve the whole app: web + websocket (Daphne), Celery worker and scheduler in this process."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--no-worker", action="store_true", help="web only (scaled mode runs workers apart)")

    def handle(self, *args, port, host, no_worker, **options):
        from daphne.cli import CommandLineInterface

        from tim3web.embedded import start_background_services

        if not no_worker:
            start_background_services()
        self.stdout.write(f"TIM3web ({settings.TIM3_MODE} mode, {settings.TIM3_ENV} env) on http://{host}:{port}/")
        self.stdout.write("Log in: sign up at /signup, or create an admin with `python manage.py createsuperuser`.")
        self.stdout.flush()
        CommandLineInterface().run(["-b", host, "-p", str(port), "--proxy-headers", "tim3web.asgi:application"])
