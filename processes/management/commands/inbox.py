from django.core.management.base import BaseCommand, CommandError

from processes.runtime.models import Message
from processes.services import resolve_process


class Command(BaseCommand):
    help = "Messages a process received that no handler matched (its aos Inbox)."

    def add_arguments(self, parser):
        parser.add_argument("process")
        parser.add_argument("--limit", type=int, default=20)

    def handle(self, *args, process, limit, **options):
        try:
            target = resolve_process(process)
        except LookupError as exc:
            raise CommandError(str(exc)) from exc
        rows = Message.objects.filter(target=target.id, status=Message.APPLIED, handled=False).order_by("-slot")[:limit]
        if not rows:
            self.stdout.write(f"{target.name}: inbox is empty")
        for m in rows:
            self.stdout.write(f"slot {m.slot:>6}  {m.msg_id}  from {m.sender}  Action={m.action or '-'}  {m.data[:60]}")
