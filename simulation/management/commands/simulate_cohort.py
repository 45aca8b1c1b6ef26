"""Pilot an experiment with simulated participants who use the real site, like oTree's bots.

Without --url it starts the site itself (daphne, plus a Celery worker when REDIS_URL
is set) on a free local port against the configured database, and stops it after.
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
from deliberation import services
from deliberation.models import (
    Candidate,
    Experiment,
    FinalPreference,
    Opinion,
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
        add_as_user_argument(parser)  # bots fill rooms of the experiment: the same rule as the researcher pages

    def handle(self, *args: object, experiment: str, groups: int, group_size: int | None, seed: int, url: str, timeout: float, as_user: str, **options: object) -> None:
        lookup = Q(slug=experiment) | Q(pk=int(experiment)) if experiment.isdigit() else Q(slug=experiment)
        found, _ = experiment_for_command(Experiment.objects.all(), lookup=lookup, described=f"with id or slug {experiment!r}", username=as_user)
        size = group_size or found.group_size
        if groups < 1 or not 2 <= size <= 8:
            raise CommandError("--groups must be at least 1 and --group-size between 2 and 8.")
        if found.status != Experiment.Status.ACTIVE:
            raise CommandError(f"Experiment {found.slug!r} is {found.status}; activate it to pilot it.")

        from deliberation.mediator import load_models

        generator, _ = load_models(arm=None)
        rng = random.Random(seed)
        plans: list[bots.GroupPlan] = []
        rooms: list[Room] = []
        for group_index in range(groups):
            room = services.room_create(experiment=found)
            Room.objects.filter(pk=room.pk).update(capacity=size)
            rooms.append(room)
            personas = bots.make_personas(rng, size)
            group_seed = rng.getrandbits(31)
            opinions = bots.write_opinions(
                generator,  # type: ignore[arg-type]
                question=room.question.text,
                affirming=room.question.affirming_statement or room.question.text,
                negating=room.question.negating_statement or f"No: {room.question.text}",
                personas=personas,
                seed=group_seed,
            )
            plans.append(
                bots.GroupPlan(
                    join_path=f"e/{found.slug}/r/{room.code}/join/",
                    question=room.question.text,
                    affirming=room.question.affirming_statement,
                    negating=room.question.negating_statement,
                    labels=[f"bot-{seed}-{group_index}-{i}" for i in range(size)],
                    personas=personas,
                    opinions=opinions,
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
        failures = [r for r in results if isinstance(r, BaseException)]
        summary = self._summary(rooms, time.monotonic() - started, failures)
        self.stdout.write(json.dumps(summary, indent=2))
        if failures:
            raise CommandError(f"{len(failures)} group(s) failed: {failures[0]}")

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
            winner = Candidate.objects.filter(round=round_, rank=1).first()
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
