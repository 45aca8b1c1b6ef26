import os
from typing import Any

from celery import Celery
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("concord")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_ready.connect
def start_recovery_sweep(**_: Any) -> None:
    """Every worker sweeps for work whose task the broker lost (deliberation.recovery)."""
    from deliberation.recovery import start_in_thread

    start_in_thread()
