"""Builders for studies with known numbers, for the researcher-side tests (exports, analytics, protocols).

Mediation output is given, not generated: `scored_result` builds a pipeline result from a chosen
predicted-agreement matrix and ranks it with the real welfare function, and the real services store
it. The real models run in the cohort test (test_cohort.py), which goes through the whole flow.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from statistics import mean

from deliberation import selectors, services
from deliberation.models import (
    Arm,
    Candidate,
    Experiment,
    OpinionRating,
    PairwisePreference,
    Participant,
    PredictedAgreement,
    Presentation,
    Rating,
    Round,
)
from modeling.generation.base import Candidate as GeneratedCandidate
from modeling.pipeline import MediationResult
from modeling.welfare import rank_candidates
from tests.conftest import OPINIONS


def scored_result(*, texts: Sequence[str], predicted: Sequence[Sequence[float]], welfare_method: str = "utilitarian") -> MediationResult:
    """A pipeline result for `texts`, with predicted[p][c] as participant p's predicted agreement with candidate c."""
    n_opinions = len(predicted)
    return MediationResult(
        candidates=[
            GeneratedCandidate(
                text=text, backend="given", model_id="given-in-test", model_revision="0", prompt=f"prompt {i}",
                opinion_order=list(range(n_opinions)), seed=i, prompt_tokens=10, completion_tokens=5, latency_ms=1.0,
            )
            for i, text in enumerate(texts)
        ],
        predicted=[list(row) for row in predicted],
        welfare=rank_candidates(predicted, method=welfare_method),
        reward_model="given",
        reward_model_version="given-v1",
    )


def write_opinions(members: Sequence[Participant]) -> Round:
    for participant, text in zip(members, OPINIONS):
        services.opinion_submit(participant=participant, text=text)
    return Round.objects.get(room=members[0].room, index=0)


def mediate_with(round_: Round, predicted_by_arm: dict[int, Sequence[Sequence[float]]]) -> services.MediationInput:
    """Claim the round and store the given results, one per source arm (in the round's source order)."""
    mediation = services.mediation_claim(round_id=round_.pk)
    assert mediation is not None
    results = []
    for arm_id in mediation.source_arm_ids:
        # One row per member whose opinion went in (an exclusion round has one fewer).
        predicted = predicted_by_arm[arm_id][: len(mediation.participant_ids)]
        texts = [f"Draft {arm_id}.{c}: we agree on part of this." for c in range(len(predicted[0]))]
        results.append(services.SourcedResult(arm_id=arm_id, result=scored_result(texts=texts, predicted=predicted)))
    assert services.candidates_store(mediation=mediation, results=results)
    return mediation


def shown_to(participant: Participant) -> list[int]:
    return list(Presentation.objects.filter(participant=participant).order_by("position").values_list("candidate_id", flat=True))


def finish_rating(participant: Participant, agreement_of: dict[int, int], *, opinion_agreement: int = 4, quality: int = 5) -> None:
    """Answer everything on the rating page through the services: ratings, preferences, opinions, attention, ranking."""
    shown = shown_to(participant)
    for candidate_id in shown:
        services.rating_submit(participant=participant, candidate_id=candidate_id, agreement=agreement_of[candidate_id], quality=quality)
    round_ = Round.objects.get(room=participant.room, index=0)
    for first, second in selectors.preference_pairs(participant=participant, round_=round_):
        preferred = first if agreement_of[first] >= agreement_of[second] else second
        services.pairwise_preference_submit(participant=participant, candidate_a_id=first, candidate_b_id=second, preferred_id=preferred)
    for opinion in selectors.opinions_to_rate(participant=participant, round_=round_):
        services.opinion_rating_submit(participant=participant, opinion_id=opinion.pk, agreement=opinion_agreement)
    if participant.room.experiment.attention_check:
        services.attention_check_submit(participant=participant, answer=selectors.attention_expected(participant=participant, round_=round_))
    best_first = sorted(shown, key=lambda c: -agreement_of[c])
    services.ranking_submit(participant=participant, positions={c: i + 1 for i, c in enumerate(best_first)})


def build_study(*, owner, slug: str = "rich-study") -> StudyFixture:
    """Three groups of three, one per arm: a head-to-head arm, its opponent and an exclusion arm,
    with opinion ratings and attention checks on. Agreement is varied but fixed, so figures are known."""
    from tests.factories import ArmFactory, ExperimentFactory

    experiment = ExperimentFactory(owner=owner, slug=slug, group_size=3, rate_opinions=True, attention_check=True, assignment_seed=11)
    experiment.arms.all().delete()
    opponent = ArmFactory(experiment=experiment, name="opponent", k_shown=2, welfare_method="rawlsian")
    base = ArmFactory(experiment=experiment, name="base", k_shown=2, compare_with=opponent)
    exclusion = ArmFactory(experiment=experiment, name="exclusion", k_shown=2, exclude_one_opinion=True)
    members = [services.participant_join(experiment=experiment, external_id=f"PID-{i}") for i in range(9)]
    rooms: dict[int, list[Participant]] = {}
    for member in members:
        rooms.setdefault(member.room_id, []).append(member)
    predicted = [[5.0, 3.0, 4.0, 1.0], [2.0, 6.0, 3.0, 1.0], [4.0, 4.5, 2.0, 3.0]]
    for group_index, group in enumerate(rooms.values()):
        round_ = write_opinions(group)
        mediate_with(round_, {arm.pk: predicted for arm in (base, opponent, exclusion)})
        for member_index, member in enumerate(group):
            agreement_of = {
                candidate_id: 1 + (3 * group_index + 2 * member_index + position) % 7
                for position, candidate_id in enumerate(sorted(shown_to(member)))
            }
            finish_rating(member, agreement_of, opinion_agreement=2 + (member_index + group_index) % 5)
    return StudyFixture(experiment=experiment, arms={"base": base, "opponent": opponent, "exclusion": exclusion}, members=members)


