"""Create the demo experiment, its questions and a researcher login. Safe to run again."""

from __future__ import annotations

import json
import os
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from accounts import permissions
from deliberation.models import Arm, Experiment, Question

DEMO_QUESTIONS = Path(__file__).resolve().parents[2] / "demo_questions.json"


class Command(BaseCommand):
    help = "Idempotently create the demo experiment (slug 'demo'), its questions and a researcher login."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--username", default=os.environ.get("CONCORD_DEMO_USERNAME", "researcher"))
        parser.add_argument("--password", default=os.environ.get("CONCORD_DEMO_PASSWORD", "concord-demo"))
        parser.add_argument("--group-size", type=int, default=3)
        parser.add_argument("--n", type=int, default=16, help="Candidates written per round.")
        parser.add_argument("--k", type=int, default=4, help="Candidates shown to each participant.")

    @transaction.atomic
    def handle(self, *args, username: str, password: str, group_size: int, n: int, k: int, **options) -> None:
        User = get_user_model()
        researcher, created_user = User.objects.get_or_create(
            username=username, defaults={"is_staff": True, "is_superuser": True}
        )
        if created_user:
            researcher.set_password(password)
            researcher.save()
        questions = []
        for row in json.loads(DEMO_QUESTIONS.read_text()):
            question, _ = Question.objects.update_or_create(
                external_id=row["id"],
                defaults={
                    "text": row["question"],
                    "affirming_statement": row["affirming_statement"],
                    "negating_statement": row["negating_statement"],
                    "topic": row["topic"],
                    "split": row["split"],
                    "source": "Concord demo set",
                },
            )
            questions.append(question)
        experiment, created = Experiment.objects.get_or_create(
            slug="demo",
            defaults={
                "name": "Concord demo",
                "owner": researcher,
                "group_size": group_size,
                "description": "A demo deliberation: open the invite link in one browser window per participant.",
                "allow_several_seats_per_browser": True,
            },
        )
        # The demo belongs to the login this command makes (a superuser by default); run again with another
        # --username, it changes the demo only if that user may (accounts.permissions), like every command.
        if not created and not permissions.can_change_experiment(researcher, experiment):
            raise CommandError(f"{username} may not change the existing demo experiment (owned by {experiment.owner}).")
        if not experiment.allow_several_seats_per_browser:
            # The demo is played in several windows of one browser (README), so it allows several seats per browser.
            Experiment.objects.filter(pk=experiment.pk).update(allow_several_seats_per_browser=True)
        experiment.questions.add(*questions)
        Arm.objects.get_or_create(experiment=experiment, name="default", defaults={"n_candidates": n, "k_shown": k})
        verb = "Created" if created else "Found"
        self.stdout.write(f"{verb} experiment 'demo' with {len(questions)} questions; researcher login: {username}"
                          + (f" / {password}" if created_user else " (existing password)"))
