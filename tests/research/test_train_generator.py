"""train_generator registers a GeneratorVersion only when training succeeded; a room generates with it,
and its candidates (and the export) cite it."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from deliberation import services
from deliberation.models import Candidate, Experiment, GeneratorVersion, Round
from deliberation.tasks import mediate_round
from tests.conftest import OPINIONS

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "modeling" / "data" / "consensus_seed.jsonl"
DEV = ROOT / "modeling" / "data" / "consensus_dev.jsonl"

pytestmark = pytest.mark.django_db


def _slice(source: Path, target: Path, count: int) -> Path:
    target.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:count]), encoding="utf-8")
    return target


def test_a_failed_run_registers_nothing_and_says_why(tmp_path: Path, settings) -> None:
    settings.CONCORD_MODEL_STORE = tmp_path
    # The plain format (no ids, no seed-set fields) is read: the run gets as far as loading the model.
    data = tmp_path / "plain.jsonl"
    data.write_text(json.dumps({"question": "Q?", "opinions": ["yes", "no"], "statement": "We differ."}) + "\n", encoding="utf-8")
    with pytest.raises(CommandError, match="Training failed .*no version was registered"):
        call_command("train_generator", "--data", str(data), "--base", str(tmp_path / "no-such-model"), "--max-steps", "1")
    assert not GeneratorVersion.objects.exists()
    assert not (tmp_path / "generators").exists() or not any((tmp_path / "generators").iterdir())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--parent", "nobody"], "No generator version named 'nobody'"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--max-steps", "0"], "--max-steps must be at least 1"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path: Path, arguments: list[str], message: str) -> None:
    data = _slice(SEED, tmp_path / "seed.jsonl", 2)
    with pytest.raises(CommandError, match=message):
        call_command("train_generator", "--data", str(data), *arguments)


def test_a_malformed_data_file_names_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "seed.jsonl"
    bad.write_text('{"group_id": "x"}\n', encoding="utf-8")
    with pytest.raises(CommandError, match="seed.jsonl:1: 'question'"):
        call_command("train_generator", "--data", str(bad))


@pytest.mark.real_model
def test_a_trained_version_is_registered_used_by_a_room_and_cited_by_its_candidates(
    tmp_path: Path, settings, experiment: Experiment
) -> None:
    settings.CONCORD_MODEL_STORE = tmp_path / "store"
    data = _slice(SEED, tmp_path / "seed.jsonl", 4)
    held_out = _slice(DEV, tmp_path / "dev.jsonl", 2)
    out = StringIO()
    call_command(
        "train_generator", "--data", str(data), "--eval", str(held_out), "--epochs", "2", "--max-steps", "3", "--batch-size", "2",
        "--shuffles", "1", "--name", "tiny-sft", "--seed", "1", stdout=out, stderr=StringIO(),
    )
    report = json.loads(out.getvalue())
    version = GeneratorVersion.objects.get(name="tiny-sft")
    assert report["version"] == "tiny-sft" and report["version_id"] == version.pk
    for key in ("loss_before", "loss_after", "train_rows", "dataset_sha256", "base_model", "seconds"):
        assert key in report
    assert report["train_rows"] == 4 and version.metrics["steps"] == 3
    assert version.method == GeneratorVersion.Method.LORA and len(version.sha256) == 64
    assert Path(version.path, "adapter_model.safetensors").is_file()
    assert version.base_model_sha256 and version.dataset_sha256 == report["dataset_sha256"]

    # An arm names the version; the mediation task generates with it (adapter verified, merged at load).
    arm = experiment.arms.get()
    arm.generator_version = version
    arm.n_candidates = 2
    arm.k_shown = 2
    arm.save()
    members = [services.participant_join(experiment=experiment, external_id=f"sft-{i}") for i in range(3)]
    for member, text in zip(members, OPINIONS):
        services.opinion_submit(participant=member, text=text)
    round_ = Round.objects.current(room_id=members[0].room_id)
    assert mediate_round.apply(args=[round_.pk]).get() == "stored"
    candidates = list(Candidate.objects.filter(round=round_))
    assert len(candidates) == 2
    assert {c.generator_version_id for c in candidates} == {version.pk}
    assert all(f"+adapter-sha256:{version.sha256}" in c.model_id for c in candidates)


@pytest.mark.real_model
def test_dpo_from_the_base_registers_a_version_with_its_method_and_data(tmp_path: Path) -> None:
    """`--method dpo` without a parent: a fresh LoRA trained with trl's DPOTrainer, one step, two tiny pairs."""
    from modeling.generation.prompts import build_messages

    # The site's model store keeps the converted base between runs; the adapter goes to tmp_path.
    prompt = build_messages("Should the town build a bike lane?", ["Yes, it is safer.", "No, parking matters."], [1, 0])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]}) + "\n"
            for good, bad in (("We agree safety matters and parking needs a plan.", "Bikes."), ("We want a safe lane that keeps some parking.", "No."))
        ),
        encoding="utf-8",
    )
    out = StringIO()
    call_command(
        "train_generator", "--method", "dpo", "--data", str(pairs), "--max-steps", "1", "--batch-size", "2", "--max-seq-len", "384",
        "--name", "tiny-dpo", "--out", str(tmp_path / "tiny-dpo"), stdout=out, stderr=StringIO(),
    )
    report = json.loads(out.getvalue())
    version = GeneratorVersion.objects.get(name="tiny-dpo")
    assert report["method"] == "dpo" and version.training_method == "dpo" and version.parent is None
    assert version.metrics["steps"] == 1 and version.metrics["train_rows"] == 2 and version.params["beta"] == 0.1
    assert len(version.dataset_sha256) == 64 and version.sha256 == report["adapter_sha256"]
    assert Path(version.path, "adapter_model.safetensors").is_file()