@dataclass
class StudyFixture:
    experiment: Experiment
    arms: dict[str, Arm]
    members: list[Participant]


def read_export_zip(path: Path, fmt: str) -> tuple[dict[str, list[dict]], dict, str]:
    """Every table of an export zip (rows as dicts; "<name>:header" holds the column names), its datapackage and README."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        prefix = names[0].split("/")[0]
        package = json.loads(archive.read(f"{prefix}/datapackage.json"))
        readme = archive.read(f"{prefix}/README.md").decode()
        tables: dict[str, list[dict]] = {}
        for resource in package["resources"]:
            data = archive.read(f"{prefix}/{resource.get('path', resource['name'] + '.' + fmt)}")
            if fmt == "csv":
                reader = csv.DictReader(io.StringIO(data.decode()))
                tables[resource["name"]] = [dict(row) for row in reader]
                tables[resource["name"] + ":header"] = reader.fieldnames  # type: ignore[assignment]
            elif fmt == "jsonl":
                tables[resource["name"]] = [json.loads(line) for line in data.decode().splitlines()]
            else:
                import pyarrow.parquet as pq

                table = pq.read_table(io.BytesIO(data))
                tables[resource["name"]] = table.to_pylist()
                tables[resource["name"] + ":header"] = table.column_names  # type: ignore[assignment]
    return tables, package, readme


def hand_computed_figures(arm: Arm) -> dict[str, float]:
    """Each figure computed directly from the database rows, independently of deliberation.analytics."""
    figures: dict[str, float] = {}
    ratings = list(Rating.objects.filter(candidate__source_arm=arm).select_related("candidate__round"))
    if ratings:
        figures["mean_agreement"] = mean(r.agreement for r in ratings)
        figures["mean_quality"] = mean(r.quality for r in ratings)
        per_statement: dict[int, list[int]] = defaultdict(list)
        for r in ratings:
            per_statement[r.candidate_id].append(r.agreement)
        figures["worst_off_agreement"] = mean(min(v) for v in per_statement.values())
        spreads = [mean(abs(a - b) for a, b in combinations(v, 2)) for v in per_statement.values() if len(v) > 1]
        figures["divisiveness"] = mean(spreads)
        predicted = {(p.candidate_id, p.participant_id): p.score for p in PredictedAgreement.objects.filter(candidate__source_arm=arm)}
        errors = [abs(predicted[(r.candidate_id, r.participant_id)] - r.agreement) for r in ratings if (r.candidate_id, r.participant_id) in predicted]
        figures["reward_model_mae"] = mean(errors)
    # Best human opinion: the arm's own groups.
    outcomes = []
    for round_ in Round.objects.filter(room__arm=arm):
        top = Candidate.objects.filter(round=round_, source_arm=arm, shown=True).order_by("rank").first()
        endorsements: dict[int, dict[int, int]] = defaultdict(dict)
        for rating in OpinionRating.objects.filter(opinion__round=round_).order_by("opinion_id"):
            endorsements[rating.opinion_id][rating.participant_id] = rating.agreement
        if top is None or not endorsements:
            continue
        best = max(sorted(endorsements), key=lambda o: mean(endorsements[o].values()))
        on_top = {r.participant_id: r.agreement for r in Rating.objects.filter(candidate=top)}
        raters = [p for p in endorsements[best] if p in on_top]
        statement, opinion = mean(on_top[p] for p in raters), mean(endorsements[best][p] for p in raters)
        outcomes.append(1.0 if statement > opinion else 0.5 if statement == opinion else 0.0)
    if outcomes:
        figures["win_rate_vs_best_opinion"] = mean(outcomes)
    duels = [p for p in PairwisePreference.objects.select_related("candidate_a", "candidate_b", "preferred")
             if arm.pk in (p.candidate_a.source_arm_id, p.candidate_b.source_arm_id)]
    if duels:
        figures["head_to_head_win_rate"] = mean(1.0 if p.preferred.source_arm_id == arm.pk else 0.0 for p in duels)
    for round_ in Round.objects.filter(room__arm=arm, excluded_participant__isnull=False):
        per_member: dict[int, list[int]] = defaultdict(list)
        for rating in Rating.objects.filter(candidate__round=round_):
            per_member[rating.participant_id].append(rating.agreement)
        excluded = mean(per_member.pop(round_.excluded_participant_id))
        figures["exclusion_effect"] = excluded - mean(mean(v) for v in per_member.values())
        figures["excluded_mean_agreement"] = excluded
    return figures
