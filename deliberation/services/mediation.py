"""Mediation: claiming a round for the pipeline, progress, storing its candidates, failure."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from django.db import transaction
from django.utils import timezone

from .. import events
from ..models import Arm, Candidate, Opinion, Participant, PredictedAgreement, Presentation, Round
from .phases import round_finish, round_phase_set

if TYPE_CHECKING:
    from modeling.generation.prompts import RevisionContext
    from modeling.pipeline import MediationResult


@dataclass(frozen=True)
class MediationInput:
    round_id: int
    question: str
    # Whose opinions go into generation and ranking, in this order (the excluded member is not here).
    participant_ids: list[int]
    opinions: list[str]
    seed: int
    arm_id: int
    # Who rates the statements: every member with an opinion, the excluded one included.
    rater_ids: list[int] = field(default_factory=list)
    # Arm ids whose configurations generate: the room's arm first, then a head-to-head opponent.
    source_arm_ids: list[int] = field(default_factory=list)
    excluded_participant_id: int | None = None
    # A critique round: the statement critiqued and each included member's critique (aligned with opinions).
    previous_statement: str = ""
    critiques: list[str] = field(default_factory=list)

    def revision(self) -> RevisionContext | None:
        """What the pipeline revises from, in a critique round (None in a first round)."""
        from modeling.generation.prompts import RevisionContext

        if not self.critiques:
            return None
        return RevisionContext(previous_statement=self.previous_statement, critiques=list(self.critiques))

    def seed_for(self, source_arm_id: int) -> int:
        """The room's arm keeps the round's seed; an opponent gets its own, so the two never write the same text."""
        if source_arm_id == self.arm_id:
            return self.seed
        return random.Random(f"{self.seed}:arm:{source_arm_id}").getrandbits(31)


def mediation_claim(*, round_id: int) -> MediationInput | None:
    """Mark an attempt and return what the pipeline needs, or None if there is nothing to do.

    In an exclusion arm, one member (a seeded draw, recorded on the round and kept across retries)
    is silently left out of generation and ranking, but still rates the statements.
    """
    with transaction.atomic():
        round_ = Round.objects.select_for_update(of=("self",)).select_related("room__question", "room__arm").get(pk=round_id)
        human_versus_model = round_.mediator_id is not None and round_.room.arm.compare_with_id is not None
        if round_.phase != Round.Phase.MEDIATING or round_.candidates.filter(author__isnull=True).exists():
            return None  # nothing to do, or already done
        if round_.mediator_id is not None and not human_versus_model:
            return None  # a human mediator writes this round's statement, and no model writes beside them
        round_.mediation_attempts += 1
        # Loading the models can take a while on a fresh worker: say the mediator has started.
        round_.progress_stage = Round.Stage.STARTING
        round_.progress_at = timezone.now()
        events.send_on_commit(
            events.MediationProgress(
                room_id=round_.room_id, round_id=round_.pk, stage=Round.Stage.STARTING, done=0, total=round_.progress_total
            )
        )
        opinions = list(
            round_.opinions.filter(participant__dropped_out_at__isnull=True).select_related("participant").order_by("participant_id")
        )
        arm = round_.room.arm
        writer_ids = [o.participant_id for o in opinions]
        if arm.exclude_one_opinion and round_.excluded_participant_id is None and round_.can_be_mediated(len(writer_ids)):
            round_.excluded_participant_id = random.Random(f"{round_.seed}:exclude").choice(writer_ids)
        round_.save(update_fields=["mediation_attempts", "progress_stage", "progress_at", "excluded_participant"])
        included = [o for o in opinions if o.participant_id != round_.excluded_participant_id]
        # Record the order the generator sees (the export's replay key); a retry writes the same positions.
        round_.opinions.update(generation_position=None)
        for position, opinion in enumerate(included):
            opinion.generation_position = position
        Opinion.objects.bulk_update(included, ["generation_position"])
        critiques: list[str] = []
        previous_statement = ""
        if round_.is_critique():
            # This round's "opinions" are the critiques; the opinions are the same members' first-round ones.
            critiques = [o.text for o in included]
            first = dict(
                Opinion.objects.filter(round__room_id=round_.room_id, round__index=0).values_list("participant_id", "text")
            )
            included_texts = [first.get(o.participant_id, "") for o in included]
            previous_statement = round_.previous_winner.text if round_.previous_winner else ""
        else:
            included_texts = [o.text for o in included]
        return MediationInput(
            round_id=round_.pk,
            question=round_.room.question.text,
            participant_ids=[o.participant_id for o in included],
            opinions=included_texts,
            seed=round_.seed,
            arm_id=arm.pk,
            rater_ids=writer_ids,
            # Human vs model head-to-head: the model writes only with the compared arm's configuration.
            source_arm_ids=[arm.compare_with_id] if human_versus_model and arm.compare_with_id else [a.pk for a in arm.mediation_arms()],
            excluded_participant_id=round_.excluded_participant_id,
            previous_statement=previous_statement,
            critiques=critiques,
        )


def mediation_progress(*, round_id: int, stage: str, done: int, total: int) -> None:
    with transaction.atomic():
        updated = Round.objects.filter(pk=round_id, phase=Round.Phase.MEDIATING).update(
            progress_stage=stage, progress_done=done, progress_total=total, progress_at=timezone.now()
        )
        if updated:
            room_id = Round.objects.values_list("room_id", flat=True).get(pk=round_id)
            events.send_on_commit(
                events.MediationProgress(room_id=room_id, round_id=round_id, stage=stage, done=done, total=total)
            )


def mediation_heartbeat(*, round_id: int) -> bool:
    """A mediation is still running: keep rounds_recover from taking its task for lost."""
    with transaction.atomic():
        return bool(Round.objects.filter(pk=round_id, phase=Round.Phase.MEDIATING).update(progress_at=timezone.now()))


def _presentation_order(*, round_: Round, participant: Participant, candidate_ids: list[int]) -> list[int]:
    # Deterministic per participant, so the order can be reproduced from the round's seed.
    digest = hashlib.sha256(f"{round_.seed}:{participant.pk}".encode()).hexdigest()
    order = list(candidate_ids)
    random.Random(int(digest[:16], 16)).shuffle(order)
    return order


@dataclass(frozen=True)
class SourcedResult:
    """One configuration's mediation output: which arm's generator, reward model and welfare produced it."""

    arm_id: int
    result: MediationResult
    # The fine-tuned generator version that wrote the candidates (None: an untuned base model).
    generator_version_id: int | None = None


def _shown_per_source(*, k_shown: int, sources: int) -> list[int]:
    # Head-to-head splits the K shown statements between the two configurations, the room's arm first.
    if sources == 1:
        return [k_shown]
    own = math.ceil(k_shown / 2)
    return [own, k_shown - own]


def candidates_store(*, mediation: MediationInput, results: Sequence[SourcedResult]) -> bool:
    """Store candidates, predictions and rankings of every configuration, then open rating.

    Idempotent: a redelivered task stores nothing twice. Rank and shown are within each source arm.
    """
    with transaction.atomic():
        round_ = Round.objects.select_for_update(of=("self",)).select_related("room__arm", "room__experiment").get(pk=mediation.round_id)
        if round_.phase != Round.Phase.MEDIATING or round_.candidates.filter(author__isnull=True).exists():
            return False
        if [r.arm_id for r in results] != (mediation.source_arm_ids or [mediation.arm_id]):
            raise ValueError("mediation results do not match the round's configurations")
        arms = {arm.pk: arm for arm in Arm.objects.filter(pk__in=[r.arm_id for r in results])}
        human = round_.candidates.filter(author__isnull=False).first()
        # Human vs model head-to-head: the human statement takes one of the K places, the model the rest.
        quotas = [max(1, round_.room.arm.k_shown - 1)] if round_.mediator_id is not None else _shown_per_source(
            k_shown=round_.room.arm.k_shown, sources=len(results)
        )
        stored: list[Candidate] = [human] if human is not None else []
        shown_ids: list[int] = []
        for sourced, quota in zip(results, quotas, strict=True):
            result, arm = sourced.result, arms[sourced.arm_id]
            rank_of = {candidate_index: position + 1 for position, candidate_index in enumerate(result.welfare.ranking)}
            shown_indices = set(result.welfare.ranking[:quota])
            these: list[Candidate] = []
            for local_index, generated in enumerate(result.candidates):
                these.append(
                    Candidate.objects.create(
                        round=round_,
                        index=len(stored) + local_index,
                        text=generated.text,
                        backend=generated.backend,
                        model_id=generated.model_id,
                        model_revision=generated.model_revision,
                        seed=generated.seed,
                        opinion_order=[mediation.participant_ids[i] for i in generated.opinion_order],
                        prompt=generated.prompt,
                        prompt_tokens=generated.prompt_tokens,
                        completion_tokens=generated.completion_tokens,
                        latency_ms=generated.latency_ms,
                        sample_index=generated.sample_index,
                        sampling_seed=generated.sampling_seed,
                        temperature=result.sampling.temperature,
                        top_p=result.sampling.top_p,
                        max_new_tokens=result.sampling.max_new_tokens,
                        welfare=float(result.welfare.welfare[local_index]),
                        welfare_method=arm.welfare_method,
                        rank=rank_of.get(local_index),
                        shown=local_index in shown_indices,
                        source_arm=arm,
                        generator_version_id=sourced.generator_version_id,
                    )
                )
            PredictedAgreement.objects.bulk_create(
                PredictedAgreement(
                    candidate=these[c],
                    participant_id=participant_id,
                    score=float(result.predicted[p][c]),
                    reward_model=result.reward_model,
                    reward_model_version=result.reward_model_version,
                )
                for p, participant_id in enumerate(mediation.participant_ids)
                for c in range(len(these))
            )
            shown_ids += [candidate.pk for candidate in sorted(these, key=lambda c: c.rank or 0) if candidate.shown]
            stored += these
        if round_.mediator_id is not None and human is None:
            # Head-to-head with a human mediator who is still writing: rating opens with their statement.
            round_.progress_stage = Round.Stage.READY
            round_.save(update_fields=["progress_stage"])
            return True
        rating_open(
            round_=round_, rater_ids=mediation.rater_ids or mediation.participant_ids, shown_ids=([human.pk] if human else []) + shown_ids
        )
    return True


def rating_open(*, round_: Round, rater_ids: Sequence[int], shown_ids: Sequence[int]) -> None:
    """Present the shown statements to each rater in an order of their own (seeded), and open rating."""
    raters = Participant.objects.filter(pk__in=rater_ids, dropped_out_at__isnull=True)
    Presentation.objects.bulk_create(
        Presentation(participant=participant, candidate_id=candidate_id, position=position)
        for participant in raters
        for position, candidate_id in enumerate(_presentation_order(round_=round_, participant=participant, candidate_ids=list(shown_ids)))
    )
    round_.progress_stage = Round.Stage.READY
    round_.progress_done = round_.progress_total = round_.candidates.count()
    round_.rating_started_at = timezone.now()
    round_.mediation_error = ""
    events.send_on_commit(events.CandidatesReady(room_id=round_.room_id, round_id=round_.pk))
    round_phase_set(round_=round_, phase=Round.Phase.RATING, deadline_seconds=round_.room.experiment.rating_seconds)


def mediation_fail(*, round_id: int, error: str, final: bool) -> None:
    """Record a failed attempt; after the last retry the round ends as failed rather than stalling the group."""
    with transaction.atomic():
        round_ = Round.objects.select_for_update().get(pk=round_id)
        if round_.phase != Round.Phase.MEDIATING:
            return
        round_.mediation_error = error[:4000]
        round_.progress_stage = Round.Stage.FAILED if final else Round.Stage.RETRYING
        round_.progress_at = timezone.now()
        round_.save(update_fields=["mediation_error", "progress_stage", "progress_at"])
        if final:
            round_finish(round_=round_, outcome=Round.Outcome.FAILED)
        else:
            events.send_on_commit(
                events.MediationProgress(room_id=round_.room_id, round_id=round_.pk, stage=Round.Stage.RETRYING, done=0, total=round_.progress_total)
            )
