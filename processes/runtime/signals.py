from django.dispatch import Signal

# Sent after commit with `messages=[Message, ...]`: every message that became
# applied or failed in that transaction (hop events for the web layer).
messages_settled = Signal()
