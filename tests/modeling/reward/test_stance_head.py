"""The stance head: synthetic rows, training from JSONL and from the database, the shipped
head's checksum, and the registry default. No timings here (bench/reward.py has them)."""

from __future__ import annotations

import hashlib
import json
import shutil
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.core.management import call_command

from deliberation.models import Candidate, Opinion, Rating, RewardModelVersion
from modeling.reward import registry
from modeling.reward.base import AgreementQuery
from modeling.reward.metrics import calibration_by_bin, evaluate_predictions, welfare_winner_match
from modeling.reward.stance_head import (
    SHIPPED_DIR,
    SHIPPED_SHA256,
    ChecksumError,
    HeadWeights,
    file_sha256,
    load_head,
    load_shipped_or_directory,
)
from modeling.reward.training import load_jsonl, rows_from_mappings
from modeling.training.reward_head import HeadConfig, predict_rows, train_head
from modeling.training.stance_rows import make_stance_rows, train_questions
from tests.factories import ExperimentFactory, ParticipantFactory, QuestionFactory, RoomFactory

BANK = [
    {
        "question": f"Should town {i} build a {thing}?",
        "affirming_statement": f"Town {i} should build a {thing}.",
        "negating_statement": f"Town {i} should NOT build a {thing}.",
        "split": "train",
    }
    for i, thing in enumerate(["bridge", "library", "stadium", "tram line", "park", "school", "harbour", "museum"])
] + [
    {
        "question": "Should we hold a held-out vote?",
        "affirming_statement": "We should hold a held-out vote.",
        "negating_statement": "We should NOT hold a held-out vote.",
        "split": "iid_test",
    }
]


