from django.dispatch import Signal

# Sent INSIDE the drain transaction with `messages=[Message, ...]` (those just
# applied or failed, and those delivered to wallets): receivers' writes commit
# or roll back with the messages (the flow index uses it).
messages_applied = Signal()

# Sent AFTER commit with the same list: hop events for the web layer.
messages_settled = Signal()
