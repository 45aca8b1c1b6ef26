"""Analytics benchmark: how long the analytics page takes for a study of 100,000 agreement ratings.

    .venv/bin/python bench/analytics.py                 # 100,000 ratings (part of `make bench`)
    .venv/bin/python bench/analytics.py --ratings 20000 # a quick look

Builds a study in its own SQLite database (var/bench-analytics.sqlite3, created fresh and migrated, so it
never touches development or test data): two arms, groups of 4 members, K = 4 shown statements each
rated by every member (16 ratings per group: 6,250 groups for 100,000 ratings), the reward model's
predictions for every rating, opinion ratings (every member rates the other three opinions), attention
checks (one member in 20 fails) and a dropout in one group in 50. Agreement is drawn from a seeded
distribution that differs by arm, so the between-arm comparisons have something to find.

Then it times, with the Django test client as a logged-in owner (each median of --repeats runs):
the analytics page without exclusions, the page with all three exclusion rules (which computes the
analysis twice: with and without), the CSV, and the forest plot as PNG. It writes
bench/results/analytics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DB_PATH = ROOT / "var" / "bench-analytics.sqlite3"


def _setup_django() -> None:
    sys.path.insert(0, str(ROOT))
    DB_PATH.parent.mkdir(exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{DB_PATH}{suffix}").unlink(missing_ok=True)
    os.environ["DATABASE_URL"] = f"sqlite:///{DB_PATH}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("DEBUG", "1")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def build_study(*, ratings: int, seed: int) -> tuple[object, object, dict[str, int]]:
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.utils import timezone

    from deliberation.models import (
        Arm,
        AttentionCheck,
        Candidate,
        Experiment,
        Opinion,
        OpinionRating,
        Participant,
        PredictedAgreement,
        Question,
        Rating,
        Room,
        Round,
    )

    members, shown = 4, 4
    groups = max(2, ratings // (members * shown))
    rng = random.Random(seed)
    now = timezone.now()
    owner = get_user_model().objects.create_user(username="bench-owner", password="bench")
    question = Question.objects.create(external_id="bench-q", text="Should the bench be fast?")
    experiment = Experiment.objects.create(slug="bench", name="Bench study", owner=owner, group_size=members, rate_opinions=True, attention_check=True, assignment_seed=seed)
    arms = [Arm.objects.create(experiment=experiment, name=name, reward_model=model, k_shown=shown, n_candidates=shown)
            for name, model in (("ranked", "stance-head"), ("baseline", "none"))]
    batch = 5000
    with transaction.atomic():
        rooms = Room.objects.bulk_create(
            [Room(experiment=experiment, arm=arms[g % 2], question=question, capacity=members, status=Room.Status.CLOSED) for g in range(groups)], batch_size=batch
        )
        dropout_rooms = {room.pk for i, room in enumerate(rooms) if i % 50 == 7}
        rounds = Round.objects.bulk_create(
            [Round(room=room, index=0, phase=Round.Phase.DONE, seed=i,
                   outcome=Round.Outcome.COMPLETED) for i, room in enumerate(rooms)], batch_size=batch
        )
        participants = Participant.objects.bulk_create(
            [Participant(room=room, label=f"P{m}", finished_at=None if room.pk in dropout_rooms and m == 0 else now,
                         dropped_out_at=now if room.pk in dropout_rooms and m == 0 else None)
             for room in rooms for m in range(members)], batch_size=batch
        )
        opinions = Opinion.objects.bulk_create(
            [Opinion(round=round_, participant=participants[g * members + m], text=f"opinion {m}") for g, round_ in enumerate(rounds) for m in range(members)],
            batch_size=batch,
        )
        candidates = Candidate.objects.bulk_create(
            [Candidate(round=round_, index=c, text=f"statement {c}", backend="bench", model_id="bench", seed=c, prompt="",
                       rank=c + 1, shown=True, source_arm=rooms[g].arm, welfare_method="utilitarian")
             for g, round_ in enumerate(rounds) for c in range(shown)], batch_size=batch
        )
        rating_rows, prediction_rows, opinion_rows, attention_rows = [], [], [], []
        for g, room in enumerate(rooms):
            lift = 0.4 if room.arm_id == arms[0].pk else 0.0
            for m in range(members):
                participant = participants[g * members + m]
                for c in range(shown):
                    candidate = candidates[g * shown + c]
                    agreement = min(7, max(1, round(rng.gauss(4 + lift - 0.3 * c, 1.5))))
                    rating_rows.append(Rating(participant=participant, candidate=candidate, agreement=agreement, quality=rng.randint(3, 7)))
                    prediction_rows.append(PredictedAgreement(candidate=candidate, participant=participant, reward_model=room.arm.reward_model,
                                                              score=4.0 if room.arm.reward_model == "none" else agreement + rng.gauss(0, 1)))
                for other in range(members):
                    if other != m:
                        opinion_rows.append(OpinionRating(participant=participant, opinion=opinions[g * members + other], agreement=rng.randint(2, 6)))
                passed = rng.random() >= 0.05
                attention_rows.append(AttentionCheck(participant=participant, round=rounds[g], expected=2, answer=2 if passed else 6, passed=passed))
        Rating.objects.bulk_create(rating_rows, batch_size=batch)
        PredictedAgreement.objects.bulk_create(prediction_rows, batch_size=batch)
        OpinionRating.objects.bulk_create(opinion_rows, batch_size=batch)
        AttentionCheck.objects.bulk_create(attention_rows, batch_size=batch)
    return experiment, owner, {
        "groups": groups, "participants": len(participants), "ratings": len(rating_rows), "predicted_agreement": len(prediction_rows),
        "opinion_ratings": len(opinion_rows), "attention_checks": len(attention_rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratings", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "analytics.json"))
    args = parser.parse_args()
    _setup_django()
    from django.test import Client

    started = time.perf_counter()
    experiment, owner, counts = build_study(ratings=args.ratings, seed=args.seed)
    build_seconds = time.perf_counter() - started
    client = Client()
    client.force_login(owner)
    base = f"/researcher/experiments/{experiment.slug}/analytics"  # type: ignore[attr-defined]
    every_rule = "?exclude=dropouts&exclude=failed_attention&exclude=incomplete_groups"
    targets = {
        "page": f"{base}/",
        "page_with_all_exclusion_rules": f"{base}/{every_rule}",
        "csv_with_all_exclusion_rules": f"{base}.csv{every_rule}",
        "forest_png": f"{base}/forest.png",
    }
    timings: dict[str, dict[str, float]] = {}
    for name, url in targets.items():
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            response = client.get(url)
            seconds.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise SystemExit(f"{url} answered {response.status_code}")
        timings[name] = {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3), "max_s": round(max(seconds), 3)}
        print(f"{name}: median {timings[name]['median_s']} s over {args.repeats}", flush=True)
    result = {
        "benchmark": "analytics",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        # The load average says how shared the machine was while the timings were taken.
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]},
        "database": "sqlite (var/bench-analytics.sqlite3)",
        "study": counts,
        "build_seconds": round(build_seconds, 1),
        "repeats": args.repeats,
        "timings": timings,
        "bootstrap_resamples": 2000,
        "permutations": 2000,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
