"""export_dataset: every table, documented, pseudonymised, streamed, zipped and audited."""

from __future__ import annotations

import hashlib
import zipfile
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.admin.sites import site as admin_site
from django.core.management import CommandError, call_command
from django.test import RequestFactory

from deliberation import dispatch
from deliberation.models import Candidate, Experiment, PairwisePreference, Rating
from research.admin import ExperimentAdmin
from research.exports import TABLES, ExportContext, run_export, write_dataset
from research.models import DatasetExport
from tests.research.study import build_study, read_export_zip

pytestmark = pytest.mark.django_db

TABLE_NAMES = {
    "experiment", "questions", "arms", "groups", "participants", "opinions", "candidates", "predicted_agreement", "presentations",
    "agreement_ratings", "quality_ratings", "opinion_ratings", "rankings", "pairwise_preferences", "attention_checks", "timings",
    # The Habermas Machine protocol (tests/research/test_export_protocol.py checks their rows).
    "protocol_rounds", "critiques", "positions", "final_preferences", "human_statements",
    # Model lineage (tests/research/test_export_lineage.py) and the analytics' exclusion rules.
    "generator_versions", "exclusions",
}


@pytest.fixture
def study(researcher):
    return build_study(owner=researcher)


def _export(experiment: Experiment, out: Path, fmt: str, *extra: str) -> tuple[Path, str]:
    stdout = StringIO()
    call_command("export_dataset", "--experiment", experiment.slug, "--format", fmt, "--out", str(out), "--as-user", experiment.owner.username, *extra, stdout=stdout)
    export = DatasetExport.objects.order_by("-id").first()
    return Path(export.path), stdout.getvalue()


def test_the_csv_export_has_every_table_and_every_column_is_documented(study, tmp_path: Path) -> None:
    path, output = _export(study.experiment, tmp_path, "csv")
    assert path.parent == tmp_path and path.suffix == ".zip"
    tables, package, readme = read_export_zip(path, "csv")
    assert {r["name"] for r in package["resources"]} == TABLE_NAMES
    assert package["profile"] == "tabular-data-package"
    for resource in package["resources"]:
        documented = [f["name"] for f in resource["schema"]["fields"]]
        assert tables[resource["name"] + ":header"] == documented, resource["name"]
        assert all(f["description"] and f["type"] in {"integer", "number", "string", "boolean", "datetime"} for f in resource["schema"]["fields"])
        assert f"### {resource['name']}" in readme
        for column in documented:
            assert f"| `{column}` |" in readme.split(f"### {resource['name']}", 1)[1], (resource["name"], column)
    # Every table has the study's rows.
    assert len(tables["participants"]) == 9
    assert len(tables["groups"]) == 3 and len(tables["arms"]) == 3
    assert len(tables["agreement_ratings"]) == len(tables["quality_ratings"]) == Rating.objects.count() == 18
    assert len(tables["candidates"]) == Candidate.objects.count() == 16
    assert len(tables["pairwise_preferences"]) == PairwisePreference.objects.count() == 3
    assert len(tables["rankings"]) == 18 and len(tables["opinion_ratings"]) == 18 and len(tables["attention_checks"]) == 9
    assert len(tables["opinions"]) == 9 and len(tables["presentations"]) == 18
    assert len(tables["predicted_agreement"]) == 4 * 3 + 4 * 3 + 4 * 3 + 4 * 2  # base + opponent (x2 rooms) + exclusion
    assert {row["event"] for row in tables["timings"]} >= {"phase:opinions", "phase:mediating", "phase:rating", "phase:done", "joined", "consented", "opinion_submitted", "ranking_submitted", "finished"}
    # Provenance and protocols survive the trip.
    sources = {row["source_arm_id"] for row in tables["candidates"]}
    assert sources == {str(arm.pk) for arm in study.arms.values()}
    excluded = [row for row in tables["participants"] if row["excluded_from_generation"] == "true"]
    assert len(excluded) == 1
    group_of_exclusion = next(row for row in tables["groups"] if row["arm_id"] == str(study.arms["exclusion"].pk))
    assert group_of_exclusion["excluded_participant_id"] == excluded[0]["participant_id"]
    assert all(row["attention_check_passed"] == "true" for row in tables["participants"])
    assert "agreement_ratings: 0/" in output or "rows so far" in output


