"""Train a reward model and register it as a RewardModelVersion: one path for the `train_reward_model`
command and for reward-model training runs started from the researcher pages (research.training).

Two kinds: the cross-encoder (a fine-tuned MiniLM, modeling.reward.training) and the stance head (a small
head on frozen embeddings, modeling.training.reward_head). Both report their progress as they go
(on_progress(step, total, loss): epochs for both), and a version is registered only when training
succeeded: weights that were written but not registered are removed.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from deliberation.models import Opinion, Rating, RewardModelVersion
from modeling.reward.training import DatasetError, TrainingConfig, TrainingRow, rows_from_mappings, train_cross_encoder

CROSS_ENCODER = "cross-encoder"
STANCE_HEAD = "stance-head"
REWARD_KINDS = (CROSS_ENCODER, STANCE_HEAD)

# on_progress(step, total_steps, loss): the same shape as the generator's (research.generator_training).
Progress = Callable[[int, int, float], None]
# on_log(line): a line worth showing whoever follows training (the cross-encoder's epoch records, as JSON).
Log = Callable[[str], None]
# Called inside the registration's transaction with the new version; raising refuses it (nothing registered).
OnRegistered = Callable[[RewardModelVersion], None]


class RewardTrainingError(Exception):
    """Training could not start or did not finish; nothing was registered. The message says why."""


@dataclass(frozen=True)
class RewardTrainingSpec:
    kind: str = CROSS_ENCODER
    data_label: str = "database"  # where the rows came from, recorded on the version
    seed: int = 0
    epochs: int | None = None  # None: the kind's default
    pairwise_weight: float | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    max_length: int | None = None
    validation_fraction: float | None = None
    patience: int | None = None
    encoder_layers: int | None = None
    trainable_layers: int | None = None
    base_model: str = ""  # blank: CONCORD_EMBEDDING_MODEL
    device: str = ""  # blank: CONCORD_DEVICE
    evaluate_baselines: bool = True
    synthetic_questions: int = 0  # stance head: synthetic rows from this many question-bank train questions


@dataclass
class TrainedRewardModel:
    version: RewardModelVersion
    # What the command prints (besides the version id): paths, hashes and metrics.
    details: dict[str, Any] = field(default_factory=dict)


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


def _register(directory: Path, on_registered: OnRegistered | None, **fields: Any) -> RewardModelVersion:
    try:
        with transaction.atomic():
            version = RewardModelVersion.objects.create(path=str(directory), **fields)
            if on_registered is not None:
                on_registered(version)
            return version
    except Exception:
        # Unregistered weights would be orphaned on disk.
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _train_cross_encoder(
    rows: Sequence[TrainingRow],
    spec: RewardTrainingSpec,
    on_progress: Progress | None,
    on_log: Log | None,
    on_registered: OnRegistered | None,
) -> TrainedRewardModel:
    defaults = TrainingConfig()
    config = TrainingConfig(
        base_model=spec.base_model or settings.CONCORD_EMBEDDING_MODEL,
        epochs=spec.epochs if spec.epochs is not None else defaults.epochs,
        batch_size=spec.batch_size if spec.batch_size is not None else defaults.batch_size,
        learning_rate=spec.learning_rate if spec.learning_rate is not None else defaults.learning_rate,
        max_length=spec.max_length if spec.max_length is not None else defaults.max_length,
        seed=spec.seed,
        validation_fraction=spec.validation_fraction if spec.validation_fraction is not None else defaults.validation_fraction,
        patience=spec.patience if spec.patience is not None else defaults.patience,
        pairwise_weight=spec.pairwise_weight if spec.pairwise_weight is not None else defaults.pairwise_weight,
        encoder_layers=spec.encoder_layers,
        trainable_layers=spec.trainable_layers,
        device=spec.device or settings.CONCORD_DEVICE,
        evaluate_baselines=spec.evaluate_baselines,
    )

    def on_epoch(record: dict[str, float]) -> None:
        if on_log is not None:
            on_log(json.dumps(record))
        if on_progress is not None:
            on_progress(int(record["epoch"]), config.epochs, record["train_loss"])

    result = train_cross_encoder(list(rows), config, on_epoch=on_epoch)
    directory = Path(settings.CONCORD_MODEL_STORE) / "reward" / uuid.uuid4().hex
    weights_version = result.model.save(directory)
    version = _register(
        directory,
        on_registered,
        kind=CROSS_ENCODER,
        base_model=config.base_model,
        dataset_sha256=result.dataset_sha256,
        metrics=result.metrics,
        params={**result.params, "history": result.history, "weights_version": weights_version, "data": spec.data_label},
    )
    return TrainedRewardModel(
        version=version,
        details={
            "path": str(directory),
            "weights_version": weights_version,
            "dataset_sha256": result.dataset_sha256,
            "metrics": result.metrics,
            "history": result.history,
        },
    )


def _train_stance_head(
    rows: Sequence[TrainingRow],
    spec: RewardTrainingSpec,
    on_progress: Progress | None,
    on_log: Log | None,
    on_registered: OnRegistered | None,
) -> TrainedRewardModel:
    # Imported here: torch and the encoder are heavy, and only this kind needs them at once.
    from modeling.training.reward_head import EmbeddingCache, HeadConfig, encoder_embed, synthetic_rows, train_and_save

    encoder = spec.base_model or settings.CONCORD_EMBEDDING_MODEL
    device = spec.device or settings.CONCORD_DEVICE
    defaults = HeadConfig()
    config = HeadConfig(
        seed=spec.seed,
        pairwise_weight=spec.pairwise_weight if spec.pairwise_weight is not None else defaults.pairwise_weight,
        epochs=spec.epochs if spec.epochs is not None else defaults.epochs,
    )
    synthetic = synthetic_rows(spec.synthetic_questions, seed=spec.seed) if spec.synthetic_questions else []
    embed = EmbeddingCache(encoder_embed(encoder, "cpu" if device == "auto" else device))
    directory = Path(settings.CONCORD_MODEL_STORE) / "reward" / uuid.uuid4().hex
    # Full-batch epochs are quick and many (300 by default): report about fifty of them, and the last.
    every = max(1, config.epochs // 50)

    def on_epoch(epoch: int, epochs: int, loss: float) -> None:
        if on_progress is not None and (epoch % every == 0 or epoch == epochs):
            on_progress(epoch, epochs, loss)

    try:
        record = train_and_save(rows, directory, embed, config, synthetic=synthetic, encoder=encoder, on_epoch=on_epoch)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    version = _register(
        directory,
        on_registered,
        kind=STANCE_HEAD,
        base_model=encoder,
        dataset_sha256=record["dataset_sha256"],
        metrics={"train_mean": record["train_mean"], "train_rows": record["train_rows"], **record["train_metrics"]},
        params={**record["config"], "sha256": record["sha256"], "synthetic_rows": record["synthetic_rows"], "data": spec.data_label},
    )
    return TrainedRewardModel(version=version, details={"path": str(directory), **record})


def reward_model_train(
    *,
    rows: Sequence[TrainingRow],
    spec: RewardTrainingSpec,
    on_progress: Progress | None = None,
    on_log: Log | None = None,
    on_registered: OnRegistered | None = None,
) -> TrainedRewardModel:
    """Train a reward model of `spec.kind` on `rows` and register it; raise RewardTrainingError (nothing
    registered) when the data or the options are unusable. Other failures propagate, also registering nothing."""
    if spec.kind not in REWARD_KINDS:
        raise RewardTrainingError(f"Unknown reward model kind {spec.kind!r}: {', '.join(REWARD_KINDS)}.")
    if not rows:
        raise RewardTrainingError("No ratings with an opinion to train on.")
    trainer = _train_stance_head if spec.kind == STANCE_HEAD else _train_cross_encoder
    try:
        return trainer(rows, spec, on_progress, on_log, on_registered)
    except (DatasetError, ValueError, FileNotFoundError) as error:
        raise RewardTrainingError(str(error)) from error
