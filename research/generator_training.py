"""Train the generator (SFT or DPO) and register the result as a GeneratorVersion: one path for the
command (train_generator) and the researcher's training runs (research.training).

A version is registered only when training succeeded; a failed or interrupted run removes its partial
output and registers nothing. Whatever the method, the version records the same things: the base
model and its sha256, the adapter's sha256, the dataset's sha256, the hyper-parameters, the metrics,
the parent version and the training method (modeling.training.methods).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils.text import slugify

from deliberation.models import GeneratorVersion
from modeling.training.methods import DPO, SFT, check_training_method

# on_progress(step, total_steps, loss)
Progress = Callable[[int, int, float], None]


class TrainingError(Exception):
    """Training could not start or did not finish; nothing was registered. The message says why."""


@dataclass(frozen=True)
class GeneratorTrainingSpec:
    method: str
    data: Path
    eval: Path | None = None
    base: str = ""  # blank: the parent's base, else the site's CONCORD_GENERATOR_MODEL
    parent: GeneratorVersion | None = None
    name: str = ""
    out: Path | None = None
    full: bool = False
    epochs: int = 1
    max_steps: int | None = None
    learning_rate: float | None = None
    batch_size: int = 4
    max_seq_len: int = 640
    shuffles: int = 2
    # SFT only: also train on the groups' revision examples (critique and revision; docs/habermas-protocol.md).
    revisions: bool = False
    lora_r: int = 8
    seed: int = 0
    beta: float = 0.1  # DPO only


@dataclass
class TrainedGenerator:
    version: GeneratorVersion
    details: dict[str, Any]


def _checked(spec: GeneratorTrainingSpec) -> tuple[str, str, Path]:
    try:
        check_training_method(spec.method)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    for field in ("epochs", "batch_size", "max_seq_len", "shuffles", "lora_r"):
        if getattr(spec, field) < 1:
            raise TrainingError(f"--{field.replace('_', '-')} must be at least 1.")
    if spec.max_steps is not None and spec.max_steps < 1:
        raise TrainingError("--max-steps must be at least 1.")
    if spec.method == DPO and spec.revisions:
        raise TrainingError("--revisions adds SFT examples; DPO trains on preference pairs.")
    if spec.method == DPO and spec.full:
        raise TrainingError("DPO trains a LoRA adapter; --full is for SFT.")
    if spec.method == DPO and spec.parent is not None and spec.parent.method != GeneratorVersion.Method.LORA:
        raise TrainingError(f"DPO continues a LoRA adapter; {spec.parent.name} is {spec.parent.method}.")
    base = spec.base or (spec.parent.base_model if spec.parent is not None else "") or settings.CONCORD_GENERATOR_MODEL
    name = slugify(spec.name) or f"{spec.method}-{slugify(spec.data.stem)}-{time.strftime('%Y%m%d-%H%M%S')}"
    if GeneratorVersion.objects.filter(name=name).exists():
        raise TrainingError(f"A generator version named {name!r} exists already; choose another --name.")
    out = spec.out or settings.CONCORD_MODEL_STORE / "generators" / name
    if out.exists() and any(out.iterdir()):
        raise TrainingError(f"{out} is not empty; choose another --out.")
    return base, name, out


def _train_sft(spec: GeneratorTrainingSpec, base: str, out: Path, progress: Progress | None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from modeling.training.sft import SFTDataError, build_sft_examples, load_groups, train_sft

    try:
        groups = load_groups([spec.data])
        eval_groups = load_groups([spec.eval]) if spec.eval else []
    except SFTDataError as error:
        raise TrainingError(str(error)) from None
    except OSError as error:
        raise TrainingError(f"cannot read training data: {error}") from None
    if not groups:
        raise TrainingError(f"{spec.data} has no training groups.")
    examples = build_sft_examples(groups, seed=spec.seed, shuffles_per_group=spec.shuffles, revisions=spec.revisions)
    continued = spec.parent if spec.parent is not None and spec.parent.method == GeneratorVersion.Method.LORA and not spec.full else None
    eval_examples = build_sft_examples(eval_groups, seed=spec.seed + 1, shuffles_per_group=1) if eval_groups else []
    result = train_sft(
        base_model=base, examples=examples, eval_examples=eval_examples, out_dir=out, lora=not spec.full,
        epochs=spec.epochs, max_steps=spec.max_steps, learning_rate=spec.learning_rate, seed=spec.seed,
        on_progress=progress, batch_size=spec.batch_size, max_seq_len=spec.max_seq_len, lora_r=spec.lora_r,
        device=settings.CONCORD_DEVICE, cache_dir=settings.CONCORD_MODEL_STORE / "hf-cache", evaluate_before=bool(eval_examples),
        # A LoRA parent is continued (the study's statements refine it); a full-weights parent is lineage only.
        init_adapter=continued.path if continued else None,
        init_adapter_sha256=continued.sha256 if continued else None,
    )
    params = {**result.hyperparameters, "shuffles": spec.shuffles, "revisions": spec.revisions}
    metrics = {"eval_dataset_sha256": result.eval_dataset_sha256}
    return result, params, metrics


def _train_dpo(spec: GeneratorTrainingSpec, base: str, out: Path, progress: Progress | None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from modeling.training.dpo import train_dpo
    from modeling.training.study_data import PreferenceDataError, load_preference_pairs

    try:
        pairs = load_preference_pairs(spec.data)
        eval_pairs = load_preference_pairs(spec.eval) if spec.eval else []
    except PreferenceDataError as error:
        raise TrainingError(str(error)) from None
    except OSError as error:
        raise TrainingError(f"cannot read training data: {error}") from None
    if not pairs:
        raise TrainingError(f"{spec.data} has no preference pairs.")
    result = train_dpo(
        base_model=base, pairs=pairs, eval_pairs=eval_pairs, out_dir=out,
        parent_adapter=spec.parent.path if spec.parent is not None else None,
        parent_adapter_sha256=spec.parent.sha256 if spec.parent is not None else None,
        beta=spec.beta, epochs=spec.epochs, max_steps=spec.max_steps,
        learning_rate=spec.learning_rate if spec.learning_rate is not None else 5e-5,
        batch_size=spec.batch_size, max_length=spec.max_seq_len, seed=spec.seed, lora_r=spec.lora_r,
        on_progress=progress, device=settings.CONCORD_DEVICE, cache_dir=settings.CONCORD_MODEL_STORE / "hf-cache",
    )
    metrics = {
        "eval_dataset_sha256": result.eval_dataset_sha256,
        "eval_reward_accuracy": result.eval_reward_accuracy,
        "eval_reward_margin": result.eval_reward_margin,
    }
    return result, dict(result.hyperparameters), metrics


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """NaN (a loss not measured: no held-out data) as null: PostgreSQL's jsonb has no NaN."""
    return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in values.items()}


