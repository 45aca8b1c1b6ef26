"""Train the cross-encoder reward model and register it as a RewardModelVersion.

    python manage.py train_reward_model [--data FILE.jsonl] [--epochs E] [--seed S] [--pairwise-weight W]
    python manage.py train_reward_model --kind stance-head [--data FILE.jsonl] [--synthetic-questions N]

Without --data it trains on the ratings in the database. Prints JSON with the new
RewardModelVersion id (`version`), where the weights are, and validation metrics
for the model and the baselines.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from deliberation.models import Opinion, Rating, RewardModelVersion
from modeling.reward.training import (
    DatasetError,
    TrainingConfig,
    TrainingRow,
    load_jsonl,
    rows_from_mappings,
    train_cross_encoder,
)


def rows_from_database() -> list[TrainingRow]:
    """One row per Rating: the rater's own opinion in that round, the candidate, the room's question.

    group_id is the room id: a room is one deliberating group, so the group split
    never puts a room's ratings on both sides.
    """
    ratings = list(Rating.objects.select_related("candidate__round__room__question").order_by("id"))
    round_ids = {rating.candidate.round_id for rating in ratings}
    opinions = {
        (round_id, participant_id): text
        for round_id, participant_id, text in Opinion.objects.filter(round_id__in=round_ids).values_list(
            "round_id", "participant_id", "text"
        )
    }
    raws: list[dict[str, Any]] = []
    for rating in ratings:
        candidate = rating.candidate
        opinion = opinions.get((candidate.round_id, rating.participant_id))
        if not opinion:
            continue  # e.g. a rater who joined after the opinion phase: nothing to condition on
        raws.append(
            {
                "group_id": candidate.round.room_id,
                "participant_id": rating.participant_id,
                "question": candidate.round.room.question.text,
                "opinion": opinion,
                "statement": candidate.text,
                "agreement": rating.agreement,
            }
        )
    return rows_from_mappings(raws, source="rating")


def _register(directory: Path, **fields: Any) -> RewardModelVersion:
    try:
        with transaction.atomic():
            return RewardModelVersion.objects.create(path=str(directory), **fields)
    except Exception:
        # Unregistered weights would be orphaned on disk.
        shutil.rmtree(directory, ignore_errors=True)
        raise


class Command(BaseCommand):
    help = "Train the cross-encoder reward model (on --data JSONL or the database's ratings) and register it."

    def add_arguments(self, parser: CommandParser) -> None:
        defaults = TrainingConfig()
        parser.add_argument(
            "--kind",
            choices=("cross-encoder", "stance-head"),
            default="cross-encoder",
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
        if options["kind"] == "stance-head":
            self._train_stance_head(rows, options)
            return
        try:
            config = TrainingConfig(
                base_model=options["base_model"] or settings.CONCORD_EMBEDDING_MODEL,
                epochs=options["epochs"],
                batch_size=options["batch_size"],
                learning_rate=options["learning_rate"],
                max_length=options["max_length"],
                seed=options["seed"],
                validation_fraction=options["validation_fraction"],
                patience=options["patience"],
                pairwise_weight=options["pairwise_weight"],
                encoder_layers=options["encoder_layers"],
                trainable_layers=options["trainable_layers"],
                device=options["device"] or settings.CONCORD_DEVICE,
                evaluate_baselines=not options["no_baselines"],
            )
            result = train_cross_encoder(rows, config, on_epoch=lambda record: self.stderr.write(json.dumps(record)))
        except (DatasetError, ValueError, FileNotFoundError) as error:
            raise CommandError(str(error)) from error

        directory = Path(settings.CONCORD_MODEL_STORE) / "reward" / uuid.uuid4().hex
        weights_version = result.model.save(directory)
        try:
            with transaction.atomic():
                version = RewardModelVersion.objects.create(
                    kind="cross-encoder",
                    path=str(directory),
                    base_model=config.base_model,
                    dataset_sha256=result.dataset_sha256,
                    metrics=result.metrics,
                    params={
                        **result.params,
                        "history": result.history,
                        "weights_version": weights_version,
                        "data": options["data"] or "database",
                    },
                )
        except Exception:
            # Unregistered weights would be orphaned on disk.
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self.stdout.write(
            json.dumps(
                {
                    "version": version.pk,
                    "path": str(directory),
                    "weights_version": weights_version,
                    "dataset_sha256": result.dataset_sha256,
                    "metrics": result.metrics,
                }
            )
        )

    def _train_stance_head(self, rows: list[TrainingRow], options: dict[str, Any]) -> None:
        from modeling.training.reward_head import EmbeddingCache, HeadConfig, encoder_embed, synthetic_rows, train_and_save

        encoder = options["base_model"] or settings.CONCORD_EMBEDDING_MODEL
        device = options["device"] or settings.CONCORD_DEVICE
        config = HeadConfig(seed=options["seed"], pairwise_weight=options["pairwise_weight"])
        try:
            synthetic = synthetic_rows(options["synthetic_questions"], seed=options["seed"]) if options["synthetic_questions"] else []
            embed = EmbeddingCache(encoder_embed(encoder, "cpu" if device == "auto" else device))
            directory = Path(settings.CONCORD_MODEL_STORE) / "reward" / uuid.uuid4().hex
            record = train_and_save(rows, directory, embed, config, synthetic=synthetic, encoder=encoder)
        except (DatasetError, ValueError, FileNotFoundError) as error:
            raise CommandError(str(error)) from error
        version = _register(
            directory,
            kind="stance-head",
            base_model=encoder,
            dataset_sha256=record["dataset_sha256"],
            metrics={"train_mean": record["train_mean"], "train_rows": record["train_rows"], **record["train_metrics"]},
            params={
                **record["config"],
                "sha256": record["sha256"],
                "synthetic_rows": record["synthetic_rows"],
                "data": options["data"] or "database",
            },
        )
        self.stdout.write(json.dumps({"version": version.pk, "path": str(directory), **record}))
