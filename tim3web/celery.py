"""The Celery app: the doorbell that tells a worker to drain a mailbox."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tim3web.settings")

app = Celery("tim3web")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["processes"])
# Celery's Django fixup closes the database connection before and after every task
# unless told to reuse it: a new Postgres connection (a server-side fork, milliseconds)
# per doorbell. Reused, Django's CONN_MAX_AGE and each task's close_old_connections()
# decide when to reconnect; the fixup still recycles it every 2 x this many tasks.
app.conf.update(CELERY_DB_REUSE_MAX=int(os.environ.get("TIM3_DB_REUSE_MAX", "1000")))
