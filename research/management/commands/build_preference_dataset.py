"""Write chosen/rejected statement pairs from a study's rankings and head-to-head preferences.

    python manage.py build_preference_dataset [--experiment SLUG ...] [--min-margin M] --out FILE.jsonl

Rows are in trl's conversational preference format (prompt, chosen, rejected), which DPOTrainer and
`train_generator --method dpo` read; the prompt is the generator's own (modeling.training.study_data).
Prints how many votes and pairs each step kept and dropped; exits with an error when nothing is kept.
Questions of the iid_test and ood_test splits are always left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from modeling.training.study_data import NothingKept, write_jsonl
from research.training_data import preference_dataset

from .build_sft_dataset import experiments_named


class Command(BaseCommand):
    help = "Write chosen/rejected pairs (JSONL, trl's preference format) from rankings and head-to-head preferences."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--experiment", action="append", default=[], help="Only this experiment (repeatable; default: all).")
        parser.add_argument("--min-margin", type=int, default=1, help="Votes the majority must lead by (default 1: ties dropped).")
        parser.add_argument("--out", required=True, type=Path)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["min_margin"] < 1:
            raise CommandError("--min-margin must be at least 1.")
        try:
            build = preference_dataset(experiments=experiments_named(options["experiment"]), min_margin=options["min_margin"])
        except NothingKept as error:
            raise CommandError(str(error)) from None
        self.stdout.write(build.report())
        count = write_jsonl(build.rows, options["out"])
        self.stdout.write(f"wrote {count} pairs to {options['out']}")
