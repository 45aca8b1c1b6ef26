"""Pilot an experiment with simulated participants who use the real site, like oTree's bots.

Without --url it starts the site itself (daphne, plus a Celery worker when REDIS_URL
is set) on a free local port against the configured database, and stops it after.

Bots answer every step the experiment enables (ratings, head-to-head preferences, opinion ratings,
the attention item, the ranking); their personas are stored on their participant rows. The command
exits non-zero, after printing its summary, when any group did not finish as designed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import tempfile
import time
from pathlib import Path
from statistics import mean

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q

from accounts.commands import add_as_user_argument, experiment_for_command
from deliberation import selectors, services
from deliberation.models import (
    AttentionCheck,
    Candidate,
    Experiment,
    FinalPreference,
    Opinion,
    OpinionRating,
    PairwisePreference,
    Participant,
    Position,
    PredictedAgreement,
    Presentation,
    Ranking,
    Rating,
    Room,
    Round,
)
from simulation import bots, protocol_bots
from simulation.localsite import local_site


class Command(BaseCommand):
    help = "Run simulated groups through an experiment over HTTP and websockets; print a JSON summary."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--experiment", required=True, help="Experiment id or slug.")
        parser.add_argument("--groups", type=int, default=1)
        parser.add_argument("--group-size", type=int, default=None, help="Default: the experiment's group size.")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--url", default="", help="A running site to use; by default one is started locally.")
        parser.add_argument("--timeout", type=float, default=900, help="Seconds a bot waits for any one phase.")
        parser.add_argument(
            "--opinions", choices=["generator", "template"], default="generator",
            help="Who writes the bots' opinions: the site's generator from each persona (default), or a template that "
            "states the persona's claim (no model: for piloting the protocol itself).",
        )
        parser.add_argument(
            "--inattentive-share", type=float, default=0.0,
            help="Share of bots that answer the attention item wrongly (pilots the exclusion rule). Default 0.",
        )
        add_as_user_argument(parser)  # bots fill rooms of the experiment: the same rule as the researcher pages

    def handle(
        self, *args: object, experiment: str, groups: int, group_size: int | None, seed: int, url: str, timeout: float,
        opinions: str, inattentive_share: float, as_user: str, **options: object,
    ) -> None:
        lookup = Q(slug=experiment) | Q(pk=int(experiment)) if experiment.isdigit() else Q(slug=experiment)
        found, _ = experiment_for_command(Experiment.objects.all(), lookup=lookup, described=f"with id or slug {experiment!r}", username=as_user)
        size = group_size or found.group_size
        if groups < 1 or not 2 <= size <= 8:
            raise CommandError("--groups must be at least 1 and --group-size between 2 and 8.")
        if found.status != Experiment.Status.ACTIVE:
            raise CommandError(f"Experiment {found.slug!r} is {found.status}; activate it to pilot it.")

        if not 0 <= inattentive_share <= 1:
            raise CommandError("--inattentive-share must be between 0 and 1.")
        generator = None
        if opinions == "generator":
            from deliberation.mediator import load_models

            generator, _ = load_models(arm=None)
        rng = random.Random(seed)
        plans: list[bots.GroupPlan] = []
        rooms: list[Room] = []
        for group_index in range(groups):
            room = services.room_create(experiment=found)
            Room.objects.filter(pk=room.pk).update(capacity=size)
            rooms.append(room)
            personas = bots.make_personas(rng, size, inattentive_share=inattentive_share)
            group_seed = rng.getrandbits(31)
            affirming = room.question.affirming_statement or room.question.text
            negating = room.question.negating_statement or f"No: {room.question.text}"
            texts = (
                bots.write_opinions(
                    generator,  # type: ignore[arg-type]
                    question=room.question.text, affirming=affirming, negating=negating, personas=personas, seed=group_seed,
                )
                if generator is not None
                else bots.template_opinions(affirming=affirming, negating=negating, personas=personas)
            )
            plans.append(
                bots.GroupPlan(
                    join_path=f"e/{found.slug}/r/{room.code}/join/",
                    question=room.question.text,
                    affirming=room.question.affirming_statement,
                    negating=room.question.negating_statement,
                    labels=[f"bot-{seed}-{group_index}-{i}" for i in range(size)],
                    personas=personas,
                    opinions=texts,
                    seed=group_seed,
                )
            )
            self.stderr.write(f"Group {group_index + 1}/{groups}: room {room.pk}, arm {room.arm.name}, opinions written.")

        # The Habermas Machine protocol's screens (positions, critiques, a human mediator, closing) need its bots.
        self.protocol = found.critique_rounds > 0 or found.ask_positions or found.arms.filter(human_mediator=True).exists()
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            if not url:
                log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="concord-bots-")))
                url = stack.enter_context(local_site(log_dir=log_dir))
            results = asyncio.run(self._run_all(url, plans, timeout))
        for room, plan in zip(rooms, plans):
            for label, persona in zip(plan.labels, plan.personas):
                services.participant_persona_record(room_id=room.pk, external_id=label, persona=persona.as_record())
        failures = [r for r in results if isinstance(r, BaseException)]
        problems = {room.pk: found_problems for room, plan in zip(rooms, plans) if (found_problems := group_problems(room, len(plan.labels)))}
        summary = self._summary(rooms, time.monotonic() - started, failures)
        summary["groups_as_designed"] = len(rooms) - len(problems)
        summary["problems"] = {str(room_id): found for room_id, found in problems.items()}
        self.stdout.write(json.dumps(summary, indent=2))
        if failures or problems:
            lines = [f"room {room_id}: " + "; ".join(found) for room_id, found in problems.items()] + [f"bot error: {f}" for f in failures]
            raise CommandError(
                f"{len(problems)} of {len(rooms)} group(s) did not finish as designed"
                + (f", {len(failures)} group(s) failed" if failures else "") + ":\n  " + "\n  ".join(lines)
            )

    async def _run_all(self, url: str, plans: list[bots.GroupPlan], timeout: float) -> list[object]:
        run_group = protocol_bots.run_protocol_group if self.protocol else bots.run_group
        return list(await asyncio.gather(*(run_group(base_url=url, plan=plan, timeout=timeout) for plan in plans), return_exceptions=True))

    def _summary(self, rooms: list[Room], seconds: float, failures: list[BaseException]) -> dict[str, object]:
        room_ids = [room.pk for room in rooms]
        rounds = list(Round.objects.filter(room_id__in=room_ids).select_related("room__arm"))
        per_arm: dict[str, dict[str, list[float]]] = {}
        round_seconds: list[float] = []
        mediation_seconds: list[float] = []
        for round_ in rounds:
            if round_.opinions_started_at and round_.finished_at:
                round_seconds.append((round_.finished_at - round_.opinions_started_at).total_seconds())
            if round_.mediation_started_at and round_.rating_started_at:
                mediation_seconds.append((round_.rating_started_at - round_.mediation_started_at).total_seconds())
            # The group's own arm's chosen statement (a head-to-head round also has the compared arm's rank 1).
            winner = Candidate.objects.filter(round=round_, rank=1).filter(Q(source_arm=round_.room.arm) | Q(source_arm=None)).first()
            scores = list(Rating.objects.filter(candidate=winner).values_list("agreement", flat=True)) if winner else []
            if scores:
                arm = per_arm.setdefault(round_.room.arm.name, {"mean": [], "worst_off": []})
                arm["mean"].append(mean(scores))
                arm["worst_off"].append(min(scores))
        return {
            "groups": len(rooms),
            # A group is complete when its last round is (a protocol group plays several rounds).
            "groups_completed": sum(
                1
                for r in rounds
                if r.phase == Round.Phase.DONE and r.outcome == Round.Outcome.COMPLETED
                and r.index == max(o.index for o in rounds if o.room_id == r.room_id)
            ),
            "failures": [str(f) for f in failures],
            "counts": {
                "participants": Participant.objects.filter(room_id__in=room_ids).count(),
                "opinions": Opinion.objects.filter(round__room_id__in=room_ids).count(),
                "candidates": Candidate.objects.filter(round__room_id__in=room_ids).count(),
                "predicted_agreements": PredictedAgreement.objects.filter(candidate__round__room_id__in=room_ids).count(),
                "presentations": Presentation.objects.filter(candidate__round__room_id__in=room_ids).count(),
                "ratings": Rating.objects.filter(candidate__round__room_id__in=room_ids).count(),
                "rankings": Ranking.objects.filter(round__room_id__in=room_ids).count(),
                # The Habermas Machine protocol (zero when the experiment does not use it).
                "critique_rounds": Round.objects.filter(room_id__in=room_ids, kind=Round.Kind.CRITIQUE).count(),
                "critiques": Opinion.objects.filter(round__room_id__in=room_ids, round__kind=Round.Kind.CRITIQUE).count(),
                "positions": Position.objects.filter(participant__room_id__in=room_ids).count(),
                "final_preferences": FinalPreference.objects.filter(participant__room_id__in=room_ids).count(),
                "human_statements": Candidate.objects.filter(round__room_id__in=room_ids, author__isnull=False).count(),
                "pairwise_preferences": PairwisePreference.objects.filter(round__room_id__in=room_ids).count(),
                "opinion_ratings": OpinionRating.objects.filter(opinion__round__room_id__in=room_ids).count(),
                "attention_checks": AttentionCheck.objects.filter(round__room_id__in=room_ids).count(),
            },
            # Agreement of each group with its winning (rank 1) statement, averaged over the arm's groups.
            "agreement_by_arm": {
                name: {"groups": len(v["mean"]), "mean": round(mean(v["mean"]), 3), "worst_off": round(mean(v["worst_off"]), 3)}
                for name, v in per_arm.items()
            },
            "seconds_per_round": round(mean(round_seconds), 2) if round_seconds else None,
            "mediation_seconds_per_round": round(mean(mediation_seconds), 2) if mediation_seconds else None,
            "wall_seconds": round(seconds, 2),
        }


def group_problems(room: Room, expected_members: int) -> list[str]:
    """What in this group did not happen as the experiment designed it (empty: the group finished as designed):
    every bot joined, the round ended `completed`, nobody dropped out, and every member rated every statement
    shown to them, answered every protocol step the experiment enables and ranked."""
    problems = []
    members = list(Participant.objects.filter(room=room).order_by("id"))
    if len(members) != expected_members:
        problems.append(f"{len(members)} of {expected_members} bots joined")
    for round_ in Round.objects.filter(room=room).order_by("index"):
        if round_.phase != Round.Phase.DONE or round_.outcome != Round.Outcome.COMPLETED:
            problems.append(f"round {round_.index} is {round_.phase}/{round_.outcome or 'pending'}" + (f" ({round_.mediation_error})" if round_.mediation_error else ""))
        raters = round_.rater_ids()
        for member in members:
            if member.dropped_out_at is not None:
                problems.append(f"{member.external_id} dropped out ({member.dropout_reason or 'no reason recorded'})")
                continue
            if round_.mediator_id == member.pk:
                # A human mediator writes this round's statement and rates nothing.
                if not Candidate.objects.filter(round=round_, author=member).exists():
                    problems.append(f"{member.external_id} was the mediator of round {round_.index} and wrote no statement")
                continue
            if round_.kind == Round.Kind.CRITIQUE and not Opinion.objects.filter(round=round_, participant=member).exists():
                problems.append(f"{member.external_id} wrote no critique in round {round_.index}")
            if member.pk not in raters:
                problems.append(f"{member.external_id} was shown no statements")
                continue
            shown = Presentation.objects.filter(participant=member, candidate__round=round_).count()
            rated = Rating.objects.filter(participant=member, candidate__round=round_).count()
            if rated < shown:
                problems.append(f"{member.external_id} rated {rated} of {shown} statements")
            todo = selectors.protocol_todo(participant=member, round_=round_)
            if todo.preference_pairs:
                problems.append(f"{member.external_id} left {len(todo.preference_pairs)} head-to-head preference(s) unanswered")
            if todo.opinion_ids:
                problems.append(f"{member.external_id} left {len(todo.opinion_ids)} opinion rating(s) unanswered")
            if todo.attention_check:
                problems.append(f"{member.external_id} did not answer the attention item")
            if not Ranking.objects.filter(participant=member, round=round_).exists():
                problems.append(f"{member.external_id} did not rank")
    # The Habermas Machine protocol's closing steps, for every member who took part to the end.
    experiment = room.experiment
    for member in members:
        if member.dropped_out_at is not None:
            continue
        mediated_any_round = Round.objects.filter(room=room, mediator=member).exists()
        if experiment.ask_positions and not mediated_any_round:  # a human mediator is not asked for a position
            stages = set(Position.objects.filter(participant=member).values_list("stage", flat=True))
            for stage in (Position.Stage.BEFORE, Position.Stage.AFTER):
                if stage not in stages:
                    problems.append(f"{member.external_id} gave no position {stage}")
        if experiment.critique_rounds > 0 and not mediated_any_round and not FinalPreference.objects.filter(participant=member).exists():
            problems.append(f"{member.external_id} gave no final preference")
    return problems
