"""Which blueprint handles a process's messages, by Process.kind."""

from dataclasses import dataclass, field

from processes.runtime.handlers import Handlers


@dataclass
class Blueprint:
    kind: str
    handlers: Handlers
    # Models holding this blueprint's state, each with a `process` foreign key:
    # replay wipes and rebuilds them, verify compares them.
    state_models: list = field(default_factory=list)
    # The one row per process its handlers read through `own_state` (keyed by process): a
    # drain reads it in the same round trip as the process's lock (delivery.open_mailbox).
    own_state: type | None = None


BLUEPRINTS: dict[str, Blueprint] = {}


def register_blueprint(blueprint: Blueprint) -> Blueprint:
    BLUEPRINTS[blueprint.kind] = blueprint
    return blueprint


def get_blueprint(kind: str) -> Blueprint:
    try:
        return BLUEPRINTS[kind]
    except KeyError:
        raise LookupError(f"no blueprint for process kind {kind!r}") from None
