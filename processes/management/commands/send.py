from django.core.management.base import BaseCommand, CommandError

from processes.runtime.quantities import QuantityError, parse_quantity
from processes.runtime.tags import TagError
from processes.services import resolve_process, send_from_operator, wait_for_cascade

# Tags every handler reads as a quantity: refused here, before anything is sent (SPEC §2).
QUANTITY_TAGS = ("Quantity", "Amount", "CollateralAmount")


class Command(BaseCommand):
    help = "Send a message from the operator's wallet (aos `Send`). Example: send usda Balance Recipient=<addr> --wait"

    def add_arguments(self, parser):
        parser.add_argument("process", help="process name or id")
        parser.add_argument("action")
        parser.add_argument("tags", nargs="*", metavar="Name=Value")
        parser.add_argument("--data", default="")
        parser.add_argument("--wait", action="store_true", help="wait for the cascade and print the replies")
        parser.add_argument("--timeout", type=float, default=10.0)

    def handle(self, *args, process, action, tags, data, wait, timeout, **options):
        parsed = {}
        for item in tags:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise CommandError(f"Tag {item!r} must look like Name=Value.")
            if name in parsed:
                raise CommandError(f"Tag {name!r} is given twice.")
            parsed[name] = value
        for name in QUANTITY_TAGS:
            if name in parsed:
                try:
                    parse_quantity(parsed[name], name=name)
                except QuantityError as exc:
                    raise CommandError(f"{exc} Nothing was sent.") from exc
        try:
            target = resolve_process(process)
            msg = send_from_operator(process=target, action=action, tags=parsed, data=data)
        except (LookupError, TagError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(msg.msg_id)
        if not wait:
            return
        try:
            cascade = wait_for_cascade(root=msg, timeout=timeout)
        except TimeoutError as exc:
            raise CommandError(f"{exc}: is a worker running (make run, or celery -A tim3web worker)?") from exc
        for m in cascade:
            if m.target == msg.sender:
                tags_text = " ".join(f"{k}={v}" for k, v in m.tags if k != "Action")
                self.stdout.write(f"← {m.action} {tags_text}" + (f"\n  {m.data}" if m.data else ""))
        root = cascade[0]
        if root.status == root.FAILED:
            raise CommandError(f"{action} failed: {root.error}")
