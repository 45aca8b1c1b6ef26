"""The Celery worker's consumer, made to survive a lost Redis connection (CELERY_WORKER_CONSUMER).

Celery 5.7.0 handles a lost broker connection by first collecting the connection (which
detaches it from its transport) and then closing it. When the worker holds unacknowledged
messages (a scheduled round timer, a task in progress: all our tasks are acks_late), the
Redis transport tries to restore them while closing, finds no transport to connect with,
and raises AttributeError ("'NoneType' object has no attribute 'hostname'"). Celery treats
that as unrecoverable and the worker exits: one Redis restart stops every worker.

By then the broken connection has already been dropped from the consumer, and the messages
could not have been restored anyway (the broker is unreachable; after a restart without
persistence they are gone, and deliberation.recovery redoes their work). So this consumer
logs the failed close and lets Celery reconnect as it does for every other connection error.
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer as CeleryConsumer

logger = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
    def on_connection_error_after_connected(self, exc: Exception) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError:
            # Only the close of the already-detached connection raises this (see above).
            logger.warning("Could not close the lost broker connection cleanly; reconnecting anyway", exc_info=True)
