"""Print the Habermas Machine protocol's figures for an experiment as JSON (research/analytics_protocol.py)."""

from __future__ import annotations

import dataclasses
import json

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q

from deliberation.models import Experiment
from research.analytics_protocol import load_protocol, protocol_report


class Command(BaseCommand):
    help = "The protocol's figures: revised vs first agreement, share preferring the revision, positions, AI vs human."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--experiment", required=True, help="Experiment id or slug.")

    def handle(self, *args: object, experiment: str, **options: object) -> None:
        lookup = Q(slug=experiment) | Q(pk=int(experiment)) if experiment.isdigit() else Q(slug=experiment)
        found = Experiment.objects.filter(lookup).first()
        if found is None:
            raise CommandError(f"No experiment with id or slug {experiment!r}.")
        report = protocol_report(load_protocol(found))
        self.stdout.write(json.dumps({"experiment": found.slug, **dataclasses.asdict(report)}, indent=2))
