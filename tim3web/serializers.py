"""The CONTRACT's JSON shapes."""

from processes.runtime.models import Message


def message_to_dict(msg: Message) -> dict:
    return {
        "id": msg.msg_id,
        "from": msg.sender,
        "target": msg.target,
        "action": msg.action,
        "tags": msg.tag_dict,
        "data": msg.data,
        "slot": msg.slot,
        "reference": str(msg.reference),
        "x_reference": msg.x_reference or None,
        "pushed_for": msg.pushed_for,
        "parent": msg.parent_id,
        "status": msg.status,
        "error": msg.error or None,
        "timestamp": msg.timestamp,
    }
