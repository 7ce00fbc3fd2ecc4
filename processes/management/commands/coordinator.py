from django.core.management.base import BaseCommand, CommandError

from processes.services import activate_coordinator, coordinators, resolve_process, rollback_coordinator, spawn_coordinator


class Command(BaseCommand):
    help = "Coordinator versions: list | spawn | activate <process> | rollback."

    def add_arguments(self, parser):
        parser.add_argument("verb", choices=["list", "spawn", "activate", "rollback"])
        parser.add_argument("process", nargs="?", help="name or id (activate)")

    def handle(self, *args, verb, process=None, **options):
        try:
            if verb == "spawn":
                p = spawn_coordinator()
                self.stdout.write(f"spawned {p.name} {p.id} (not active yet: `coordinator activate {p.name}`)")
            elif verb == "activate":
                if not process:
                    raise CommandError("activate needs a coordinator name or id.")
                p = activate_coordinator(process=resolve_process(process))
                self.stdout.write(f"active: {p.name} {p.id}")
            elif verb == "rollback":
                p = rollback_coordinator()
                self.stdout.write(f"rolled back; active: {p.name} {p.id}")
        except (LookupError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        for p in coordinators():
            self.stdout.write(f"{'*' if p.active else ' '} v{p.version:<3} {p.name:16} {p.id}")
