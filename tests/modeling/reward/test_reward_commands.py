"""train_reward_model and evaluate_reward_model end to end (database-backed)."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from deliberation.models import Candidate, Opinion, Rating, RewardModelVersion
from tests.factories import ExperimentFactory, ParticipantFactory, QuestionFactory, RoomFactory

pytestmark = pytest.mark.django_db

# Tiny on purpose: these tests check the plumbing (files, registration, JSON
# output, errors), not learning, which test_reward_training.py covers.
FAST = ["--epochs", "1", "--encoder-layers", "1", "--batch-size", "8", "--max-length", "48"]

OPINIONS = {
    +1: "I think that we should raise taxes on the rich.",
    -1: "In my view, we should NOT raise taxes on the rich.",
}
STATEMENTS = {
    +1: "We agree that we should raise taxes on the rich.",
    -1: "We should NOT raise taxes on the rich.",
    0: "The group is divided on taxes for the rich.",
}


def _rows(groups: int = 4) -> list[dict]:
    rows = []
    for group in range(groups):
        for participant, stance in enumerate((+1, -1, +1)):
            for leaning, statement in STATEMENTS.items():
                rows.append(
                    {
                        "group_id": group,
                        "participant_id": f"p{participant}",
                        "question": "Should we raise taxes on the rich?",
                        "opinion": OPINIONS[stance],
                        "statement": statement,
                        "agreement": 4 + 2 * stance * leaning,
                        "note": "extra fields are kept in predictions",
                    }
                )
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(autouse=True)
def model_store(settings, tmp_path):
    settings.CONCORD_MODEL_STORE = tmp_path / "store"
    settings.CONCORD_DEVICE = "cpu"
    return settings.CONCORD_MODEL_STORE


def _call(command: str, *args: str) -> dict:
    out = StringIO()
    call_command(command, *args, stdout=out, stderr=StringIO())
    return json.loads(out.getvalue())


def test_train_from_jsonl_registers_a_version_and_evaluate_reports_baselines(tmp_path, model_store):
    data = _write_jsonl(tmp_path / "train.jsonl", _rows())
    trained = _call("train_reward_model", "--data", str(data), "--seed", "3", "--pairwise-weight", "0.5", *FAST)

    version = RewardModelVersion.objects.get(pk=trained["version"])
    assert version.kind == "cross-encoder"
    assert Path(version.path).parent == model_store / "reward"
    assert (Path(version.path) / "model.safetensors").is_file()
    assert version.dataset_sha256 == trained["dataset_sha256"] and len(version.dataset_sha256) == 64
    assert version.base_model == "all-minilm-l6-v2"
    assert version.params["pairwise_weight"] == 0.5 and version.params["seed"] == 3
    assert version.metrics["train_groups"] + version.metrics["validation_groups"] == 4
    assert set(trained["metrics"]["validation"]) == {
        "model",
        "constant_mean",
        "similarity",
        "similarity_question_aware",
    }

    predictions_path = tmp_path / "predictions.jsonl"
    report = _call(
        "evaluate_reward_model",
        "--version",
        str(version.pk),
        "--data",
        str(data),
        "--predictions",
        str(predictions_path),
    )
    assert report["version"] == version.pk
    for name in ("model", "constant_mean", "similarity", "similarity_question_aware"):
        assert set(report[name]) >= {"mae", "spearman", "pairwise_accuracy"}
    assert report["constant_mean"]["value"] == pytest.approx(version.metrics["train_mean"])
    assert report["constant_mean"]["pairwise_accuracy"] == 0.5
    written = [json.loads(line) for line in predictions_path.read_text().splitlines()]
    assert len(written) == len(_rows())
    assert written[0]["note"] == "extra fields are kept in predictions" and written[0]["group_id"] == 0
    assert all(1.0 <= row["predicted"] <= 7.0 for row in written)


def test_train_from_the_database(tmp_path):
    experiment = ExperimentFactory()
    for _group in range(3):
        room = RoomFactory(experiment=experiment, question=QuestionFactory(text="Should we raise taxes on the rich?"))
        round_ = room.rounds.get(index=0)
        candidates = [
            Candidate.objects.create(
                round=round_, index=i, text=text, backend="test", model_id="test", seed=i, prompt="prompt"
            )
            for i, text in enumerate(STATEMENTS.values())
        ]
        for stance in (+1, -1):
            participant = ParticipantFactory(room=room)
            Opinion.objects.create(round=round_, participant=participant, text=OPINIONS[stance])
            for leaning, candidate in zip(STATEMENTS, candidates):
                Rating.objects.create(
                    participant=participant, candidate=candidate, agreement=4 + 2 * stance * leaning, quality=4
                )
        # A rater with no opinion in the round is skipped, not an error.
        silent = ParticipantFactory(room=room)
        Rating.objects.create(participant=silent, candidate=candidates[0], agreement=7, quality=7)

    trained = _call("train_reward_model", "--no-baselines", "--validation-fraction", "0.34", *FAST)
    version = RewardModelVersion.objects.get(pk=trained["version"])
    assert version.params["data"] == "database"
    assert version.metrics["train_rows"] + version.metrics["validation_rows"] == 3 * 2 * 3
    assert version.metrics["validation_groups"] == 1


def test_train_without_any_data_is_a_clear_error():
    with pytest.raises(CommandError, match="no ratings"):
        _call("train_reward_model", *FAST)


def test_train_reports_bad_jsonl_lines(tmp_path):
    rows = _rows()
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "agreement": 0}) + "\n")
    with pytest.raises(CommandError, match="line 2: agreement 0 is outside"):
        _call("train_reward_model", "--data", str(path), *FAST)
    with pytest.raises(CommandError, match="at least 2 groups"):
        _call("train_reward_model", "--data", str(_write_jsonl(tmp_path / "one.jsonl", _rows(groups=1))), *FAST)
    assert not RewardModelVersion.objects.exists()


def test_evaluate_errors(tmp_path):
    data = _write_jsonl(tmp_path / "eval.jsonl", _rows(groups=1))
    with pytest.raises(CommandError, match="no RewardModelVersion with id 999"):
        _call("evaluate_reward_model", "--version", "999", "--data", str(data))
    missing = RewardModelVersion.objects.create(kind="cross-encoder", path=str(tmp_path / "gone"))
    with pytest.raises(CommandError, match="missing"):
        _call("evaluate_reward_model", "--version", str(missing.pk), "--data", str(data))
    unknown = RewardModelVersion.objects.create(kind="oracle", path="")
    with pytest.raises(CommandError, match="does not know"):
        _call("evaluate_reward_model", "--version", str(unknown.pk), "--data", str(data))
    not_a_model = RewardModelVersion.objects.create(kind="cross-encoder", path=str(tmp_path))
    with pytest.raises(CommandError, match="cannot load"):
        _call("evaluate_reward_model", "--version", str(not_a_model.pk), "--data", str(data))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    with pytest.raises(CommandError, match="line 1: missing field"):
        _call("evaluate_reward_model", "--version", str(not_a_model.pk), "--data", str(bad))
