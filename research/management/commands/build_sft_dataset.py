"""Write the statements a study's groups rated highly as SFT training data.

    python manage.py build_sft_dataset [--experiment SLUG ...] [--min-quality Q] [--min-agreement A]
        [--welfare NAME] --out FILE.jsonl

Rows are in the format train_generator reads (question, opinions, statement, group_id), with the
generator's own prompt alongside (modeling.training.study_data). Prints how many rows each filter
kept and dropped; exits with an error when nothing is kept. Questions of the iid_test and ood_test
splits are always left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from deliberation.models import Experiment
from modeling.training.study_data import DEFAULT_MIN_QUALITY, NothingKept, write_jsonl
from modeling.welfare import WELFARE_FUNCTIONS
from research.training_data import sft_dataset


def experiments_named(slugs: list[str]) -> list[Experiment] | None:
    """The experiments with these slugs (None: all); an unknown slug is an error."""
    if not slugs:
        return None
    found = {e.slug: e for e in Experiment.objects.filter(slug__in=slugs)}
    missing = [slug for slug in slugs if slug not in found]
    if missing:
        raise CommandError(f"No experiment with slug {', '.join(missing)}.")
    return [found[slug] for slug in slugs]


class Command(BaseCommand):
    help = "Write the statements groups rated highly (SFT rows, JSONL) from the database."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--experiment", action="append", default=[], help="Only this experiment (repeatable; default: all).")
        parser.add_argument(
            "--min-quality", type=float, default=DEFAULT_MIN_QUALITY,
            help=f"Keep statements whose mean quality rating (1-7) is at least this (default {DEFAULT_MIN_QUALITY:g}).",
        )
        parser.add_argument("--min-agreement", type=float, help="Keep statements whose mean agreement (1-7) is at least this.")
        parser.add_argument(
            "--welfare", choices=sorted(WELFARE_FUNCTIONS),
            help="Keep only each round's winner under this welfare function of the raters' agreement.",
        )
        parser.add_argument("--out", required=True, type=Path)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            build = sft_dataset(
                experiments=experiments_named(options["experiment"]),
                min_quality=options["min_quality"],
                min_agreement=options["min_agreement"],
                welfare=options["welfare"],
            )
        except NothingKept as error:
            raise CommandError(str(error)) from None
        self.stdout.write(build.report())
        count = write_jsonl(build.rows, options["out"])
        self.stdout.write(f"wrote {count} rows to {options['out']}")
