"""Train the cross-encoder reward model and register it as a RewardModelVersion.

    python manage.py train_reward_model [--data FILE.jsonl] [--epochs E] [--seed S] [--pairwise-weight W]
    python manage.py train_reward_model --kind stance-head [--data FILE.jsonl] [--synthetic-questions N]

Without --data it trains on the ratings in the database. Prints JSON with the new
RewardModelVersion id (`version`), where the weights are, and validation metrics
for the model and the baselines.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from modeling.reward.training import DatasetError, TrainingConfig, load_jsonl
from research.reward_training import (
    CROSS_ENCODER,
    STANCE_HEAD,
    RewardTrainingError,
    RewardTrainingSpec,
    reward_model_train,
    rows_from_database,
)


class Command(BaseCommand):
    help = "Train the cross-encoder reward model (on --data JSONL or the database's ratings) and register it."

    def add_arguments(self, parser: CommandParser) -> None:
        defaults = TrainingConfig()
        parser.add_argument(
            "--kind",
            choices=(CROSS_ENCODER, STANCE_HEAD),
            default=CROSS_ENCODER,
            help="cross-encoder (fine-tuned MiniLM) or stance-head (a small head on frozen embeddings).",
        )
        parser.add_argument(
            "--synthetic-questions",
            type=int,
            default=0,
            help="stance-head: add synthetic stance rows from this many question-bank train questions.",
        )
        parser.add_argument("--data", help="JSONL rows: group_id, participant_id, question, opinion, statement, agreement.")
        parser.add_argument("--epochs", type=int, default=defaults.epochs)
        parser.add_argument("--seed", type=int, default=defaults.seed)
        parser.add_argument(
            "--pairwise-weight",
            type=float,
            default=defaults.pairwise_weight,
            help="Weight of the Bradley-Terry loss over same-participant pairs (0: MSE only).",
        )
        parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
        parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
        parser.add_argument("--max-length", type=int, default=defaults.max_length)
        parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction)
        parser.add_argument("--patience", type=int, default=defaults.patience)
        parser.add_argument("--encoder-layers", type=int, default=None, help="Keep only the bottom N encoder layers.")
        parser.add_argument("--trainable-layers", type=int, default=None, help="Fine-tune only the top N layers.")
        parser.add_argument("--base-model", default=None, help="Encoder to start from (default: CONCORD_EMBEDDING_MODEL).")
        parser.add_argument("--device", default=None, help="auto, cpu or cuda (default: CONCORD_DEVICE).")
        parser.add_argument("--no-baselines", action="store_true", help="Skip scoring the similarity baselines.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            rows = load_jsonl(options["data"]) if options["data"] else rows_from_database()
        except DatasetError as error:
            raise CommandError(str(error)) from error
        if not rows:
            raise CommandError("no ratings with an opinion in the database to train on; pass --data FILE.jsonl")
        stance_head = options["kind"] == STANCE_HEAD
        spec = RewardTrainingSpec(
            kind=options["kind"],
            data_label=options["data"] or "database",
            seed=options["seed"],
            # --epochs is the cross-encoder's; the stance head keeps its own (many quick full-batch epochs).
            epochs=None if stance_head else options["epochs"],
            pairwise_weight=options["pairwise_weight"],
            batch_size=options["batch_size"],
            learning_rate=options["learning_rate"],
            max_length=options["max_length"],
            validation_fraction=options["validation_fraction"],
            patience=options["patience"],
            encoder_layers=options["encoder_layers"],
            trainable_layers=options["trainable_layers"],
            base_model=options["base_model"] or "",
            device=options["device"] or "",
            evaluate_baselines=not options["no_baselines"],
            synthetic_questions=options["synthetic_questions"],
        )

        try:
            # The cross-encoder's epoch records go to stderr as they come (on_log); the result to stdout.
            trained = reward_model_train(rows=rows, spec=spec, on_log=self.stderr.write)
        except RewardTrainingError as error:
            raise CommandError(str(error)) from error
        details = dict(trained.details)
        if not stance_head:
            details.pop("history", None)  # already on stderr, epoch by epoch
        self.stdout.write(json.dumps({"version": trained.version.pk, **details}))
