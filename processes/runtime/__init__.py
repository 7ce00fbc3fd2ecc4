"""The message engine: ids, quantities, handler matching, delivery, replay.

It knows nothing of HTTP, Celery or Channels: the doorbell and the hop events
are reached through `settings.TIM3_DOORBELL` and the `messages_settled` signal.
"""
