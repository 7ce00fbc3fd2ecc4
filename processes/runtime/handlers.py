"""AO `Handlers.add` style matching: a list of handlers, first match wins."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from processes.runtime import sql

Pattern = str | dict[str, Any] | Callable[[Any], bool]


class HandlerError(Exception):
    """A handler's refusal. The runtime rolls the handler back and answers
    `<Action>-Error` with this text as `Error`."""


def own_state(ctx, model, *, missing: str):
    """The process's one state row of `model` (keyed by process), read once per drain
    batch (Context.memo): every handler sees, changes and saves this one object,
    never the row behind its back. `missing` is the refusal when it does not exist."""
    key = model._meta.label
    if key not in ctx.memo:
        row = sql.select_one(model, where="process_id = %s", params=[ctx.process.id])
        if row is None:
            raise HandlerError(missing)
        ctx.memo[key] = row
    return ctx.memo[key]


@dataclass(frozen=True)
class Handler:
    name: str
    pattern: Pattern
    handle: Callable[..., None]

    def matches(self, msg) -> bool:
        if isinstance(self.pattern, str):
            return msg.action == self.pattern
        if isinstance(self.pattern, dict):
            for tag, expected in self.pattern.items():
                value = msg.get(tag)
                if callable(expected):
                    if not expected(value):
                        return False
                elif value != expected:
                    return False
            return True
        return bool(self.pattern(msg))


class Handlers:
    """An ordered handler list for one blueprint."""

    def __init__(self) -> None:
        self.handlers: list[Handler] = []

    def add(self, name: str, pattern: Pattern | None = None, handle: Callable | None = None):
        """Register `handle` for messages matching `pattern` (default: Action == name).

        Usable as a decorator: `@handlers.add("Transfer")`.
        """
        pattern = name if pattern is None else pattern

        def register(fn: Callable) -> Callable:
            if any(h.name == name for h in self.handlers):
                raise ValueError(f"handler {name!r} is already registered")
            self.handlers.append(Handler(name=name, pattern=pattern, handle=fn))
            return fn

        return register(handle) if handle is not None else register

    def match(self, msg) -> Handler | None:
        for handler in self.handlers:
            if handler.matches(msg):
                return handler
        return None

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.handlers]
