"""What a handler sees besides its message: its process and a way to send.

Outgoing messages are buffered here and written only if the handler returns,
so a handler that raises sends nothing (AO rule).
"""

from dataclasses import dataclass, field
from typing import Any

from processes.runtime.ids import derive_id
from processes.runtime.tags import encode_data, normalize_tags


@dataclass
class Outgoing:
    target: str
    tags: list[list[str]]
    data: str
    x_reference: str = ""
    msg_id: str = ""  # known before it is written: ids derive from the parent's id


@dataclass
class Context:
    process: Any  # runtime.models.Process
    msg: Any  # runtime.models.Message being handled
    outbox: list[Outgoing] = field(default_factory=list)
    changes: list[dict] = field(default_factory=list)
    # Messages of the same drain batch already settled but not yet written back
    # (statuses are written once per batch); see builtins.message_status.
    batch: dict = field(default_factory=dict)
    # State rows a blueprint read (its config, say), so each is read once. Shared by
    # the messages of a drain batch only while the batch runs without savepoints: a
    # handler that raises then rolls back the whole batch, memo and all (delivery).
    # With savepoints (and on replay) each message gets its own. Blueprints write
    # memoized rows only through the memoized object, never with a queryset update.
    memo: dict = field(default_factory=dict)

    @property
    def now(self) -> int:
        """Handler time: the message's timestamp (ms), never the wall clock."""
        return self.msg.timestamp

    @property
    def id(self) -> str:
        return self.process.id

    def send(self, *, target: str, tags: Any, data: Any = "") -> Outgoing:
        out = Outgoing(target=target, tags=normalize_tags(tags), data=encode_data(data))
        self.outbox.append(out)
        out.msg_id = derive_id(self.msg.msg_id, len(self.outbox))
        return out

    def forwarded_x_tags(self) -> dict[str, str]:
        """The incoming `X-*` tags, which replies and notices carry along (AO token rule)."""
        return {name: value for name, value in self.msg.tags if name.startswith("X-")}

    def reply(self, tags: Any, data: Any = "") -> Outgoing:
        """Answer the sender: `X-Reference` = its Reference, its `X-*` tags carried back."""
        merged = self.forwarded_x_tags()
        merged.update({name: value for name, value in normalize_tags(tags)})
        out = self.send(target=self.msg.sender, tags=merged, data=data)
        out.x_reference = str(self.msg.reference)
        return out

    def note(self, **change: Any) -> None:
        """Record a state change for the explorer's timeline (not part of state)."""
        self.changes.append({k: (v if isinstance(v, (int, str, bool)) or v is None else str(v)) for k, v in change.items()})
