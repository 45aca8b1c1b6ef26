"""The flywheel end to end, at a tiny scale, on the paths researchers take: rounds with ratings in the
database -> a researcher starts SFT, then DPO from the SFT version, on the training page -> both
datasets are built from the study -> a few real steps of each -> versions registered with their lineage
-> the researcher points an arm at the DPO version -> a round generates with it and its candidates
record it. Runs the real 135M model (SmolLM2) on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_dataset
from django.test import Client
from django.urls import reverse

from deliberation import dispatch, services
from deliberation.mediator import default_generator_version
from deliberation.models import Candidate, GeneratorVersion, Round
from deliberation.tasks import mediate_round
from modeling.training.dpo import pairs_sha256
from modeling.training.study_data import load_preference_pairs
from research.models import TrainingRun
from tests.conftest import OPINIONS
from tests.factories import ExperimentFactory
from tests.research.study import build_study

pytestmark = [pytest.mark.django_db, pytest.mark.real_model]


@pytest.mark.real_model
def test_ratings_become_sft_and_dpo_versions_that_an_arm_generates_with(
    researcher, settings, tmp_path: Path, monkeypatch, django_capture_on_commit_callbacks
) -> None:
    settings.CONCORD_MODEL_STORE = tmp_path / "store"
    monkeypatch.setattr(
        "deliberation.dispatch.enqueue", lambda name, *, args, countdown=0.0: dispatch.task_named(name).apply(args=args) and True
    )
    study = build_study(owner=researcher)
    client = Client()
    client.force_login(researcher)

    def train(**fields: object) -> TrainingRun:
        form = {"kind": "generator", "experiments": [study.experiment.pk], "max_steps": "2", "batch_size": "1", **fields}
        with django_capture_on_commit_callbacks(execute=True):
            response = client.post(reverse("training_page"), form)
        run = TrainingRun.objects.latest("id")
        assert response.status_code == 302 and response["Location"] == reverse("training_run", args=[run.pk])
        assert run.status == TrainingRun.Status.DONE, run.error + "\n" + run.log
        assert run.steps_done == run.steps_total == 2 and run.loss is not None and "registered generator version" in run.log
        assert "step 2/2" in client.get(reverse("training_run", args=[run.pk])).content.decode()
        return run

    # SFT continues the site's current default (the shipped adapter); DPO continues that SFT version.
    default = default_generator_version()
    assert default is not None
    sft_run = train(method="sft", min_quality="5", parent=str(default.pk))
    sft = sft_run.generator_version
    assert sft is not None and sft.training_method == "sft" and sft.parent == default
    assert sft.params["init_adapter_sha256"] == default.sha256
    sft_rows = load_dataset("json", data_files=sft_run.dataset_path, split="train")
    assert sft.metrics["train_rows"] == sft_rows.num_rows > 0 and sft.metrics["steps"] == 2

    dpo_run = train(method="dpo", parent=str(sft.pk))
    dpo = dpo_run.generator_version
    assert dpo is not None and dpo.training_method == "dpo" and dpo.parent == sft and dpo.base_model == sft.base_model
    pairs = load_preference_pairs(dpo_run.dataset_path)
    assert dpo.dataset_sha256 == pairs_sha256(pairs) and dpo.metrics["train_rows"] == len(pairs) > 0
    assert dpo.params["parent_adapter_sha256"] == sft.sha256 and dpo.sha256 != sft.sha256
    assert Path(dpo.path, "adapter_model.safetensors").is_file() and not Path(dpo.path, "ref").exists()
    assert json.loads(Path(dpo.path, "concord-adapter.json").read_text())["adapter_sha256"] == dpo.sha256

    # The next cohort: a new experiment whose arm the researcher points at the DPO version.
    cohort = ExperimentFactory(owner=researcher, slug="next-cohort", group_size=3)
    arm = cohort.arms.get()
    arm.n_candidates, arm.k_shown = 2, 2
    arm.save()
    assert client.post(reverse("arm_generator_version", args=[arm.pk]), {"version": dpo.pk}).status_code == 302
    members = [services.participant_join(experiment=cohort, external_id=f"next-{i}") for i in range(3)]
    for member, text in zip(members, OPINIONS):
        services.opinion_submit(participant=member, text=text)
    round_ = Round.objects.current(room_id=members[0].room_id)
    assert mediate_round.apply(args=[round_.pk]).get() == "stored"
    candidates = list(Candidate.objects.filter(round=round_))
    assert len(candidates) == 2 and {c.generator_version_id for c in candidates} == {dpo.pk}
    assert all(f"+adapter-sha256:{dpo.sha256}" in c.model_id for c in candidates)

    page = client.get(reverse("versions_page")).content.decode()
    assert f"arm next-cohort/{arm.name}" in page and "wrote statements in next-cohort" in page
    assert GeneratorVersion.objects.count() == 3
