"""python manage.py experiment_dump SLUG [--out FILE.toml]: write an experiment in the format experiment_apply reads."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from deliberation.models import Experiment
from research.experiment_files import dump_text


class Command(BaseCommand):
    help = "Write an experiment, its protocols and arms as TOML (the format experiment_apply reads)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("slug", metavar="SLUG")
        parser.add_argument("--out", type=Path, metavar="FILE.toml", help="Write here instead of to standard output.")

    def handle(self, *args, slug: str, out: Path | None, **options) -> None:
        experiment = Experiment.objects.filter(slug=slug).first()
        if experiment is None:
            raise CommandError(f"No experiment with the slug {slug!r}.")
        text = dump_text(experiment)
        if out is None:
            self.stdout.write(text, ending="")
        else:
            out.write_text(text, encoding="utf-8")
            self.stdout.write(f"Wrote {out}.")
