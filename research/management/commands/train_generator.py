"""Fine-tune the generator on consensus statements and register the result as a GeneratorVersion.

    python manage.py train_generator --data FILE.jsonl [--eval DEV.jsonl] [--base MODEL] [--lora | --full]
        [--epochs E] [--max-steps N] [--seed S] [--name NAME] [--parent NAME] [--out DIR]

Training prompts are built by the generation prompt code (shuffled orders, neutralised opinions), so
the model learns what it is asked in rooms (modeling.training.sft). Prints JSON with the held-out loss
before and after, the dataset's sha256 and the registered version. A failed or interrupted run
registers nothing and says why; its partial output directory is removed.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils.text import slugify

from deliberation.models import GeneratorVersion


class Command(BaseCommand):
    help = "Fine-tune the generator (LoRA by default) on consensus statements and register a GeneratorVersion."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--data", required=True, type=Path,
            help="Training groups, JSONL: one object per line with question, opinions (list) and statement.",
        )
        parser.add_argument("--eval", type=Path, help="Held-out groups for the loss before and after (never trained on).")
        parser.add_argument("--base", default="", help="Base model (default: the site's CONCORD_GENERATOR_MODEL).")
        method = parser.add_mutually_exclusive_group()
        method.add_argument("--lora", action="store_true", help="Train a LoRA adapter (the default).")
        method.add_argument("--full", action="store_true", help="Fine-tune every weight (small models only).")
        parser.add_argument("--epochs", type=int, default=1)
        parser.add_argument("--max-steps", type=int, help="Stop after this many optimiser steps.")
        parser.add_argument("--learning-rate", type=float)
        parser.add_argument("--batch-size", type=int, default=4)
        # The seed set's longest example is 526 tokens with SmolLM2's template: none is dropped at 640.
        parser.add_argument("--max-seq-len", type=int, default=640)
        parser.add_argument("--shuffles", type=int, default=2, help="Opinion orders sampled per training group.")
        parser.add_argument(
            "--revisions", action="store_true",
            help="Also train on the groups' revision examples (critique-and-revision prompts; docs/habermas-protocol.md).",
        )
        parser.add_argument("--lora-r", type=int, default=8)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--name", default="", help="Version name (a slug; default: derived from the data and time).")
        parser.add_argument("--parent", default="", help="Name of the version this one continues from (lineage).")
        parser.add_argument("--out", type=Path, help="Directory for the weights (default: CONCORD_MODEL_STORE/generators/NAME).")

    def handle(self, *args: Any, **options: Any) -> None:
        from modeling.training.sft import SFTDataError, build_sft_examples, load_groups, train_sft

        data: Path = options["data"]
        eval_path: Path | None = options["eval"]
        base = options["base"] or settings.CONCORD_GENERATOR_MODEL
        for name in ("epochs", "batch_size", "max_seq_len", "shuffles", "lora_r"):
            if options[name] < 1:
                raise CommandError(f"--{name.replace('_', '-')} must be at least 1.")
        if options["max_steps"] is not None and options["max_steps"] < 1:
            raise CommandError("--max-steps must be at least 1.")
        parent = None
        if options["parent"]:
            parent = GeneratorVersion.objects.filter(name=options["parent"]).first()
            if parent is None:
                raise CommandError(f"No generator version named {options['parent']!r}.")
        try:
            # The plain SFT format (question, opinions, statement; group_id optional), so any consensus
            # file trains, not only the seed set's richer format (which it also reads).
            groups = load_groups([data])
            eval_groups = load_groups([eval_path]) if eval_path else []
        except SFTDataError as error:
            raise CommandError(str(error)) from None
        except OSError as error:
            raise CommandError(f"cannot read training data: {error}") from None
        if not groups:
            raise CommandError(f"{data} has no training groups.")
        name = slugify(options["name"]) or f"sft-{slugify(data.stem)}-{time.strftime('%Y%m%d-%H%M%S')}"
        if GeneratorVersion.objects.filter(name=name).exists():
            raise CommandError(f"A generator version named {name!r} exists already; choose another --name.")
        out: Path = options["out"] or settings.CONCORD_MODEL_STORE / "generators" / name
        if out.exists() and any(out.iterdir()):
            raise CommandError(f"{out} is not empty; choose another --out.")

        examples = build_sft_examples(groups, seed=options["seed"], shuffles_per_group=options["shuffles"], revisions=options["revisions"])
        eval_examples = build_sft_examples(eval_groups, seed=options["seed"] + 1, shuffles_per_group=1) if eval_groups else []
        started = time.perf_counter()

        def progress(step: int, total: int, loss: float) -> None:
            elapsed = time.perf_counter() - started
            eta = elapsed / step * (total - step) if step else 0.0
            sys.stderr.write(f"step {step}/{total}  loss {loss:.4f}  {elapsed:.0f}s elapsed, ~{eta:.0f}s left\n")

        try:
            result = train_sft(
                base_model=base,
                examples=examples,
                eval_examples=eval_examples,
                out_dir=out,
                lora=not options["full"],
                epochs=options["epochs"],
                max_steps=options["max_steps"],
                learning_rate=options["learning_rate"],
                seed=options["seed"],
                on_progress=progress,
                batch_size=options["batch_size"],
                max_seq_len=options["max_seq_len"],
                lora_r=options["lora_r"],
                device=settings.CONCORD_DEVICE,
                cache_dir=settings.CONCORD_MODEL_STORE / "hf-cache",
                evaluate_before=bool(eval_examples),
            )
        except (Exception, KeyboardInterrupt) as error:
            shutil.rmtree(out, ignore_errors=True)
            reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
            raise CommandError(f"Training failed ({reason}); no version was registered.") from error
        summary = result.as_dict()
        summary.pop("train_losses", None)
        with transaction.atomic():
            version = GeneratorVersion.objects.create(
                name=name,
                base_model=base,
                base_model_sha256=result.base_model_sha256 or "",
                method=GeneratorVersion.Method.FULL if options["full"] else GeneratorVersion.Method.LORA,
                path=str(Path(result.out_dir).resolve()),
                sha256=result.adapter_sha256,
                dataset_sha256=result.dataset_sha256,
                params={**result.hyperparameters, "data": str(data), "eval": str(eval_path or ""), "shuffles": options["shuffles"], "revisions": options["revisions"]},
                metrics={
                    "loss_before": result.loss_before,
                    "loss_after": result.loss_after,
                    "train_rows": result.train_rows,
                    "eval_rows": result.eval_rows,
                    "steps": result.steps,
                    "first_train_loss": result.first_train_loss,
                    "last_train_loss": result.last_train_loss,
                    "seconds": result.seconds,
                    "eval_dataset_sha256": result.eval_dataset_sha256,
                },
                parent=parent,
            )
        report = {
            "version": version.name,
            "version_id": version.pk,
            "loss_before": result.loss_before,
            "loss_after": result.loss_after,
            "train_rows": result.train_rows,
            "dataset_sha256": result.dataset_sha256,
            "base_model": base,
            "seconds": round(result.seconds, 1),
            "adapter": version.path,
            "adapter_sha256": version.sha256,
            "details": summary,
        }
        self.stdout.write(json.dumps(report, indent=2, default=str))
