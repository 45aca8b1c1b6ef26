"""python manage.py experiment_apply FILE.toml --user USERNAME: create or update an experiment from a file."""

from __future__ import annotations

from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from research.experiment_files import ExperimentFileError, experiment_apply


class Command(BaseCommand):
    help = "Create or update an experiment, its protocols and arms from a TOML file (docs/experiments.md, 'Experiments as files')."

    def add_arguments(self, parser) -> None:
        parser.add_argument("file", type=Path, metavar="FILE.toml")
        parser.add_argument(
            "--user", required=True, metavar="USERNAME",
            help="The researcher applying it: owner of a new experiment; an existing one needs its owner or an editor.",
        )

    def handle(self, *args, file: Path, user: str, **options) -> None:
        account = get_user_model().objects.filter(username=user).first()
        if account is None:
            raise CommandError(f"No user named {user!r}.")
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as error:
            raise CommandError(f"Cannot read {file}: {error.strerror}") from None
        try:
            outcome = experiment_apply(text=text, user=account)
        except ExperimentFileError as error:
            raise CommandError(f"{file}: {error}") from None
        verb = "created" if outcome.created else ("updated" if outcome.changed else "unchanged")
        arms = outcome.experiment.arms.count()
        self.stdout.write(f"Experiment {outcome.experiment.slug!r} {verb} ({arms} arm(s)).")
