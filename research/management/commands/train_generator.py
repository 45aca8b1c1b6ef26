"""Fine-tune the generator on consensus statements and register the result as a GeneratorVersion.

    python manage.py train_generator --data FILE.jsonl [--method sft|dpo] [--eval DEV.jsonl] [--base MODEL]
        [--lora | --full] [--epochs E] [--max-steps N] [--seed S] [--name NAME] [--parent NAME] [--out DIR]

--method sft (the default) reads consensus groups (question, opinions, statement: build_sft_dataset
writes them from a study); --method dpo reads chosen/rejected pairs (build_preference_dataset) and
trains with trl's DPOTrainer (modeling.training.dpo), continuing --parent's adapter when given.

Training prompts are built by the generation prompt code (shuffled orders, neutralised opinions), so
the model learns what it is asked in rooms (modeling.training.sft). Prints JSON with the held-out loss
before and after, the dataset's sha256 and the registered version. A failed or interrupted run
registers nothing and says why; its partial output directory is removed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from deliberation.models import GeneratorVersion
from modeling.training.methods import SFT, TRAINING_METHODS
from research.generator_training import GeneratorTrainingSpec, TrainingError, generator_train


class Command(BaseCommand):
    help = "Fine-tune the generator (SFT or DPO, LoRA by default) and register a GeneratorVersion."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--data", required=True, type=Path,
            help="Training data, JSONL: consensus groups (question, opinions, statement) for sft; "
            "prompt/chosen/rejected pairs for dpo.",
        )
        parser.add_argument("--method", choices=list(TRAINING_METHODS), default=SFT, help="Training method (default sft).")
        parser.add_argument("--eval", type=Path, help="Held-out data for the loss before and after (never trained on).")
        parser.add_argument("--base", default="", help="Base model (default: the parent's, else the site's CONCORD_GENERATOR_MODEL).")
        form = parser.add_mutually_exclusive_group()
        form.add_argument("--lora", action="store_true", help="Train a LoRA adapter (the default).")
        form.add_argument("--full", action="store_true", help="Fine-tune every weight (small models only; sft only).")
        parser.add_argument("--epochs", type=int, default=1)
        parser.add_argument("--max-steps", type=int, help="Stop after this many optimiser steps.")
        parser.add_argument("--learning-rate", type=float)
        parser.add_argument("--batch-size", type=int, default=4)
        # The seed set's longest example is 526 tokens with SmolLM2's template: none is dropped at 640.
        parser.add_argument("--max-seq-len", type=int, default=640)
        parser.add_argument("--shuffles", type=int, default=2, help="Opinion orders sampled per training group (sft).")
        parser.add_argument(
            "--revisions", action="store_true",
            help="Also train on the groups' revision examples (critique-and-revision prompts; docs/habermas-protocol.md). SFT only.",
        )
        parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta: how far the policy may move from the reference.")
        parser.add_argument("--lora-r", type=int, default=8)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--name", default="", help="Version name (a slug; default: derived from the method, data and time).")
        parser.add_argument(
            "--parent", default="",
            help="Name of the version this one continues from (lineage; dpo starts from its adapter).",
        )
        parser.add_argument("--out", type=Path, help="Directory for the weights (default: CONCORD_MODEL_STORE/generators/NAME).")

    def handle(self, *args: Any, **options: Any) -> None:
        parent = None
        if options["parent"]:
            parent = GeneratorVersion.objects.filter(name=options["parent"]).first()
            if parent is None:
                raise CommandError(f"No generator version named {options['parent']!r}.")
        spec = GeneratorTrainingSpec(
            method=options["method"], data=options["data"], eval=options["eval"], base=options["base"], parent=parent,
            name=options["name"], out=options["out"], full=options["full"], epochs=options["epochs"],
            max_steps=options["max_steps"], learning_rate=options["learning_rate"], batch_size=options["batch_size"],
            max_seq_len=options["max_seq_len"], shuffles=options["shuffles"], lora_r=options["lora_r"],
            seed=options["seed"], beta=options["beta"], revisions=options["revisions"],
        )
        started = time.perf_counter()

        def progress(step: int, total: int, loss: float) -> None:
            elapsed = time.perf_counter() - started
            eta = elapsed / step * (total - step) if step else 0.0
            sys.stderr.write(f"step {step}/{total}  loss {loss:.4f}  {elapsed:.0f}s elapsed, ~{eta:.0f}s left\n")

        try:
            trained = generator_train(spec=spec, on_progress=progress)
        except TrainingError as error:
            raise CommandError(str(error)) from error.__cause__
        version, details = trained.version, trained.details
        report = {
            "version": version.name,
            "version_id": version.pk,
            "method": version.training_method,
            "parent": parent.name if parent else None,
            "loss_before": details["loss_before"],
            "loss_after": details["loss_after"],
            "train_rows": details["train_rows"],
            "dataset_sha256": version.dataset_sha256,
            "base_model": version.base_model,
            "seconds": round(details["seconds"], 1),
            "adapter": version.path,
            "adapter_sha256": version.sha256,
            "details": details,
        }
        self.stdout.write(json.dumps(report, indent=2, default=str))