def test_participants_are_pseudonymised_unless_external_ids_are_asked_for(study, tmp_path: Path) -> None:
    path, _ = _export(study.experiment, tmp_path / "plain", "jsonl")
    with zipfile.ZipFile(path) as archive:
        everything = b"".join(archive.read(name) for name in archive.namelist()).decode()
    assert "PID-" not in everything
    for member in study.members:  # neither the database id nor the secret code leaks as an identifier
        assert member.code not in everything
    tables, package, _ = read_export_zip(path, "jsonl")
    pseudonyms = {row["participant_id"] for row in tables["participants"]}
    assert len(pseudonyms) == 9 and all(p.startswith("p") and len(p) == 13 for p in pseudonyms)
    assert {row["participant_id"] for row in tables["agreement_ratings"]} <= pseudonyms
    assert "external_id" not in tables["participants"][0]
    # Stable across exports of the same experiment, so exports can be joined.
    again, _ = _export(study.experiment, tmp_path / "again", "jsonl", "--include-external-ids")
    tables_again, package_again, readme = read_export_zip(again, "jsonl")
    assert {row["participant_id"] for row in tables_again["participants"]} == pseudonyms
    assert sorted(row["external_id"] for row in tables_again["participants"]) == sorted(f"PID-{i}" for i in range(9))
    fields = next(r for r in package_again["resources"] if r["name"] == "participants")["schema"]["fields"]
    assert "external_id" in [f["name"] for f in fields] and "**included**" in readme


def test_the_parquet_export_has_typed_columns(study, tmp_path: Path) -> None:
    path, _ = _export(study.experiment, tmp_path, "parquet")
    tables, package, _ = read_export_zip(path, "parquet")
    for resource in package["resources"]:
        assert tables[resource["name"] + ":header"] == [f["name"] for f in resource["schema"]["fields"]]
    rating = tables["agreement_ratings"][0]
    assert isinstance(rating["agreement"], int) and rating["created_at"].tzinfo is not None
    assert isinstance(tables["candidates"][0]["shown"], bool)


def test_every_export_is_in_the_audit_log(study, tmp_path: Path, researcher) -> None:
    path, _ = _export(study.experiment, tmp_path, "csv", "--include-external-ids")
    export = DatasetExport.objects.get()
    assert (export.requested_via, export.format, export.include_external_ids, export.status) == ("command", "csv", True, "done")
    assert export.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert export.row_counts["participants"] == 9 and export.progress_done == export.progress_total == sum(export.row_counts.values())
    assert export.finished_at is not None and export.started_at is not None
    # Re-running a finished export task writes nothing new.
    assert run_export(export_id=export.pk) == "already done"


def test_rows_stream_in_chunks_and_the_result_does_not_depend_on_the_chunk_size(study, tmp_path: Path) -> None:
    seen: list[tuple[str, int, int]] = []
    small = write_dataset(experiment=study.experiment, fmt="csv", out_dir=tmp_path / "a", include_external_ids=False, name="small",
                          on_progress=lambda table, done, total: seen.append((table, done, total)), chunk_size=2)
    large = write_dataset(experiment=study.experiment, fmt="csv", out_dir=tmp_path / "b", include_external_ids=False, name="small")
    assert small.row_counts == large.row_counts
    with zipfile.ZipFile(small.path) as a, zipfile.ZipFile(large.path) as b:
        for name in a.namelist():
            if name.endswith(".csv"):
                assert a.read(name) == b.read(name)
    total = sum(small.row_counts.values())
    assert len(seen) > total // 2 and [done for _, done, _ in seen] == sorted(done for _, done, _ in seen)
    assert seen[-1][1] == total and all(t == total for _, _, t in seen)
    assert not list((tmp_path / "a").glob(".*"))  # no scratch files left behind