def fake_embed(texts):
    """A bag of hashed words -> unit vector: deterministic, fast, and 'not' moves the vector."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().replace(".", " ").replace(",", " ").split():
            seed = int(hashlib.md5(word.encode()).hexdigest()[:8], 16)
            out[row] += np.random.default_rng(seed).standard_normal(64).astype(np.float32)
        out[row] /= max(np.linalg.norm(out[row]), 1e-9)
    return out


def test_stance_rows_are_deterministic_and_use_train_questions_only():
    questions = train_questions(BANK)
    assert all(q["split"] == "train" for q in questions) and len(questions) == 8
    first = make_stance_rows(questions, n_questions=5, seed=3)
    assert first == make_stance_rows(questions, n_questions=5, seed=3)
    assert first != make_stance_rows(questions, n_questions=5, seed=4)
    assert {row["kind"] for row in first} == {"pro", "con", "balanced", "vague", "off_topic"}
    assert all(1 <= row["agreement"] <= 7 and "NOT" not in row["statement"] for row in first)
    assert "held-out" not in json.dumps(first)
    # Members rate their own side above the other side.
    for row in first:
        if row["stance"] == "pro" and row["kind"] == "pro":
            assert row["agreement"] >= 5


def test_train_head_from_jsonl(tmp_path):
    raws = make_stance_rows(train_questions(BANK), n_questions=7, seed=0)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(raw) + "\n" for raw in raws))
    rows = load_jsonl(path)
    head = train_head(rows, fake_embed, HeadConfig(feature_set="pair", epochs=200, hidden=16))
    predictions = predict_rows(head, rows, fake_embed)
    assert all(1.0 <= p <= 7.0 for p in predictions)
    metrics = evaluate_predictions([r.rated() for r in rows], predictions)
    assert metrics["pairwise_accuracy"] > 0.8
    assert metrics["mae"] < 1.5

    saved = head.save(tmp_path / "head")
    assert saved == file_sha256(tmp_path / "head" / "head.npz")
    again = load_head(tmp_path / "head", saved)
    np.testing.assert_allclose(predict_rows(again, rows, fake_embed), predictions, rtol=1e-5)


def test_welfare_winner_match_and_calibration():
    groups = ["g"] * 4
    participants = [("g", "a"), ("g", "a"), ("g", "b"), ("g", "b")]
    statements = ["s1", "s2", "s1", "s2"]
    targets = [7.0, 1.0, 5.0, 3.0]
    assert welfare_winner_match(groups, participants, statements, [6.0, 2.0, 4.0, 3.0], targets) == (1.0, 1)
    assert welfare_winner_match(groups, participants, statements, [1.0, 6.0, 4.0, 5.0], targets) == (0.0, 1)
    bins = calibration_by_bin([1.2, 1.4, 6.6], [2.0, 1.0, 7.0])
    assert [b["bin"] for b in bins] == [1.0, 7.0] and bins[0]["mean_true"] == 1.5 and bins[0]["count"] == 2.0


def test_shipped_head_loads_and_its_checksum_is_pinned():
    head, config, version = load_shipped_or_directory(None)
    assert file_sha256(SHIPPED_DIR / "head.npz") == SHIPPED_SHA256
    assert version == f"stance-head-{SHIPPED_SHA256[:16]}"
    assert isinstance(head, HeadWeights) and head.feature_set == config["feature_set"]
    assert (SHIPPED_DIR / "head.npz").stat().st_size < 10 * 1024 * 1024
    assert (SHIPPED_DIR / "PROVENANCE.md").is_file()


def test_a_tampered_copy_is_refused(tmp_path):
    copy = tmp_path / "stance-head"
    shutil.copytree(SHIPPED_DIR, copy)
    load_head(copy, SHIPPED_SHA256)  # an exact copy loads
    with np.load(copy / "head.npz") as arrays:
        tampered = {name: arrays[name].copy() for name in arrays.files}
    tampered["b2"] = tampered["b2"] + 1.0
    with (copy / "head.npz").open("wb") as handle:
        np.savez(handle, **tampered)
    with pytest.raises(ChecksumError, match="refusing to load"):
        load_head(copy, SHIPPED_SHA256)
    with pytest.raises(ChecksumError):
        load_shipped_or_directory(copy)  # its head.npz.sha256 still names the shipped file


def test_the_default_reward_model_is_the_shipped_stance_head():
    assert settings.CONCORD_REWARD_MODEL == "stance-head"
    assert "similarity" in registry.REWARD_MODELS
    model = registry.get_reward_model(settings.CONCORD_REWARD_MODEL, device="cpu")
    assert model.name == "stance-head" and model.version.startswith("stance-head-")
    # The encoder depth the head was trained on is read from the checksummed head.npz.
    assert model.head.encoder_layers == 3 and len(model.encoder.model.encoder.layer) == 3
    question = "Should the town build a new bridge?"
    pro = "Yes. The town should build a new bridge; the old one is falling apart."
    scores = model.predict(
        [
            AgreementQuery(question, pro, "We believe the town should build a new bridge."),
            AgreementQuery(question, pro, "We believe the town should not build a new bridge."),
        ]
    )
    assert all(1.0 <= s <= 7.0 for s in scores)


@pytest.mark.django_db
def test_train_stance_head_from_the_database_and_evaluate_it(settings, tmp_path):
    settings.CONCORD_MODEL_STORE = tmp_path / "store"
    settings.CONCORD_DEVICE = "cpu"
    experiment = ExperimentFactory()
    raws = make_stance_rows(train_questions(BANK), n_questions=3, members=2, seed=1)
    by_group: dict[str, list[dict]] = {}
    for raw in raws:
        by_group.setdefault(raw["group_id"], []).append(raw)
    for group_rows in by_group.values():
        room = RoomFactory(experiment=experiment, question=QuestionFactory(text=group_rows[0]["question"]))
        round_ = room.rounds.get(index=0)
        statements = list(dict.fromkeys(r["statement"] for r in group_rows))
        candidates = {
            text: Candidate.objects.create(round=round_, index=i, text=text, backend="test", model_id="test", seed=i, prompt="prompt")
            for i, text in enumerate(statements)
        }
        members: dict[str, object] = {}
        for raw in group_rows:
            if raw["participant_id"] not in members:
                members[raw["participant_id"]] = participant = ParticipantFactory(room=room)
                Opinion.objects.create(round=round_, participant=participant, text=raw["opinion"])
            Rating.objects.create(
                participant=members[raw["participant_id"]],
                candidate=candidates[raw["statement"]],
                agreement=raw["agreement"],
                quality=4,
            )
    out = StringIO()
    call_command("train_reward_model", "--kind", "stance-head", "--seed", "2", stdout=out, stderr=StringIO())
    trained = json.loads(out.getvalue())
    version = RewardModelVersion.objects.get(pk=trained["version"])
    assert version.kind == "stance-head" and version.params["data"] == "database"
    assert version.metrics["train_rows"] == len(raws)
    assert file_sha256(Path(version.path) / "head.npz") == version.params["sha256"]

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(raw) + "\n" for raw in raws))
    report = StringIO()
    call_command("evaluate_reward_model", "--version", str(version.pk), "--data", str(data), "--no-baselines", stdout=report)
    evaluated = json.loads(report.getvalue())
    assert evaluated["kind"] == "stance-head"
    assert {"mae", "pairwise_accuracy", "welfare_winner_match", "calibration"} <= set(evaluated["model"])
    assert evaluated["constant_mean"]["value"] == pytest.approx(version.metrics["train_mean"])

    by_name = StringIO()
    call_command("evaluate_reward_model", "--model", "stance-head", "--data", str(data), "--no-baselines", stdout=by_name)
    assert json.loads(by_name.getvalue())["kind"] == "stance-head"
    assert rows_from_mappings(raws)  # the JSONL the command read is the schema the generator writes
