"""Celery tasks of the research tools: thin, idempotent, registered under their TaskName."""

from __future__ import annotations

from celery import shared_task

from deliberation.dispatch import TaskName

from .exports import run_export
from .training import training_run_execute

# An export streams rows, so its time grows with the data; an hour covers very large studies.
EXPORT_TIME_LIMIT_S = 3600


@shared_task(
    name=TaskName.EXPORT_DATASET.value,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=EXPORT_TIME_LIMIT_S,
    time_limit=EXPORT_TIME_LIMIT_S + 60,
)
def export_dataset(export_id: int) -> str:
    """Write one dataset export (see research.exports). Idempotent: a finished export is not written again;
    a redelivered one is rewritten from scratch, since files are only moved into place when complete."""
    return run_export(export_id=export_id)


# Training a generator on a GPU takes minutes to hours; on a CPU, longer. The run records a timeout as a failure.
TRAINING_TIME_LIMIT_S = 6 * 3600


@shared_task(
    name=TaskName.TRAIN_MODEL.value,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=TRAINING_TIME_LIMIT_S,
    time_limit=TRAINING_TIME_LIMIT_S + 120,
)
def train_model(run_id: int) -> str:
    """Run one training (or evaluation) run (research.training). Idempotent: a run that already started is not started again."""
    return training_run_execute(run_id=run_id)
