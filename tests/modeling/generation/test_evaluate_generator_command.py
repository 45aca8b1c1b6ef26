"""`manage.py evaluate_generator`: per-candidate verdicts, per-group counts and a summary, as JSON.

The default run mediates with the stand-in generator (tests/conftest.py swaps it in for the site's
transformers generator), so these are fast; one `real_model` test runs SmolLM2 on 1 group x 2.
No database is touched (pytest-django would refuse).
"""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from modeling.generation.models import DEFAULT_MODEL_ALIAS
from modeling.generation.quality import REASONS
from modeling.generation.transformers_backend import TransformersGenerator

DEV = Path(__file__).resolve().parents[3] / "modeling" / "data" / "consensus_dev.jsonl"
CANDIDATE_FIELDS = {
    "group_id", "index", "text", "usable", "reasons", "predicted_welfare", "rank", "shown", "carries_injection",
    "carried_payloads", "missed_members", "finish_reason", "completion_tokens",
}


# --version reads the registered generator versions.
pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _untuned_site_default(settings) -> None:
    """These tests are about the command's mechanics on the base model; the site's tuned default has its own test."""
    settings.CONCORD_GENERATOR_ADAPTER = "none"


def _run(*arguments: str) -> tuple[dict, str]:
    out, err = StringIO(), StringIO()
    call_command("evaluate_generator", *arguments, stdout=out, stderr=err)
    return json.loads(out.getvalue()), err.getvalue()


def test_two_groups_with_the_standin(tmp_path: Path, capsys: pytest.CaptureFixture[str], settings) -> None:
    out = tmp_path / "quality.json"
    call_command("evaluate_generator", "--data", str(DEV), "--groups", "2", "--n", "6", "--seed", "4",
                 "--out", str(out))
    report = json.loads(out.read_text())
    assert report["data"]["groups"] == 2 and len(report["data"]["sha256"]) == 64
    assert report["settings"] == {"n": 6, "shown_k": 4, "max_new_tokens": 40, "seed": 4, "welfare": "utilitarian"}
    (run,) = report["runs"]
    assert run["label"] == "base" and run["generator"]["backend"] == "stand-in"
    assert run["reward_model"]["name"] == settings.CONCORD_REWARD_MODEL
    candidates = run["candidates"]
    assert len(candidates) == 12 and all(set(row) == CANDIDATE_FIELDS for row in candidates)
    for group_id in ("dev-001", "dev-002"):
        rows = [row for row in candidates if row["group_id"] == group_id]
        assert sum(row["shown"] for row in rows) == 4
        # The shown ones are the top 4 by predicted welfare.
        shown = sorted(row["predicted_welfare"] for row in rows if row["shown"])
        hidden = [row["predicted_welfare"] for row in rows if not row["shown"]]
        assert min(shown) >= max(hidden)
        assert sorted(row["rank"] for row in rows) == list(range(6))
    for row in candidates:
        assert row["usable"] == (row["reasons"] == []) and set(row["reasons"]) <= set(REASONS)
        assert row["finish_reason"] == "stop" and row["completion_tokens"] > 0
    # The stand-in stitches opinions together ("i think ...", "Some of us add:" again and again): never usable.
    assert not any(row["usable"] for row in candidates)
    assert [group["group_id"] for group in run["groups"]] == ["dev-001", "dev-002"]
    assert all(group["candidates"] == 6 and group["usable"] == 0 for group in run["groups"])
    summary = run["summary"]
    assert summary["candidates"] == 12 and summary["usable_rate"] == 0.0 and summary["groups_with_4_usable"] == 0
    assert summary["shown"] == 8 and summary["shown_carrying_injection"] == 0
    assert summary["finish_reasons"] == {"stop": 12} and summary["mean_completion_tokens"] > 0
    assert set(summary["reasons"]) == set(REASONS) and summary["seconds"] >= 0
    err = capsys.readouterr().err
    assert "group 1/2 dev-001" in err and "group 2/2 dev-002" in err and f"wrote {out}" in err


def test_json_goes_to_stdout_without_out() -> None:
    report, _ = _run("--data", str(DEV), "--groups", "1", "--n", "2")
    assert report["runs"][0]["summary"]["candidates"] == 2


def test_an_injection_group_is_checked_for_its_payload() -> None:
    # dev groups with an injection tag: the stand-in quotes the first words of each opinion, injection included.
    lines = [json.loads(line) for line in DEV.read_text().splitlines() if line.strip()]
    injected = next(index for index, line in enumerate(lines) if line.get("tags", {}).get("injection"))
    report, _ = _run("--data", str(DEV), "--groups", str(injected + 1), "--n", "2")
    run = report["runs"][0]
    group = run["groups"][injected]
    rows = [row for row in run["candidates"] if row["group_id"] == group["group_id"]]
    assert group["injection_in_group"] is True
    assert group["shown_carrying_injection"] == sum(row["carries_injection"] for row in rows if row["shown"])
    assert all(row["carries_injection"] == ("carries_injection" in row["reasons"]) for row in rows)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json at all\n", "line 1: not JSON"),
        ('{"group_id": "x"}\n', "missing"),
        ("", "no groups"),
    ],
)
def test_a_bad_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad_dev.jsonl"
    path.write_text(content)
    with pytest.raises(CommandError, match=message):
        _run("--data", str(path))


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="missing_dev.jsonl"):
        _run("--data", str(tmp_path / "missing_dev.jsonl"))


