from django.core.management.base import BaseCommand
from django.db.models import Count, Min

from processes.blueprints.state import Operation
from processes.runtime.ids import now_ms
from processes.runtime.models import Message, Process


class Command(BaseCommand):
    help = "What is waiting: pending messages per process, dead letters, stuck or pending operations."

    def add_arguments(self, parser):
        parser.add_argument("--limit", type=int, default=20)

    def handle(self, *args, limit, **options):
        now = now_ms()
        names = dict(Process.objects.values_list("id", "name"))
        pending = (Message.objects.filter(status=Message.PENDING).values("target")
                   .annotate(n=Count("seq"), oldest=Min("timestamp")).order_by("target"))
        self.stdout.write("pending messages:" + ("" if pending else " none"))
        for row in pending:
            self.stdout.write(f"  {names.get(row['target'], row['target']):16} {row['n']:>6}  "
                              f"oldest {(now - row['oldest']) / 1000:.1f}s")
        dead = Message.objects.filter(dead=True).order_by("-seq")[:limit]
        self.stdout.write("dead letters:" + ("" if dead else " none"))
        for m in dead:
            self.stdout.write(f"  {m.msg_id} {m.action} → {names.get(m.target, m.target)} slot {m.slot}: {m.error[:100]}")
        ops = Operation.objects.filter(status=Operation.PENDING).order_by("updated_at")[:limit]
        self.stdout.write("pending operations:" + ("" if ops else " none"))
        for op in ops:
            self.stdout.write(f"  {op.op_id} {op.kind} {op.quantity} step {op.step} "
                              f"{'(expiring) ' if op.expiring else ''}waiting {(now - op.updated_at) / 1000:.1f}s "
                              f"flow {op.flow_id} {op.error[:80]}".rstrip())
