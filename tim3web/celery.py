"""The Celery app: the doorbell that tells a worker to drain a mailbox."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tim3web.settings")

app = Celery("tim3web")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["processes"])
