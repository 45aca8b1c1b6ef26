"""Celery tasks of the rooms: thin, idempotent, safe to retry. They take ids and call services.

Each is registered under its TaskName (deliberation.dispatch), by which services queue it.
"""

from __future__ import annotations

import logging
import time

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from modeling.generation.base import SamplingParams
from modeling.pipeline import PipelineStage, mediate

from . import services
from .dispatch import TaskName
from .mediator import generator_version_for, load_models
from .models import MAX_MEDIATION_ATTEMPTS, Arm
from .recovery import heartbeat

logger = logging.getLogger(__name__)

# Progress events are throttled: a participant gains nothing from more than a few a second.
PROGRESS_MIN_INTERVAL_S = 0.25


@shared_task(
    name=TaskName.MEDIATE_ROUND.value,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=MAX_MEDIATION_ATTEMPTS - 1,
    soft_time_limit=settings.CONCORD_MEDIATION_TIME_LIMIT,
    time_limit=settings.CONCORD_MEDIATION_TIME_LIMIT + 60,
)
def mediate_round(self, round_id: int) -> str:
    mediation = services.mediation_claim(round_id=round_id)
    if mediation is None:
        return "nothing to do"
    arms = {
        arm.pk: arm
        for arm in Arm.objects.select_related("reward_model_version", "generator_version").filter(pk__in=mediation.source_arm_ids)
    }
    sources = [arms[arm_id] for arm_id in mediation.source_arm_ids]
    total = sum(arm.n_candidates for arm in sources)
    # When the last progress event went out, and for which (stage, done): a repeat is not sent.
    last_sent_at = 0.0
    last_sent: tuple[str, int] = ("", -1)
    offset = 0  # candidates written by earlier configurations of a head-to-head round

    def on_stage(stage: PipelineStage, done: int, stage_total: int) -> None:
        nonlocal last_sent_at, last_sent
        done = offset + done if stage == PipelineStage.GENERATING else done
        shown_total = total if stage == PipelineStage.GENERATING else stage_total
        now = time.monotonic()
        if (stage, done) == last_sent or (now - last_sent_at < PROGRESS_MIN_INTERVAL_S and 0 < done < shown_total):
            return
        last_sent_at, last_sent = now, (stage, done)
        services.mediation_progress(round_id=round_id, stage=stage, done=done, total=shown_total)

    results: list[services.SourcedResult] = []
    try:
        # Beats while the models load and generate, so the recovery sweep never takes this round for lost.
        with heartbeat(round_id=round_id):
            for arm in sources:
                generator, reward_model = load_models(arm=arm)
                version = generator_version_for(arm)
                result = mediate(
                    question=mediation.question,
                    opinions=mediation.opinions,
                    n=arm.n_candidates,
                    seed=mediation.seed_for(arm.pk),
                    generator=generator,
                    reward_model=reward_model,
                    welfare_method=arm.welfare_method,
                    welfare_alpha=arm.welfare_alpha,
                    welfare_tie_break=arm.welfare_tie_break,
                    sampling=SamplingParams(max_new_tokens=settings.CONCORD_MAX_NEW_TOKENS),
                    on_stage=on_stage,
                    revision=mediation.revision(),
                )
                results.append(
                    services.SourcedResult(arm_id=arm.pk, result=result, generator_version_id=version.pk if version else None)
                )
                offset += arm.n_candidates
    except SoftTimeLimitExceeded:
        services.mediation_fail(round_id=round_id, error="mediation ran past its time limit", final=True)
        raise
    except Exception as error:
        final = self.request.retries >= self.max_retries
        logger.exception("Mediation of round %s failed (attempt %s)", round_id, self.request.retries + 1)
        services.mediation_fail(round_id=round_id, error=f"{type(error).__name__}: {error}", final=final)
        if final:
            return "failed"
        raise self.retry(exc=error, countdown=2 ** self.request.retries) from error
    stored = services.candidates_store(mediation=mediation, results=results)
    return "stored" if stored else "already stored"


@shared_task(name=TaskName.ROUND_DEADLINE.value, acks_late=True, soft_time_limit=60, time_limit=90)
def round_deadline(round_id: int, phase: str) -> str:
    return services.round_deadline_fire(round_id=round_id, phase=phase)


@shared_task(name=TaskName.ROOM_WAIT_DEADLINE.value, acks_late=True, soft_time_limit=60, time_limit=90)
def room_wait_deadline(room_id: int) -> str:
    return services.room_wait_deadline_fire(room_id=room_id)