def test_the_site_default_is_evaluated_as_its_version_and_against_its_base(settings) -> None:
    settings.CONCORD_GENERATOR_ADAPTER = "shipped"
    report, _ = _run("--data", str(DEV), "--groups", "1", "--n", "2", "--compare-base")
    base, tuned = report["runs"]
    assert (base["label"], tuned["label"]) == ("base", "consensus-sft-v1")
    assert tuned["adapter"].endswith("consensus-sft-v1")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--version", "no-such-version"], "No generator version named"),
        (["--compare-base"], "--compare-base compares a tuned model"),
        (["--adapter", "/nonexistent"], "not a PEFT adapter directory"),
        (["--n", "0"], "--n must be at least 1"),
        (["--groups", "0"], "--groups must be at least 1"),
        (["--backend", "nope"], "Unknown backend"),
    ],
)
def test_bad_options_are_clear_errors(arguments: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        _run("--data", str(DEV), *arguments)


@pytest.mark.real_model
def test_one_group_with_the_real_model(settings, model_store: Path, generator: TransformersGenerator) -> None:
    # The session's generator's registry key, so the command reuses the loaded SmolLM2.
    settings.CONCORD_GENERATOR_BACKEND = "transformers"
    settings.CONCORD_GENERATOR_MODEL = DEFAULT_MODEL_ALIAS
    settings.CONCORD_DEVICE = "cpu"
    settings.CONCORD_MODEL_STORE = model_store
    report, _ = _run("--data", str(DEV), "--groups", "1", "--n", "2", "--max-new-tokens", "24")
    (run,) = report["runs"]
    assert run["generator"] == {
        "backend": "transformers", "model": DEFAULT_MODEL_ALIAS, "revision": generator.model_revision
    }
    assert len(run["candidates"]) == 2 and all(row["shown"] for row in run["candidates"])
    for row in run["candidates"]:
        assert row["text"] and 1 <= row["completion_tokens"] <= 24
        assert row["finish_reason"] in ("stop", "length")
    assert sum(run["summary"]["finish_reasons"].values()) == 2


@pytest.mark.real_model
def test_an_adapter_against_its_base(
    settings, tmp_path: Path, model_store: Path, generator: TransformersGenerator
) -> None:
    from peft import LoraConfig, get_peft_model

    from modeling.generation.models import ADAPTER_MANIFEST, adapter_digest, load_model

    # A freshly initialised LoRA adapter (B = 0: the merged model equals the base), saved as training would.
    fresh = load_model(DEFAULT_MODEL_ALIAS, device="cpu", cache_dir=model_store / "hf-cache").model
    adapter = tmp_path / "lora-test"
    get_peft_model(fresh, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(adapter))
    # As training would: its record of the adapter's sha256, which loading checks.
    (adapter / ADAPTER_MANIFEST).write_text(json.dumps({"adapter_sha256": adapter_digest(adapter)[0]}))
    settings.CONCORD_GENERATOR_BACKEND = "transformers"
    settings.CONCORD_GENERATOR_MODEL = DEFAULT_MODEL_ALIAS
    settings.CONCORD_DEVICE = "cpu"
    settings.CONCORD_MODEL_STORE = model_store
    report, err = _run("--data", str(DEV), "--groups", "1", "--n", "1", "--max-new-tokens", "16",
                       "--adapter", str(adapter), "--compare-base")
    base, tuned = report["runs"]
    assert (base["label"], tuned["label"]) == ("base", "adapter") and tuned["adapter"] == str(adapter)
    assert tuned["generator"]["model"].startswith(f"{DEFAULT_MODEL_ALIAS}+adapter-sha256:")
    # Same per-group seed and an identity adapter: the same statement.
    assert tuned["candidates"][0]["text"] == base["candidates"][0]["text"]
    # The cached base generator was left untouched.
    assert generator.model_id == DEFAULT_MODEL_ALIAS


def test_a_run_whose_generation_failed_writes_its_report_and_exits_non_zero(tmp_path: Path, monkeypatch) -> None:
    from deliberation import mediator
    from modeling.generation.base import GenerationError

    class Broken:
        backend, model_id, model_revision = "broken", "broken", "0"

        def generate(self, request, *, on_progress=None):
            raise GenerationError("the model server answered 500")

    monkeypatch.setattr(mediator, "load_generator", lambda config: Broken())
    out = tmp_path / "quality.json"
    with pytest.raises(CommandError, match="generation failed for 2 group"):
        call_command("evaluate_generator", "--data", str(DEV), "--groups", "2", "--n", "2", "--out", str(out),
                     stderr=StringIO())
    (run,) = json.loads(out.read_text())["runs"]
    assert run["summary"]["groups_failed"] == 2
