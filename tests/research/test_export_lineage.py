"""The export's generator_versions table: the versions an experiment used, with their ancestors and data."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from deliberation.models import Candidate, GeneratorVersion
from research.models import DatasetExport
from tests.research.study import build_study, read_export_zip

pytestmark = pytest.mark.django_db


def _version(name: str, parent: GeneratorVersion | None, method: str) -> GeneratorVersion:
    return GeneratorVersion.objects.create(
        name=name, base_model="smollm2-135m-instruct", path=f"/adapters/{name}", sha256=name[0] * 64, parent=parent,
        training_method=method, dataset_sha256=name[-1] * 64, params={"beta": 0.1}, metrics={"steps": 3},
    )


def test_the_export_names_each_version_used_and_its_lineage(researcher, tmp_path: Path) -> None:
    study = build_study(owner=researcher)
    grandparent = _version("seed-sft-1", None, "sft")
    parent = _version("study-sft-2", grandparent, "sft")
    child = _version("study-dpo-3", parent, "dpo")
    _version("unrelated-4", None, "sft")
    # The base arm names the DPO version; one candidate of the study cites the SFT parent.
    study.arms["base"].generator_version = child
    study.arms["base"].save()
    Candidate.objects.filter(pk=Candidate.objects.order_by("id").first().pk).update(generator_version=parent)

    call_command(
        "export_dataset", "--experiment", study.experiment.slug, "--format", "jsonl", "--out", str(tmp_path),
        "--as-user", researcher.username, stdout=StringIO(),
    )  # fmt: skip
    tables, _, readme = read_export_zip(Path(DatasetExport.objects.get().path), "jsonl")
    rows = tables["generator_versions"]
    assert [row["generator_version"] for row in rows] == ["seed-sft-1", "study-sft-2", "study-dpo-3"]
    assert [row["parent"] for row in rows] == [None, "seed-sft-1", "study-sft-2"]
    assert rows[2]["training_method"] == "dpo" and rows[2]["adapter_sha256"] == "s" * 64 and rows[2]["dataset_sha256"] == "3" * 64
    assert json.loads(rows[2]["params"]) == {"beta": 0.1} and json.loads(rows[2]["metrics"]) == {"steps": 3}
    assert "### generator_versions" in readme