def generator_train(
    *,
    spec: GeneratorTrainingSpec,
    on_progress: Progress | None = None,
    on_registered: Callable[[GeneratorVersion], None] | None = None,
) -> TrainedGenerator:
    """Train as `spec` says and register the version; raise TrainingError (nothing registered) on failure.

    on_registered(version) runs inside the registration's transaction (a training run marks itself done
    there); if it raises, the version is not registered and the adapter is removed."""
    base, name, out = _checked(spec)
    trainer = _train_sft if spec.method == SFT else _train_dpo
    try:
        result, params, extra_metrics = trainer(spec, base, out, on_progress)
    except TrainingError:
        shutil.rmtree(out, ignore_errors=True)
        raise
    except (Exception, KeyboardInterrupt) as error:
        shutil.rmtree(out, ignore_errors=True)
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
        raise TrainingError(f"Training failed ({reason}); no version was registered.") from error
    try:
        with transaction.atomic():
            version = GeneratorVersion.objects.create(
                name=name,
                base_model=base,
                base_model_sha256=result.base_model_sha256 or "",
                method=GeneratorVersion.Method.FULL if spec.full else GeneratorVersion.Method.LORA,
                training_method=spec.method,
                path=str(Path(result.out_dir).resolve()),
                sha256=result.adapter_sha256,
                dataset_sha256=result.dataset_sha256,
                params={**params, "data": str(spec.data), "eval": str(spec.eval or "")},
                metrics=_json_safe({
                    "loss_before": result.loss_before,
                    "loss_after": result.loss_after,
                    "train_rows": result.train_rows,
                    "eval_rows": result.eval_rows,
                    "steps": result.steps,
                    "first_train_loss": result.first_train_loss,
                    "last_train_loss": result.last_train_loss,
                    "seconds": result.seconds,
                    **extra_metrics,
                }),
                parent=spec.parent,
            )
            if on_registered is not None:
                on_registered(version)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # an adapter no version names would be orphaned
        raise
    details = result.as_dict()
    details.pop("train_losses", None)
    return TrainedGenerator(version=version, details=details)
