"""The exported data package is complete and valid: Frictionless validates every format (with rows and with
empty tables), Hugging Face `datasets` loads every table, keys are declared, and the reproducibility and
privacy facts are in it."""

from __future__ import annotations

import csv
import importlib.util
import json
import zipfile
from pathlib import Path

import datasets
import frictionless
import pytest
from django.urls import reverse

from deliberation.models import Candidate, Opinion
from research.exports import TABLES, code_version, write_dataset
from tests.factories import ExperimentFactory
from tests.research.study import build_study

pytestmark = pytest.mark.django_db
FORMATS = ["csv", "jsonl", "parquet"]


def _unzip(path: Path, into: Path) -> Path:
    with zipfile.ZipFile(path) as archive:
        archive.extractall(into)
        return into / archive.namelist()[0].split("/")[0]


def _export(experiment, tmp_path: Path, fmt: str) -> tuple[Path, dict[str, int]]:
    outcome = write_dataset(experiment=experiment, fmt=fmt, out_dir=tmp_path / "zips", include_external_ids=False, name=f"pkg-{fmt}")
    return _unzip(outcome.path, tmp_path / f"unzipped-{fmt}"), outcome.row_counts


def _validate(folder: Path) -> frictionless.Report:
    descriptor = json.loads((folder / "datapackage.json").read_text())
    if importlib.util.find_spec("jsonlines") is None:
        # Frictionless reads JSON lines through the `jsonlines` package (frictionless[json]); without it, the
        # lines are parsed here, strictly, and handed to the same validator as inline rows of the same schema.
        for resource in descriptor["resources"]:
            if resource.get("format") == "jsonl":
                names = [field["name"] for field in resource["schema"]["fields"]]
                lines = (folder / resource.pop("path")).read_text(encoding="utf-8").splitlines()
                rows = [json.loads(line) for line in lines]
                assert all(list(row) == names for row in rows), resource["name"]
                resource.update(format="inline", data=[names, *([row[n] for n in names] for row in rows)])
    return frictionless.Package(descriptor, basepath=str(folder)).validate()


def _errors(report: frictionless.Report) -> list[str]:
    return [error.message for task in report.tasks for error in task.errors] + [error.message for error in report.errors]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_package_with_rows_validates_with_its_keys(researcher, tmp_path: Path, fmt: str) -> None:
    study = build_study(owner=researcher)
    folder, counts = _export(study.experiment, tmp_path, fmt)
    assert counts["candidates"] > 0 and counts["opinions"] > 0 and counts["experiment"] == 1
    report = _validate(folder)
    assert report.valid, _errors(report)[:5]
    package = json.loads((folder / "datapackage.json").read_text())
    schemas = {r["name"]: r["schema"] for r in package["resources"]}
    assert schemas["candidates"]["primaryKey"] == ["candidate_id"]
    assert {"fields": ["round_id"], "reference": {"resource": "groups", "fields": ["round_id"]}} in schemas["candidates"]["foreignKeys"]
    assert schemas["predicted_agreement"]["primaryKey"] == ["candidate_id", "participant_id"]
    assert package["version"] == code_version() != ""


def test_a_broken_foreign_key_fails_validation(researcher, tmp_path: Path) -> None:
    # The declared keys are checked: an opinion whose round is not in the package is an error.
    study = build_study(owner=researcher)
    folder, _ = _export(study.experiment, tmp_path, "csv")
    lines = (folder / "opinions.csv").read_text().splitlines()
    header, first = lines[0].split(","), lines[1].split(",")
    first[header.index("round_id")] = "999999"
    (folder / "opinions.csv").write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    report = _validate(folder)
    assert not report.valid
    assert any("foreign" in message.lower() or "reference" in message.lower() for message in _errors(report))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_package_of_empty_tables_validates(tmp_path: Path, fmt: str) -> None:
    experiment = ExperimentFactory(slug="empty-study")
    folder, counts = _export(experiment, tmp_path, fmt)
    assert counts["candidates"] == counts["opinions"] == counts["participants"] == 0
    report = _validate(folder)
    assert report.valid, _errors(report)[:5]


@pytest.mark.parametrize("fmt", FORMATS)
def test_datasets_loads_every_table_even_when_empty(researcher, tmp_path: Path, fmt: str) -> None:
    datasets.disable_progress_bars()
    study = build_study(owner=researcher)
    full, full_counts = _export(study.experiment, tmp_path / "full", fmt)
    empty, empty_counts = _export(ExperimentFactory(slug="empty-study"), tmp_path / "empty", fmt)
    assert sum(1 for n in empty_counts.values() if n == 0) >= 10
    cache = str(tmp_path / "hf-cache")
    for table in TABLES:
        names = [c.name for c in table.columns(_ctx(study.experiment))]
        if full_counts[table.name]:
            loaded = datasets.load_dataset(str(full), table.name, split="train", cache_dir=cache)
            assert loaded.num_rows == full_counts[table.name], table.name
            assert loaded.column_names == names, table.name
        # Without rows, the configuration in the README's header still gives the columns and their types.
        streamed = datasets.load_dataset(str(empty), table.name, split="train", streaming=True, cache_dir=cache)
        assert list(streamed.features) == names, table.name
        assert sum(1 for _ in streamed) == empty_counts[table.name], table.name


