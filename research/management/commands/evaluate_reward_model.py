"""Evaluate a registered reward model on held-out ratings, next to the baselines.

    python manage.py evaluate_reward_model --version V --data FILE.jsonl [--predictions OUT.jsonl]
    python manage.py evaluate_reward_model --model stance-head --data FILE.jsonl

--version evaluates a trained RewardModelVersion; --model a registry model by name
(e.g. the shipped default "stance-head", or "similarity"). Prints JSON: MAE, mean
within-participant Spearman, pairwise accuracy, the share of groups whose
utilitarian welfare winner under the model is a true winner, and calibration by
bin, for the model, the constant-mean baseline (the mean of the model's training
ratings when it records one) and the similarity baselines. --predictions writes every input row back with a
`predicted` field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from deliberation.models import RewardModelVersion
from modeling.reward.metrics import compare_with_baselines, similarity_baselines
from modeling.reward.registry import REWARD_MODELS, get_reward_model
from modeling.reward.training import DatasetError, dataset_sha256, read_jsonl_records, row_from_mapping


class Command(BaseCommand):
    help = "Evaluate a RewardModelVersion on a JSONL file of ratings, next to the constant-mean and similarity baselines."

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        # Django reserves --version for its own version; here it means the RewardModelVersion.
        return super().create_parser(prog_name, subcommand, conflict_handler="resolve", **kwargs)

    def add_arguments(self, parser: CommandParser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--version", type=int, help="RewardModelVersion id.")
        which.add_argument("--model", choices=sorted(REWARD_MODELS), help="A registry reward model by name.")
        parser.add_argument(
            "--data",
            required=True,
            help="JSONL rows: group_id, participant_id, question, opinion, statement, agreement.",
        )
        parser.add_argument("--predictions", help="Write each input row with a `predicted` field to this JSONL file.")
        parser.add_argument("--device", default=None, help="auto, cpu or cuda (default: CONCORD_DEVICE).")
        parser.add_argument("--no-baselines", action="store_true", help="Skip the similarity baselines.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["model"]:
            kind, path, train_mean, label = options["model"], None, None, options["model"]
        else:
            version = self._version(options["version"])
            kind, path, label = version.kind, version.path or None, version.pk
            train_mean = (version.metrics or {}).get("train_mean")

        try:
            records = read_jsonl_records(options["data"])
            rows = [row_from_mapping(raw, f"{options['data']} line {number}") for number, raw in records]
        except DatasetError as error:
            raise CommandError(str(error)) from error

        device = options["device"] or settings.CONCORD_DEVICE
        try:
            model = get_reward_model(kind, embedding_model=settings.CONCORD_EMBEDDING_MODEL, version_path=path, device=device)
        except (ValueError, FileNotFoundError, OSError, RuntimeError) as error:
            raise CommandError(f"cannot load reward model {label}: {error}") from error

        if train_mean is None:
            train_mean = getattr(model, "train_mean", None)
        note = None
        if train_mean is None:
            # Without the training mean the constant baseline sees the answers' mean: say so.
            train_mean = sum(row.agreement for row in rows) / len(rows)
            note = "the model records no train_mean; constant_mean uses the evaluation data's mean"

        predictions = model.predict([row.query for row in rows])
        baselines = {} if options["no_baselines"] else similarity_baselines(settings.CONCORD_EMBEDDING_MODEL, device=device)
        report: dict[str, Any] = {
            "version": options["version"],
            "kind": kind,
            "model_version": model.version,
            "data": options["data"],
            "dataset_sha256": dataset_sha256(rows),
            **compare_with_baselines([row.rated() for row in rows], predictions, train_mean=train_mean, baselines=baselines),
        }
        if note:
            report["note"] = note

        if options["predictions"]:
            out = Path(options["predictions"])
            try:
                with out.open("w", encoding="utf-8") as handle:
                    for (_, raw), predicted in zip(records, predictions):
                        handle.write(json.dumps({**raw, "predicted": predicted}, ensure_ascii=False) + "\n")
            except OSError as error:
                raise CommandError(f"cannot write {out}: {error.strerror or error}") from error
            report["predictions"] = str(out)
        self.stdout.write(json.dumps(report))

    def _version(self, pk: int) -> RewardModelVersion:
        try:
            version = RewardModelVersion.objects.get(pk=pk)
        except RewardModelVersion.DoesNotExist as error:
            known = list(RewardModelVersion.objects.order_by("pk").values_list("pk", flat=True)[:20])
            raise CommandError(f"no RewardModelVersion with id {pk} (known ids: {known or 'none'})") from error
        if version.kind not in REWARD_MODELS:
            raise CommandError(f"RewardModelVersion {version.pk} has kind {version.kind!r}, which the reward registry does not know")
        if version.path and not Path(version.path).exists():
            raise CommandError(f"the weights of RewardModelVersion {version.pk} are missing: {version.path} does not exist")

        return version