def test_declared_row_counts_match_the_rows_written(study) -> None:
    ctx = ExportContext(experiment=study.experiment, include_external_ids=False, chunk_size=3)
    for table in TABLES:
        assert table.count(ctx) == sum(1 for _ in table.rows(ctx)), table.name


def test_a_failed_export_is_recorded_with_its_error(study, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    with pytest.raises(CommandError, match="failed"):
        _export(study.experiment, blocker, "csv")
    export = DatasetExport.objects.get()
    assert export.status == DatasetExport.Status.FAILED and export.error


def test_the_command_refuses_unknown_experiments(tmp_path: Path, researcher) -> None:
    with pytest.raises(CommandError, match="No experiment"):
        call_command("export_dataset", "--experiment", "nope", "--format", "csv", "--out", str(tmp_path), "--as-user", researcher.username)


def test_the_admin_action_queues_the_export_task_after_commit(study, researcher, django_capture_on_commit_callbacks, monkeypatch, tmp_path, settings) -> None:
    settings.CONCORD_EXPORT_DIR = tmp_path
    queued: list[tuple[str, list]] = []
    monkeypatch.setattr("deliberation.dispatch.enqueue", lambda name, *, args, countdown=0.0: queued.append((str(name), args)))
    request = RequestFactory().post("/admin/deliberation/experiment/")
    request.user = researcher
    request._messages = type("Messages", (), {"add": lambda *a, **k: None})()
    model_admin = ExperimentAdmin(Experiment, admin_site)
    action = dict((name, func) for func, name, _ in model_admin._get_base_actions())["export_dataset_csv"]
    with django_capture_on_commit_callbacks(execute=True):
        action(model_admin, request, Experiment.objects.filter(pk=study.experiment.pk))
    export = DatasetExport.objects.get()
    assert (export.requested_by, export.requested_via, export.include_external_ids) == (researcher, "admin", False)
    assert queued == [("research.tasks.export_dataset", [export.pk])]
    # The task itself, as a worker would run it.
    from research.tasks import export_dataset

    assert export_dataset.apply(args=[export.pk]).get() == "done"
    export.refresh_from_db()
    assert Path(export.path).parent == tmp_path


def test_exports_can_be_requested_and_downloaded_by_the_owner_only(client, study, researcher, outsider_researcher, monkeypatch, tmp_path, django_capture_on_commit_callbacks, settings) -> None:
    settings.CONCORD_EXPORT_DIR = tmp_path
    monkeypatch.setattr("deliberation.dispatch.enqueue", lambda name, *, args, countdown=0.0: dispatch.task_named(name).apply(args=args))
    url = f"/researcher/experiments/{study.experiment.slug}/exports/"
    client.force_login(outsider_researcher)
    assert client.get(url).status_code == 404
    assert client.post(url, {"format": "csv"}).status_code == 404
    client.force_login(researcher)
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(url, {"format": "jsonl"}).status_code == 302
    export = DatasetExport.objects.get()
    assert (export.requested_by, export.requested_via, export.status) == (researcher, "web", "done")
    page = client.get(url).content.decode()
    assert f'data-export="{export.pk}"' in page and "Download zip" in page
    download = client.get(f"/researcher/exports/{export.pk}/download/")
    assert download.status_code == 200 and b"".join(download.streaming_content).startswith(b"PK")
    client.force_login(outsider_researcher)
    assert client.get(f"/researcher/exports/{export.pk}/download/").status_code == 404
    client.force_login(researcher)
    assert client.post(url, {"format": "xml"}).status_code == 302
    assert DatasetExport.objects.count() == 1  # an unknown format is refused, not recorded
