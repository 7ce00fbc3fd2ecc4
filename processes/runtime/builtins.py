"""Handlers every blueprint includes."""

from processes.runtime.models import Message


def message_status(msg, ctx) -> None:
    """`Message-Status{Message-Id}`: what became of a message the asker sent here.

    A process applies one sender's messages in the order they were sent, so by
    the time this query is applied the asked-about message is settled: the
    answer is final, and the same on replay. Used by the coordinator to decide,
    after a timeout, whether an operation must be compensated.
    """
    asked = msg.get("Message-Id") or ""
    row = ctx.batch.get(asked) or Message.objects.filter(msg_id=asked, target=ctx.process.id).first()
    if row is not None and (row.target != ctx.process.id or row.sender != msg.sender):
        row = None
    if row is None:
        status, handled = "unknown", "false"
    else:
        status, handled = row.status, "true" if row.handled else "false"
    ctx.reply({"Action": "Message-Status-Response", "Message-Id": asked, "Status": status, "Handled": handled})
