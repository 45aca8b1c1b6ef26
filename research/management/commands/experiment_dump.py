"""python manage.py experiment_dump SLUG --as-user USERNAME [--out FILE.toml]: write an experiment in the format experiment_apply reads."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from accounts.commands import acting_user, add_as_user_argument
from accounts.permissions import experiment_filter
from deliberation.models import Experiment
from research.experiment_files import dump_text


class Command(BaseCommand):
    help = "Write an experiment, its protocols and arms as TOML (the format experiment_apply reads)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("slug", metavar="SLUG")
        parser.add_argument("--out", type=Path, metavar="FILE.toml", help="Write here instead of to standard output.")
        add_as_user_argument(parser)

    def handle(self, *args, slug: str, out: Path | None, as_user: str, **options) -> None:
        user = acting_user(as_user)
        # Reading is enough: a viewer may dump what the researcher pages already show them.
        experiment = Experiment.objects.filter(experiment_filter(user), slug=slug).first()
        if experiment is None:
            raise CommandError(f"No experiment with the slug {slug!r} that {user.get_username()} may see.")
        text = dump_text(experiment)
        if out is None:
            self.stdout.write(text, ending="")
        else:
            out.write_text(text, encoding="utf-8")
            self.stdout.write(f"Wrote {out}.")
