"""Generate candidate consensus statements from the command line, without touching the database.

    python manage.py generate_candidates --question "How should we ...?" \\
        --opinion "I think ..." --opinion "We should ..." --n 4 --seed 1 --json
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from deliberation.mediator import generator_config
from modeling.generation.base import GenerationError, GenerationRequest, SamplingParams
from modeling.generation.config import load_generator
from modeling.generation.registry import BACKENDS


class Command(BaseCommand):
    help = "Sample N candidate consensus statements for a question and a set of opinions."
    # Pure computation: no system checks (they may inspect the database) and no migrations check.
    requires_system_checks: tuple[str, ...] = ()
    requires_migrations_checks = False

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--question", required=True, help="The question the group is deliberating.")
        parser.add_argument(
            "--opinion", action="append", default=[], dest="opinions", help="One participant's opinion (repeat)."
        )
        parser.add_argument("--n", type=int, default=4, help="Number of candidate statements (default 4).")
        parser.add_argument("--seed", type=int, default=0, help="Seed for opinion orders and sampling.")
        parser.add_argument("--backend", default=None, help="Generation backend (default CONCORD_GENERATOR_BACKEND).")
        parser.add_argument("--model", default=None, help="Model alias, hub id or path (default CONCORD_GENERATOR_MODEL).")
        parser.add_argument(
            "--max-new-tokens", type=int, default=None, help="Token budget per statement (default CONCORD_MAX_NEW_TOKENS)."
        )
        parser.add_argument("--temperature", type=float, default=SamplingParams.temperature)
        parser.add_argument("--top-p", type=float, default=SamplingParams.top_p)
        parser.add_argument("--json", action="store_true", help="Print a JSON list of candidates with provenance.")

    def handle(self, *args: Any, **options: Any) -> None:
        question: str = options["question"].strip()
        opinions = [opinion.strip() for opinion in options["opinions"] if opinion.strip()]
        backend: str = options["backend"] or settings.CONCORD_GENERATOR_BACKEND
        model: str = options["model"] or settings.CONCORD_GENERATOR_MODEL
        max_new_tokens: int = options["max_new_tokens"] or settings.CONCORD_MAX_NEW_TOKENS
        n: int = options["n"]
        if not question:
            raise CommandError("--question must not be empty.")
        if not opinions:
            raise CommandError("Give at least one non-empty --opinion.")
        if n < 1:
            raise CommandError(f"--n must be at least 1 (got {n}).")
        if max_new_tokens < 1:
            raise CommandError(f"--max-new-tokens must be at least 1 (got {max_new_tokens}).")
        if not 0.0 <= options["temperature"] <= 5.0 or not 0.0 < options["top_p"] <= 1.0:
            raise CommandError("--temperature must lie in [0, 5] and --top-p in (0, 1].")
        if backend not in BACKENDS:
            raise CommandError(f"Unknown backend {backend!r}; choose one of: {', '.join(sorted(BACKENDS))}.")

        request = GenerationRequest(
            question=question,
            opinions=opinions,
            n=n,
            seed=options["seed"],
            sampling=SamplingParams(
                temperature=options["temperature"], top_p=options["top_p"], max_new_tokens=max_new_tokens
            ),
        )
        verbose = options["verbosity"] >= 2

        def report(done: int, total: int) -> None:
            if verbose:
                sys.stderr.write(f"generated {done}/{total}\n")

        try:
            generator = load_generator(generator_config(backend=backend, model=model))
            candidates = generator.generate(request, on_progress=report)
        except GenerationError as error:
            raise CommandError(str(error)) from error

        if options["json"]:
            rows = [{"model": candidate.model_id, **asdict(candidate)} for candidate in candidates]
            self.stdout.write(json.dumps(rows, indent=2, ensure_ascii=False))
            return
        for number, candidate in enumerate(candidates, start=1):
            self.stdout.write(f"[{number}] {candidate.text}")
        self.stdout.write(
            self.style.NOTICE(f"{len(candidates)} candidates from {backend}:{model} ({generator.model_revision})")
        )
