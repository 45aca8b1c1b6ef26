"""Measure whether a generator's statements are usable, on a hand-written evaluation set.

    python manage.py evaluate_generator --data modeling/data/consensus_dev.jsonl \\
        [--model M | --version V] [--adapter DIR] [--compare-base] [--n 16] [--groups K] \\
        [--max-new-tokens T] [--seed S] [--out FILE.json]

For each group: N candidates from the site's generator (or --model / --adapter), scored for every
(member, candidate) by the site's reward model, ranked by utilitarian welfare, the top 4 marked
shown, and every candidate checked by modeling.generation.quality (the core:
modeling/generator_quality.py). Writes JSON (stdout without --out); progress goes to stderr.
The database is only read, for --version.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from deliberation import mediator
from deliberation.models import GeneratorVersion
from modeling.generation.base import GenerationError
from modeling.generation.models import ModelResolutionError
from modeling.generation.registry import BACKENDS
from modeling.generator_quality import DEFAULT_N
from modeling.training.consensus_data import DatasetError, load_groups
from research.generator_evaluation import generator_evaluate


class Command(BaseCommand):
    help = (
        "Generate N candidates per group of an evaluation file, rank them with the reward model and "
        "report how many are usable (group voice, on topic, every member, no meta-talk, complete, no "
        "repetition, no injected payload). --version V evaluates a registered generator version; --adapter DIR "
        "an adapter directory; --compare-base adds the untuned base on the same seeds."
    )
    requires_system_checks: tuple[str, ...] = ()
    requires_migrations_checks = False

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        # Django gives every command a --version (its own version); here --version names a generator version.
        return super().create_parser(prog_name, subcommand, conflict_handler="resolve", **kwargs)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--data", required=True, help="Evaluation groups (JSONL, e.g. modeling/data/consensus_dev.jsonl).")
        which = parser.add_mutually_exclusive_group()
        which.add_argument(
            "--version",
            default=None,
            help="A registered GeneratorVersion (its name) to evaluate.",
        )
        which.add_argument("--model", default=None, help="Model alias, hub id or path (default CONCORD_GENERATOR_MODEL).")
        parser.add_argument("--backend", default=None, help="Generation backend (default CONCORD_GENERATOR_BACKEND).")
        parser.add_argument("--adapter", type=Path, default=None, help="A PEFT/LoRA adapter directory to merge into the model.")
        parser.add_argument(
            "--compare-base", action="store_true", help="With --adapter: evaluate the base model too, on the same seeds."
        )
        parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"Candidates per group (default {DEFAULT_N}).")
        parser.add_argument("--groups", type=int, default=None, help="Only the first K groups of the file.")
        parser.add_argument(
            "--max-new-tokens", type=int, default=None, help="Token budget per statement (default CONCORD_MAX_NEW_TOKENS)."
        )
        parser.add_argument("--seed", type=int, default=0, help="Seed; each group derives its own from it and its id.")
        parser.add_argument("--out", type=Path, default=None, help="Write the JSON here (default: stdout).")

    def handle(self, *args: Any, **options: Any) -> None:
        version = None
        if options["version"]:
            version = GeneratorVersion.objects.filter(name=options["version"]).first()
            if version is None:
                raise CommandError(f"No generator version named {options['version']!r}.")
        n: int = options["n"]
        max_new_tokens: int = options["max_new_tokens"] or settings.CONCORD_MAX_NEW_TOKENS
        backend: str = options["backend"] or settings.CONCORD_GENERATOR_BACKEND
        adapter: Path | None = options["adapter"]
        if n < 1:
            raise CommandError(f"--n must be at least 1 (got {n}).")
        if max_new_tokens < 1:
            raise CommandError(f"--max-new-tokens must be at least 1 (got {max_new_tokens}).")
        if options["groups"] is not None and options["groups"] < 1:
            raise CommandError(f"--groups must be at least 1 (got {options['groups']}).")
        if backend not in BACKENDS:
            raise CommandError(f"Unknown backend {backend!r}; choose one of: {', '.join(sorted(BACKENDS))}.")
        if version is None and adapter is None and not options["model"] and not options["backend"]:
            # The site's default: the shipped (or configured) adapter, if there is one (CONCORD_GENERATOR_ADAPTER).
            version = mediator.default_generator_version()
        if options["compare_base"] and adapter is None and version is None:
            raise CommandError("--compare-base compares a tuned model with its base: give --version V or --adapter DIR.")
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            raise CommandError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json).")

        data = Path(options["data"])
        try:
            groups = load_groups(data)
        except DatasetError as error:
            raise CommandError(f"{data}: not a usable evaluation file:\n{error}") from error
        except OSError as error:
            raise CommandError(f"{data}: cannot read: {error}") from error
        if not groups:
            raise CommandError(f"{data}: no groups.")
        if options["groups"] is not None:
            groups = groups[: options["groups"]]

        def progress(message: str) -> None:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

        try:
            report = generator_evaluate(
                groups=groups, data=data, n=n, seed=options["seed"], max_new_tokens=max_new_tokens, backend=backend,
                version=version, model=options["model"] or "", adapter=adapter, compare_base=options["compare_base"],
                on_progress=progress,
            )  # fmt: skip
        except (GenerationError, ModelResolutionError) as error:
            raise CommandError(str(error)) from error
        runs = report["runs"]
        text = json.dumps(report, indent=2, ensure_ascii=False)
        if options["out"] is not None:
            options["out"].parent.mkdir(parents=True, exist_ok=True)
            options["out"].write_text(text + "\n", encoding="utf-8")
            progress(f"wrote {options['out']}")
        else:
            self.stdout.write(text)
        failed = sum(run["summary"]["groups_failed"] for run in runs)
        if failed:
            raise CommandError(f"generation failed for {failed} group(s); see the report's per-group errors.")

