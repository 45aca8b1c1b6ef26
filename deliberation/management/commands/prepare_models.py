"""Verify, convert and load the configured models once, so the first round is not the slow one."""

from __future__ import annotations

import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from deliberation.mediator import load_models


class Command(BaseCommand):
    help = "Check the default generator (sha256) and reward model, cache converted weights, and load both."

    def handle(self, *args, **options) -> None:
        started = time.monotonic()
        self.stdout.write(
            f"Preparing {settings.CONCORD_GENERATOR_BACKEND}:{settings.CONCORD_GENERATOR_MODEL} "
            f"and reward model {settings.CONCORD_REWARD_MODEL} (first run converts weights; later runs are fast)…"
        )
        try:
            generator, reward_model = load_models(arm=None)
        except Exception as error:  # A broken model install must stop `make run` with the reason.
            raise CommandError(f"Could not load the models: {type(error).__name__}: {error}") from error
        self.stdout.write(
            f"Ready in {time.monotonic() - started:.1f}s: generator {generator.model_id} ({generator.model_revision[:12]}), "
            f"reward model {reward_model.name} ({reward_model.version[:12]})."
        )
