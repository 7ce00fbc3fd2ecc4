"""Replay: rebuild every process's state from its message log and diff it.

Handlers read only their own process's state and the (immutable) message log,
so each process can be replayed on its own, in slot order. Replay runs inside
a transaction that is always rolled back: the live state is never touched.
"""

from dataclasses import dataclass, field

from django.db import transaction

from processes.runtime.delivery import lock_process, outgoing_rows, run_handler
from processes.runtime.models import Message, Process
from processes.runtime.registry import get_blueprint


class _Rollback(Exception):
    pass


@dataclass
class ReplayReport:
    processes: int = 0
    messages: int = 0
    differences: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.differences


def snapshot_state(process: Process) -> dict[str, list[dict]]:
    """The blueprint state of one process as plain, sorted data (no row ids)."""
    blueprint = get_blueprint(process.kind)
    result = {}
    for model in blueprint.state_models:
        fields = [f.attname for f in model._meta.concrete_fields if not f.primary_key or f.attname == "process_id"]
        rows = [dict(r) for r in model.objects.filter(process=process).values(*fields)]
        result[model.__name__] = sorted(rows, key=repr)
    return result


def _diff_rows(name: str, live: list[dict], rebuilt: list[dict]) -> list[str]:
    if live == rebuilt:
        return []
    live_set = {repr(r): r for r in live}
    rebuilt_set = {repr(r): r for r in rebuilt}
    out = []
    for key in sorted(live_set.keys() - rebuilt_set.keys()):
        out.append(f"{name}: live has {live_set[key]} but the log rebuilds no such row")
    for key in sorted(rebuilt_set.keys() - live_set.keys()):
        out.append(f"{name}: the log rebuilds {rebuilt_set[key]} but live has no such row")
    return out


def _replay_process(process: Process, report: ReplayReport) -> None:
    blueprint = get_blueprint(process.kind)
    process = lock_process(process.id)  # live drains of it wait until we roll back
    live = snapshot_state(process)
    for model in reversed(blueprint.state_models):
        model.objects.filter(process=process).delete()
    process.next_reference = 1
    log = Message.objects.filter(target=process.id).exclude(status=Message.PENDING).order_by("slot")
    expected_slot = 1
    for msg in log.iterator():
        if msg.slot != expected_slot:
            report.differences.append(f"{process.name}: slot {expected_slot} is missing (next is {msg.slot})")
            expected_slot = msg.slot
        expected_slot += 1
        report.messages += 1
        if msg.dead:  # never applied: no state change, its error reply was written by the runtime
            process.next_reference += len(msg.result.get("messages", []))
            continue
        status, error, _, ctx = run_handler(process=process, msg=msg, blueprint=blueprint)
        where = f"{process.name} slot {msg.slot} ({msg.action} {msg.msg_id})"
        if status != msg.status or error != msg.error:
            report.differences.append(f"{where}: logged {msg.status} {msg.error!r}, replay gives {status} {error!r}")
        rebuilt = outgoing_rows(process=process, msg=msg, outbox=ctx.outbox, now=0)
        logged = list(Message.objects.filter(parent_id=msg.msg_id).order_by("seq"))
        shape = lambda m: (m.msg_id, m.target, m.tags, m.data, m.x_reference)  # noqa: E731
        if [shape(m) for m in rebuilt] != [shape(m) for m in logged]:
            report.differences.append(f"{where}: replay sends {[m.action for m in rebuilt]}, "
                                      f"the log has {[m.action for m in logged]}")
    if expected_slot != process.next_slot:
        report.differences.append(f"{process.name}: next slot is {process.next_slot} but the log ends at {expected_slot - 1}")
    rebuilt = snapshot_state(process)
    for name in live:
        for line in _diff_rows(name, live[name], rebuilt[name]):
            report.differences.append(f"{process.name}: {line}")


def replay_all() -> ReplayReport:
    """Replay every process's log into scratch state and report every difference."""
    report = ReplayReport()
    try:
        with transaction.atomic():
            for process in Process.objects.order_by("created_at", "id"):
                report.processes += 1
                _replay_process(process, report)
            raise _Rollback
    except _Rollback:
        pass
    return report
