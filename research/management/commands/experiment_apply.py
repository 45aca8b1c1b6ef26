"""python manage.py experiment_apply FILE.toml --as-user USERNAME: create or update an experiment from a file."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from accounts.commands import acting_user, add_as_user_argument
from research.experiment_files import ExperimentFileError, experiment_apply


class Command(BaseCommand):
    help = "Create or update an experiment, its protocols and arms from a TOML file (docs/experiments.md, 'Experiments as files')."

    def add_arguments(self, parser) -> None:
        parser.add_argument("file", type=Path, metavar="FILE.toml")
        # The researcher applying it owns a new experiment; an existing one needs its owner, an editor or a
        # superuser (checked by research.experiment_files.experiment_apply).
        add_as_user_argument(parser)

    def handle(self, *args, file: Path, as_user: str, **options) -> None:
        account = acting_user(as_user)
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