def _ctx(experiment):
    from research.exports import ExportContext

    return ExportContext(experiment=experiment, include_external_ids=False)


def test_candidates_carry_their_sampling_and_opinions_their_replay_order(researcher, tmp_path: Path) -> None:
    study = build_study(owner=researcher)
    folder, _ = _export(study.experiment, tmp_path, "jsonl")
    candidates = [json.loads(line) for line in (folder / "candidates.jsonl").read_text().splitlines()]
    opinions = [json.loads(line) for line in (folder / "opinions.jsonl").read_text().splitlines()]
    stored = {c.pk: c for c in Candidate.objects.all()}
    for row in candidates:
        candidate = stored[row["candidate_id"]]
        assert (row["sample_index"], row["sampling_seed"], row["temperature"], row["top_p"], row["max_new_tokens"]) == (
            candidate.sample_index, candidate.sampling_seed, candidate.temperature, candidate.top_p, candidate.max_new_tokens
        )
    by_id = {o.pk: o for o in Opinion.objects.all()}
    assert [row["generation_position"] for row in opinions] == [by_id[row["opinion_id"]].generation_position for row in opinions]
    experiment_row = json.loads((folder / "experiment.jsonl").read_text())
    assert experiment_row["consent_text"] == study.experiment.consent_text
    assert experiment_row["rate_opinions"] is True and experiment_row["opinion_seconds"] == study.experiment.opinion_seconds
    assert experiment_row["code_version"] == code_version()


def _readme(folder: Path) -> str:
    return (folder / "README.md").read_text(encoding="utf-8")


def test_an_export_keyed_with_the_public_fallback_key_warns_in_the_readme_page_and_command(
    client, researcher, settings, tmp_path: Path, capsys
) -> None:
    from io import StringIO

    from django.core.management import call_command

    settings.SECRET_KEY = settings.INSECURE_FALLBACK_SECRET_KEY
    study = build_study(owner=researcher)
    folder, _ = _export(study.experiment, tmp_path, "csv")
    assert "## Privacy warning: pseudonyms can be reversed" in _readme(folder)
    assert "fallback key, which is public" in _readme(folder)
    package = json.loads((folder / "datapackage.json").read_text())
    assert package["concord"]["pseudonyms_reversible"] is True and "SECRET_KEY" in package["concord"]["privacy_warning"]
    (experiment_row,) = csv.DictReader((folder / "experiment.csv").read_text().splitlines())
    assert experiment_row["pseudonyms_keyed_with_site_secret"] == "false"
    # The researcher sees it on the exports page before exporting.
    client.force_login(researcher)
    page = client.get(reverse("exports_page", args=[study.experiment.slug])).content.decode()
    assert 'id="pseudonym-warning"' in page and "map each pseudonym back" in page
    # And the command says it.
    stderr = StringIO()
    call_command("export_dataset", "--experiment", study.experiment.slug, "--format", "csv", "--out", str(tmp_path / "cmd"), "--as-user", researcher.username, stderr=stderr, stdout=StringIO())
    assert "fallback key" in stderr.getvalue()


def test_an_export_keyed_with_the_sites_own_secret_does_not_warn(client, researcher, settings, tmp_path: Path) -> None:
    settings.SECRET_KEY = "a-long-random-secret-of-this-site-" + "x" * 40
    study = build_study(owner=researcher)
    folder, _ = _export(study.experiment, tmp_path, "csv")
    assert "Privacy warning" not in _readme(folder)
    assert json.loads((folder / "datapackage.json").read_text())["concord"]["pseudonyms_reversible"] is False
    client.force_login(researcher)
    page = client.get(reverse("exports_page", args=[study.experiment.slug])).content.decode()
    assert "pseudonym-warning" not in page


def test_the_code_version_is_the_setting_the_commit_or_unknown_never_made_up(settings, tmp_path: Path) -> None:
    import subprocess

    settings.CONCORD_CODE_VERSION = ""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=settings.BASE_DIR, capture_output=True, text=True).stdout.strip()
    assert code_version().removesuffix("-dirty") == head
    settings.CONCORD_CODE_VERSION = "concord-image-1.4.0"
    assert code_version() == "concord-image-1.4.0"
    # No checkout and no setting (an image built without the build argument): say so.
    settings.CONCORD_CODE_VERSION = ""
    settings.BASE_DIR = tmp_path
    assert code_version() == "unknown"
